# The record of what this kernel and CPU can do (KerndatFacts) and of who is asking
# (CallerFacts). One table, FACTS, names every cached fact once: the probes fill it, the
# cache file stores it (proto/kdat.proto uses the same names), `criu-py kdat` prints it.
# Import-light on purpose: a cached load must not pay for dataclasses, cffi or psutil.
from collections import namedtuple

VdsoArea = namedtuple("VdsoArea", "name size offset")        # offset from the [vdso] start
VdsoSymbol = namedtuple("VdsoSymbol", "name offset")         # offset from the image start
XFeature = namedtuple("XFeature", "bit size offset")         # xsave component in the standard layout
CgroupMount = namedtuple("CgroupMount", "controllers mountpoint")

# Value kinds: how a fact is stored and shown.
INT, HEX, BOOL, STR = "int", "hex", "bool", "str"
LIST_KINDS = {"vdso_areas": VdsoArea, "vdso_symbols": VdsoSymbol,
              "xfeatures": XFeature, "cgroup_v1": CgroupMount}

# (name, kind, meaning). Order is the order of `criu-py kdat`.
FACTS = (
    ("page_size", INT, "bytes per page"),
    ("task_size", HEX, "end of the user address space (TASK_SIZE)"),
    ("mmap_min_addr", HEX, "lowest address mmap may use (vm.mmap_min_addr)"),
    ("zero_pfn", HEX, "PFN of the shared zero page (0: not visible to us)"),
    ("pagemap_pfn", BOOL, "pagemap shows PFNs"),
    ("pagemap_exclusive", BOOL, "pagemap bit 56 (exclusively mapped) works"),
    ("pagemap_file", BOOL, "pagemap bit 61 (file/shared page) works"),
    ("soft_dirty", BOOL, "soft-dirty really tracks writes (clear_refs 4, pagemap bit 55)"),
    ("pagemap_scan", BOOL, "PAGEMAP_SCAN ioctl on /proc/PID/pagemap"),
    ("pagemap_scan_categories", HEX, "PAGE_IS_* categories PAGEMAP_SCAN accepts"),
    ("shmem_dev", HEX, "device of anonymous shared memory (shmem)"),
    ("prctl_mm_map", BOOL, "prctl(PR_SET_MM, PR_SET_MM_MAP)"),
    ("dev_userfaultfd", BOOL, "/dev/userfaultfd gives us a userfaultfd"),
    ("uffd_syscall", BOOL, "the userfaultfd() syscall gives us a full userfaultfd"),
    ("unprivileged_uffd", BOOL, "vm.unprivileged_userfaultfd = 1"),
    ("uffd_features", HEX, "UFFD_FEATURE_* bits of UFFDIO_API"),
    ("uffd_ioctls", HEX, "ioctls UFFDIO_API offers"),
    ("uffd_missing", BOOL, "userfaultfd MISSING mode registers on anonymous memory"),
    ("uffd_wp", BOOL, "userfaultfd write-protect mode registers on anonymous memory"),
    ("uffd_dirty_tracking", BOOL, "uffd WP_ASYNC + PAGEMAP_SCAN report exactly the written pages"),
    ("pid_max", INT, "kernel.pid_max"),
    ("last_cap", INT, "highest capability number (kernel.cap_last_cap)"),
    ("clone3_set_tid", BOOL, "clone3() with set_tid (restore at the same PID)"),
    ("pidfd_open", BOOL, "pidfd_open()"),
    ("pidfd_getfd", BOOL, "pidfd_getfd() (duplicate a target's fd)"),
    ("kcmp", BOOL, "kcmp()"),
    ("nspid", BOOL, "NSpid in /proc/PID/status"),
    ("rseq", BOOL, "rseq() syscall"),
    ("ptrace_rseq_conf", BOOL, "PTRACE_GET_RSEQ_CONFIGURATION"),
    ("ptrace_xstate_size", INT, "bytes of NT_X86_XSTATE from ptrace"),
    ("time_ns", BOOL, "time namespaces"),
    ("memfd", BOOL, "memfd_create()"),
    ("memfd_hugetlb", BOOL, "memfd_create(MFD_HUGETLB)"),
    ("vdso_areas", "vdso_areas", "vDSO mappings: name, size, offset from [vdso]"),
    ("vdso_symbols", "vdso_symbols", "vDSO dynamic symbols: name, offset in the image"),
    ("vdso_sha256", STR, "SHA-256 of the vDSO image"),
    ("map_vdso", BOOL, "arch_prctl(ARCH_MAP_VDSO_64)"),
    ("xsave_size", INT, "xsave area size for the features enabled in XCR0 (CPUID 0xD.0 EBX)"),
    ("xsave_max_size", INT, "xsave area size for every supported feature (CPUID 0xD.0 ECX)"),
    ("xfeatures_mask", HEX, "XCR0: xsave features the kernel enabled"),
    ("xfeatures_supported", HEX, "xsave features the CPU supports (CPUID 0xD.0 EDX:EAX)"),
    ("xsave_instructions", HEX, "CPUID 0xD.1 EAX: 1 xsaveopt, 2 xsavec, 4 xgetbv1, 8 xsaves"),
    ("xfeatures", "xfeatures", "xsave components: bit, size, offset"),
    ("cgroup_v1", "cgroup_v1", "cgroup v1 hierarchies: controllers, mount point"),
    ("cgroup2_mount", STR, "cgroup2 mount point ('' when none)"),
    ("cgroup_mnt_ns", INT, "mount namespace the cgroup layout was read in"),
    ("cgroup2_controllers", STR, "controllers cgroup2 can give out (its root's cgroup.controllers)"),
    ("cgroup_controllers", STR, "controllers the kernel has enabled (/proc/cgroups)"),
)
FACT_NAMES = tuple(name for name, _, _ in FACTS)
FACT_KIND = {name: kind for name, kind, _ in FACTS}
DEFAULTS = {INT: 0, HEX: 0, BOOL: False, STR: ""}

# UFFD_FEATURE_* bits (linux/userfaultfd.h; Debian 12's headers predate several).
UFFD_FEATURE_BITS = {
    "PAGEFAULT_FLAG_WP": 0, "EVENT_FORK": 1, "EVENT_REMAP": 2, "EVENT_REMOVE": 3,
    "MISSING_HUGETLBFS": 4, "MISSING_SHMEM": 5, "EVENT_UNMAP": 6, "SIGBUS": 7, "THREAD_ID": 8,
    "MINOR_HUGETLBFS": 9, "MINOR_SHMEM": 10, "EXACT_ADDRESS": 11, "WP_HUGETLBFS_SHMEM": 12,
    "WP_UNPOPULATED": 13, "POISON": 14, "WP_ASYNC": 15, "MOVE": 16,
}

# Metadata of a KerndatFacts that is not a kernel fact.
META = ("boot_id", "kernel_release", "criu_py_version", "probed_euid", "probed_at",
        "probe_seconds", "probe_errors", "caller", "source", "cache_path", "load_seconds")


class KerndatFacts:
    """What the running kernel and CPU offer, as probed (or loaded from the kdat cache).

    Every name of FACTS is an attribute. `caller` holds the CallerFacts of this run;
    `source` is "cache" or "probe", `cache_path` the kdat file used (None: no cache),
    `load_seconds` what getting the facts cost, `probe_errors` {fact: why it is unknown}."""
    __slots__ = FACT_NAMES + META

    def __init__(self, **values):
        for name in FACT_NAMES:
            kind = FACT_KIND[name]
            setattr(self, name, values.pop(name, () if kind in LIST_KINDS else DEFAULTS[kind]))
        self.boot_id = values.pop("boot_id", "")
        self.kernel_release = values.pop("kernel_release", "")
        self.criu_py_version = values.pop("criu_py_version", "")
        self.probed_euid = values.pop("probed_euid", 0)
        self.probed_at = values.pop("probed_at", 0.0)
        self.probe_seconds = values.pop("probe_seconds", 0.0)
        self.probe_errors = values.pop("probe_errors", {})
        self.caller = values.pop("caller", None)
        self.source = values.pop("source", "probe")
        self.cache_path = values.pop("cache_path", None)
        self.load_seconds = values.pop("load_seconds", 0.0)
        if values:
            raise TypeError(f"unknown kernel facts: {', '.join(sorted(values))}")

    # Derived views used by dump/restore and `check`.
    def uffd_feature(self, name: str) -> bool:
        """True when UFFDIO_API offers UFFD_FEATURE_<name> (e.g. "WP_ASYNC")."""
        return bool(self.uffd_features >> UFFD_FEATURE_BITS[name] & 1)

    @property
    def uffd_wp_async(self) -> bool:
        return self.uffd_feature("WP_ASYNC")

    @property
    def uffd_wp_unpopulated(self) -> bool:
        return self.uffd_feature("WP_UNPOPULATED")

    @property
    def uffd_usable(self) -> bool:
        """Some way to get a userfaultfd works for this caller."""
        return self.dev_userfaultfd or self.uffd_syscall

    @property
    def mem_tracking(self) -> str:
        """How pre-dump can find written pages: "soft-dirty", "uffd-wp" or "" (it cannot)."""
        if self.soft_dirty:
            return "soft-dirty"
        if self.uffd_dirty_tracking:
            return "uffd-wp"
        return ""

    def vdso_area(self, name: str):
        """The VdsoArea called `name` ("[vdso]", "[vvar]", "[vvar_vclock]") or None."""
        for area in self.vdso_areas:
            if area.name == name:
                return area
        return None

    def vdso_symbol(self, name: str):
        """Offset of vDSO symbol `name` (e.g. "__vdso_clock_gettime") or None."""
        for sym in self.vdso_symbols:
            if sym.name == name:
                return sym.offset
        return None

    def as_dict(self) -> dict:
        """Plain data (for --json): facts, derived flags, metadata, caller."""
        out = {}
        for name in FACT_NAMES:
            value = getattr(self, name)
            out[name] = [v._asdict() for v in value] if FACT_KIND[name] in LIST_KINDS else value
        out["uffd_wp_async"] = self.uffd_wp_async
        out["uffd_wp_unpopulated"] = self.uffd_wp_unpopulated
        out["mem_tracking"] = self.mem_tracking
        for name in ("boot_id", "kernel_release", "criu_py_version", "probed_euid",
                     "probed_at", "probe_seconds"):
            out[name] = getattr(self, name)
        out["probe_errors"] = dict(self.probe_errors)
        return out

    def __repr__(self):
        return f"<KerndatFacts from {self.source} {self.cache_path or '(no cache)'}>"


# Capabilities criu-py cares about: number -> name.
CAPS = {12: "CAP_NET_ADMIN", 19: "CAP_SYS_PTRACE", 21: "CAP_SYS_ADMIN",
        24: "CAP_SYS_RESOURCE", 40: "CAP_CHECKPOINT_RESTORE"}
CAP_NUMBER = {name: nr for nr, name in CAPS.items()}


class CallerFacts:
    """Who runs criu-py this time: never cached, read from /proc/self in this run, each
    group when first used (credentials and capabilities from /proc/self/status, cgroups,
    namespaces), so a load pays only for what its command asks.
    cgroups is a tuple of (hierarchy id, controllers, path) as in /proc/self/cgroup;
    namespaces maps a namespace name ("mnt", "pid", ...) to its inode number."""
    __slots__ = ("euid", "egid", "cap_eff", "cap_prm", "cap_bnd", "no_new_privs",
                 "seccomp", "cgroups", "namespaces")

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)

    def __getattr__(self, name):
        # Only reached for a slot not read yet: read its group now.
        if name not in CallerFacts.__slots__:
            raise AttributeError(name)
        from criu_py.kerndat import caller
        for field, value in caller.read_group(name).items():
            setattr(self, field, value)
        return object.__getattribute__(self, name)

    def has_cap(self, name: str) -> bool:
        """Whether the effective set holds capability `name` ("CAP_SYS_ADMIN")."""
        return bool(self.cap_eff >> CAP_NUMBER[name] & 1)

    @property
    def missing_caps(self) -> list[str]:
        return [name for nr, name in sorted(CAPS.items()) if not self.cap_eff >> nr & 1]

    def as_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__slots__}
        out["cgroups"] = [{"hierarchy": h, "controllers": c, "path": p} for h, c, p in self.cgroups]
        out["namespaces"] = dict(self.namespaces)
        out["missing_caps"] = self.missing_caps
        return out
