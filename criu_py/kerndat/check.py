# `criu-py check`: which kernel features criu-py relies on are missing here, and what each
# absence turns off. One table, FEATURES; the verdicts come from the kdat facts (cached or
# probed) and, for privileges, from the caller facts of this run.
from collections import namedtuple

from criu_py.kerndat.facts import KerndatFacts

ERROR, WARN = "Error", "Warn"

# name; in the default check (else only with --all); severity when missing (ERROR: dump or
# restore cannot work, WARN: something is turned off or replaced); test(facts) -> ok;
# what its absence means (a str, or a function of the facts for fallbacks).
Feature = namedtuple("Feature", "name default severity ok missing")


def _soft_dirty_missing(f: KerndatFacts) -> str:
    if f.uffd_dirty_tracking:
        return "no soft-dirty: pre-dump tracks memory with uffd write-protect instead"
    return "no soft-dirty and no uffd write-protect tracking: pre-dump is unavailable"


FEATURES = (
    Feature("privileges", True, ERROR,
            lambda f: f.caller.has_cap("CAP_SYS_PTRACE") and (
                f.caller.has_cap("CAP_SYS_ADMIN") or f.caller.has_cap("CAP_CHECKPOINT_RESTORE")),
            "without CAP_SYS_PTRACE and CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) "
            "other processes cannot be dumped nor PIDs chosen at restore"),
    Feature("clone3_set_tid", True, ERROR, lambda f: f.clone3_set_tid,
            "no clone3 set_tid: restore cannot recreate tasks at their PIDs"),
    Feature("prctl_mm_map", True, ERROR, lambda f: f.prctl_mm_map,
            "no PR_SET_MM_MAP: restore cannot set brk, arguments, environment and auxv"),
    Feature("vdso", True, ERROR,
            lambda f: f.vdso_area("[vdso]") is not None and f.vdso_symbol("__vdso_clock_gettime") is not None,
            "the vDSO layout is unknown: restore cannot put the vDSO back"),
    Feature("xsave", True, ERROR, lambda f: f.xsave_size > 0 and f.ptrace_xstate_size > 0,
            "no xsave state through ptrace: FPU/SSE/AVX registers cannot be saved"),
    Feature("pagemap", True, ERROR, lambda f: f.pagemap_exclusive,
            "/proc/PID/pagemap does not show written pages: memory cannot be dumped"),
    Feature("zero_pfn", True, WARN, lambda f: f.zero_pfn != 0,
            "the zero page's PFN is unknown: pages only read are dumped as data"),
    Feature("soft_dirty", True, WARN, lambda f: f.soft_dirty, _soft_dirty_missing),
    Feature("mem_dirty_track", True, WARN, lambda f: bool(f.mem_tracking),
            "no way to track written pages: pre-dump and incremental dumps are unavailable"),
    Feature("pidfd_getfd", True, WARN, lambda f: f.pidfd_getfd,
            "no pidfd_getfd: pipe contents and other fd state of a target cannot be read"),
    Feature("kcmp", True, WARN, lambda f: f.kcmp,
            "no kcmp: files and memory shared between tasks cannot be recognised"),
    Feature("ptrace_rseq_conf", True, WARN, lambda f: f.ptrace_rseq_conf or not f.rseq,
            "no PTRACE_GET_RSEQ_CONFIGURATION: tasks with an rseq area cannot be dumped"),
    Feature("map_vdso", True, WARN, lambda f: f.map_vdso,
            "no ARCH_MAP_VDSO_64: restore must move the existing vDSO instead of mapping one"),
    Feature("memfd", True, WARN, lambda f: f.memfd,
            "no memfd_create: memfd-backed memory cannot be restored"),
    Feature("sys_resource", True, WARN, lambda f: f.caller.has_cap("CAP_SYS_RESOURCE"),
            "without CAP_SYS_RESOURCE: hard rlimits cannot be raised, pipes stay within "
            "fs.pipe-max-size, oom_score_adj cannot be lowered, PR_SET_MM fields one by one fail"),
    # --all only: optional features.
    Feature("pagemap_scan", False, WARN, lambda f: f.pagemap_scan,
            "no PAGEMAP_SCAN: memory tracking by uffd write-protect is unavailable"),
    Feature("uffd_wp_async", False, WARN, lambda f: f.uffd_wp_async and f.uffd_wp,
            "no uffd WP_ASYNC: memory tracking by uffd write-protect is unavailable"),
    Feature("uffd_dirty_tracking", False, WARN, lambda f: f.uffd_dirty_tracking,
            "uffd write-protect + PAGEMAP_SCAN do not report written pages: "
            "pre-dump needs soft-dirty"),
    Feature("lazy_pages", False, WARN, lambda f: f.uffd_usable and f.uffd_missing,
            "no usable userfaultfd: restore --lazy-pages is unavailable"),
    Feature("time_ns", False, WARN, lambda f: f.time_ns,
            "no time namespaces: their clock offsets cannot be restored"),
    Feature("nspid", False, WARN, lambda f: f.nspid,
            "no NSpid: tasks in nested PID namespaces cannot be dumped"),
    Feature("memfd_hugetlb", False, WARN, lambda f: f.memfd_hugetlb,
            "no hugetlb memfd: hugetlb memfds cannot be restored"),
    Feature("cgroups", False, WARN, lambda f: bool(f.cgroup2_mount or f.cgroup_v1),
            "no cgroup mounts: cgroup membership cannot be dumped"),
    Feature("pagemap_pfn", False, WARN, lambda f: f.pagemap_pfn,
            "pagemap hides PFNs (no CAP_SYS_ADMIN): zero pages cannot be told apart"),
)
BY_NAME = {feature.name: feature for feature in FEATURES}


def _cgroup_layout(f: KerndatFacts) -> str:
    v1 = ", ".join(f"{m.controllers} at {m.mountpoint}" for m in f.cgroup_v1) or "none"
    v2 = (f"at {f.cgroup2_mount} (controllers: {f.cgroup2_controllers or 'none'})"
          if f.cgroup2_mount else "not mounted")
    return f"v1 {v1}; v2 {v2}"


def _tracking_method(f: KerndatFacts) -> str:
    if f.mem_tracking == "uffd-wp":
        return ("uffd-wp (userfaultfd write-protect in WP_ASYNC mode, PAGEMAP_SCAN; the uffd "
                "is kept by a criu-py-track process between pre-dump and dump)")
    return f.mem_tracking


# What `check --feature NAME` adds after "NAME is supported".
DETAILS = {"cgroups": _cgroup_layout, "mem_dirty_track": _tracking_method}

Verdict = namedtuple("Verdict", "feature ok text")


def evaluate(facts: KerndatFacts, names=None, include_all: bool = False) -> list[Verdict]:
    """Verdicts for the named features (default: the default set, or all)."""
    if names is None:
        chosen = [f for f in FEATURES if f.default or include_all]
    else:
        chosen = [BY_NAME[name] for name in names]
    out = []
    for feature in chosen:
        ok = bool(feature.ok(facts))
        text = feature.missing(facts) if callable(feature.missing) else feature.missing
        out.append(Verdict(feature, ok, "" if ok else text))
    return out


def exit_status(verdicts: list[Verdict]) -> int:
    """0 when all is well, 1 when a feature dump/restore need is missing, 2 when only
    optional features are missing (something is turned off or replaced)."""
    missing = [v for v in verdicts if not v.ok]
    if not missing:
        return 0
    return 1 if any(v.feature.severity == ERROR for v in missing) else 2
