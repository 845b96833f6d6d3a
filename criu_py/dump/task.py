# The per-task images other than memory and files: core-PID (registers, signal state,
# creds, rseq, timers, rlimits), ids-PID, mm-PID (mm fields, auxv, VMAs), fs-PID,
# pstree and inventory. Each build_* turns what the dump collected into messages.
from criu_py import arch_x86
from criu_py.errors import check_errno
from criu_py.proc import Stat, Status

TASK_ALIVE = 1
NS_NAMES = ("pid", "net", "ipc", "uts", "time", "mnt", "user", "cgroup")
NS_FIELDS = {"pid": "pid_ns_id", "net": "net_ns_id", "ipc": "ipc_ns_id", "uts": "uts_ns_id",
             "mnt": "mnt_ns_id", "user": "user_ns_id", "cgroup": "cgroup_ns_id",
             "time": "time_ns_id"}
# Kernel-object ids of the one task (vm, files, fs, sighand): fdinfo-<files_id>.img.
TASK_OBJ_ID = 1


def robust_list(pid: int) -> tuple[int, int]:
    """get_robust_list(2) of the task: (head, len)."""
    from criu_py.native import ffi, lib
    head = ffi.new("uint64_t *")
    length = ffi.new("uint64_t *")
    ret = lib.criu_py_raw_syscall6(274, pid, int(ffi.cast("uintptr_t", head)),
                                   int(ffi.cast("uintptr_t", length)), 0, 0, 0)
    check_errno(ret, "get_robust_list", pid)
    return head[0], length[0]


def _caps(value: int) -> list[int]:
    return [value & 0xFFFFFFFF, value >> 32]


def build_core(ctx):
    """core_entry of the task from ctx (regs, xstate, parasite info, /proc state)."""
    from criu_py.images.pb import core_pb2
    st: Stat = ctx.stat
    status: Status = ctx.status
    par = ctx.parasite
    core = core_pb2.core_entry()
    core.mtype = core_pb2.core_entry.X86_64

    ti = core.thread_info
    ti.clear_tid_addr = par.clear_tid_addr
    arch_x86.gpregs_to_entry(arch_x86.regs_for_image(ctx.gpregs), ti.gpregs)
    arch_x86.fpregs_to_entry(ctx.xstate, ti.fpregs)
    for n in (12, 13, 14):      # GDT TLS slots: unused by 64-bit code, recorded empty
        d = ti.tls.add()
        d.entry_number, d.base_addr, d.limit = n, 0, 0
        d.seg_32bit = d.contents_h = d.contents_l = d.limit_in_pages = d.usable = False
        d.read_exec_only = d.seg_not_present = True

    tc = core.tc
    tc.task_state = TASK_ALIVE
    tc.exit_code = 0
    tc.personality = ctx.personality
    tc.flags = st.flags
    tc.blk_sigset = ctx.sigmask
    tc.comm = st.comm
    for name, (isec, iusec, vsec, vusec) in zip(("real", "virt", "prof"), par.itimers):
        t = getattr(tc.timers, name)
        t.isec, t.iusec, t.vsec, t.vusec = isec, iusec, vsec, vusec
    for rl in ctx.rlimits:
        e = tc.rlimits.rlimits.add()
        e.cur, e.max = rl.cur, rl.max
    tc.signals_s.SetInParent()
    for raw in ctx.signals_shared:
        tc.signals_s.signals.add().siginfo = raw
    tc.loginuid = ctx.loginuid
    tc.oom_score_adj = ctx.oom_score_adj
    for sa in par.sigactions:
        e = tc.sigactions.add()
        e.sigaction, e.flags, e.restorer, e.mask = sa.handler, sa.flags, sa.restorer, sa.mask
        e.compat_sigaction = False
    tc.child_subreaper = par.child_subreaper
    cg_set = ctx.cg_sets.get(ctx.pid)
    if cg_set:                    # issue 10: cgroups; upstream 4.2 reads thread_core's
        tc.cg_set = core.thread_core.cg_set = cg_set

    th = core.thread_core
    th.futex_rla, th.futex_rla_len = ctx.robust_list
    th.sched_nice = ctx.sched_nice
    th.sched_policy = ctx.sched_policy
    th.sched_prio = ctx.sched_prio
    th.blk_sigset = ctx.sigmask
    if par.pdeath_sig:
        th.pdeath_sig = par.pdeath_sig
    ss_sp, ss_flags, ss_size = par.sas
    th.sas.ss_sp, th.sas.ss_size, th.sas.ss_flags = ss_sp, ss_size, ss_flags
    th.signals_p.SetInParent()
    for raw in ctx.signals_private:
        th.signals_p.signals.add().siginfo = raw
    cr = th.creds
    cr.uid, cr.euid, cr.suid, cr.fsuid = status.uids
    cr.gid, cr.egid, cr.sgid, cr.fsgid = status.gids
    cr.cap_inh.extend(_caps(status.cap_inh))
    cr.cap_prm.extend(_caps(status.cap_prm))
    cr.cap_eff.extend(_caps(status.cap_eff))
    cr.cap_bnd.extend(_caps(status.cap_bnd))
    cr.cap_amb.extend(_caps(status.cap_amb))
    cr.secbits = par.secbits
    cr.groups.extend(status.groups)
    cr.no_new_privs = status.no_new_privs
    th.comm = st.comm
    if ctx.rseq:
        r = th.rseq_entry
        r.rseq_abi_pointer = ctx.rseq["pointer"]
        r.rseq_abi_size = ctx.rseq["size"]
        r.signature = ctx.rseq["signature"]
    return core


def fill_ids(ids, ns_ids: dict) -> None:
    ids.vm_id = ids.files_id = ids.fs_id = ids.sighand_id = TASK_OBJ_ID
    for name, value in ns_ids.items():
        setattr(ids, NS_FIELDS[name], value)


def namespace_ids(pid: int) -> dict:
    """Small ids for the task's namespaces, numbered in NS_NAMES order (as upstream does)."""
    from criu_py.proc import read_ns_ids
    inodes = read_ns_ids(pid)
    return {name: i + 1 for i, name in enumerate(n for n in NS_NAMES if n in inodes)}


def build_ids(ctx):
    from criu_py.images.pb import core_pb2
    ids = core_pb2.task_kobj_ids_entry()
    fill_ids(ids, ctx.ns_ids)
    return ids


def build_inventory(ctx):
    from criu_py.images.pb import inventory_pb2
    inv = inventory_pb2.inventory_entry()
    inv.img_version = 2
    inv.fdinfo_per_id = True
    fill_ids(inv.root_ids, ctx.ns_ids)
    inv.ns_per_id = True
    from criu_py.cgroup import ROOT_CG_SET
    inv.root_cg_set = ROOT_CG_SET     # issue 10: criu-py's own cgroup set
    inv.lsmtype = inventory_pb2.NO_LSM
    inv.network_lock_method = 0
    try:
        with open("/proc/uptime") as f:
            inv.dump_uptime = int(float(f.read().split()[0]) * 1e6)
    except OSError:
        pass
    return inv


def build_pstree(ctx):
    from criu_py.images.pb import pstree_pb2
    e = pstree_pb2.pstree_entry()
    e.pid = ctx.pid
    e.ppid = 0
    e.pgid = ctx.stat.pgid
    e.sid = ctx.stat.sid
    e.threads.append(ctx.pid)
    return e


def build_fs(ctx):
    from criu_py.images.pb import fs_pb2
    e = fs_pb2.fs_entry()
    e.cwd_id = ctx.cwd_id
    e.root_id = ctx.root_id
    e.umask = ctx.status.umask
    return e


def build_mm(ctx, vma_entries: list):
    from criu_py.images.pb import mm_pb2
    st: Stat = ctx.stat
    mm = mm_pb2.mm_entry()
    mm.mm_start_code, mm.mm_end_code = st.start_code, st.end_code
    mm.mm_start_data, mm.mm_end_data = st.start_data, st.end_data
    mm.mm_start_stack = st.start_stack
    mm.mm_start_brk = st.start_brk
    mm.mm_brk = ctx.parasite.brk
    mm.mm_arg_start, mm.mm_arg_end = st.arg_start, st.arg_end
    mm.mm_env_start, mm.mm_env_end = st.env_start, st.env_end
    mm.exe_file_id = ctx.exe_id
    mm.mm_saved_auxv.extend(ctx.auxv)
    mm.vmas.extend(vma_entries)
    mm.dumpable = ctx.parasite.dumpable
    mm.thp_disabled = ctx.parasite.thp_disabled
    return mm


def build_stats(ctx):
    from criu_py.images.pb import stats_pb2
    s = stats_pb2.stats_entry()
    d = s.dump
    d.freezing_time = ctx.times.get("freezing", 0)
    d.frozen_time = ctx.times.get("frozen", 0)
    d.memdump_time = ctx.page_stats.memdump_us if ctx.page_stats else 0
    d.memwrite_time = ctx.page_stats.memwrite_us if ctx.page_stats else 0
    d.pages_scanned = ctx.page_stats.pages_scanned if ctx.page_stats else 0
    d.pages_skipped_parent = 0
    d.pages_written = ctx.page_stats.pages_written if ctx.page_stats else 0
    d.pages_lazy = 0
    d.shpages_scanned = ctx.shmem_stats.get("scanned", 0)
    d.shpages_skipped_parent = 0
    d.shpages_written = ctx.shmem_stats.get("written", 0)
    return s
