# The per-task images other than memory and files: core-TID per thread (registers,
# signal state, creds, rseq; the leader's also timers, rlimits, sigactions), ids-PID,
# mm-PID (mm fields, auxv, VMAs), fs-PID per process, pstree and inventory for the tree.
# Each build_* turns what the dump collected into messages.
from criu_py import arch_x86
from criu_py.images import set_str
from criu_py.errors import check_errno
from criu_py.proc import Stat, Status

TASK_ALIVE = 1
NS_NAMES = ("pid", "net", "ipc", "uts", "time", "mnt", "user", "cgroup")
NS_FIELDS = {"pid": "pid_ns_id", "net": "net_ns_id", "ipc": "ipc_ns_id", "uts": "uts_ns_id",
             "mnt": "mnt_ns_id", "user": "user_ns_id", "cgroup": "cgroup_ns_id",
             "time": "time_ns_id"}
# The dumping tool's own kernel-object ids (vm, files, fs, sighand) in inventory's
# root_ids; the tasks' are numbered from 2 (dump.tree), as upstream does.
ROOT_KOBJ_ID = 1


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


SIGKILL, SIGSTOP = 9, 19
TASK_DEAD, TASK_STOPPED = 2, 3


def build_core(proc, thread):
    """core_entry of one thread from what the dump collected; the leader's core also
    holds the process-wide part (tc: sigactions, timers, rlimits, shared signals, ...)."""
    from criu_py.images.pb import core_pb2
    core = core_pb2.core_entry()
    core.mtype = core_pb2.core_entry.X86_64
    _fill_thread_info(core.thread_info, thread)
    _fill_thread_core(core.thread_core, thread)
    if thread.tid == proc.pid:
        _fill_task_core(core.tc, proc)
    cg_sets = proc.dump.cg_sets
    cg_set = cg_sets.get(thread.tid) or cg_sets.get(proc.pid)
    if cg_set:                    # upstream 4.2 reads thread_core's; tc's for older readers
        core.thread_core.cg_set = cg_set
        if thread.tid == proc.pid:
            core.tc.cg_set = cg_sets.get(proc.pid) or cg_set
    return core


def build_zombie_core(p):
    """A zombie's core: only its name, state and wait status, as upstream writes it."""
    from criu_py.images.pb import core_pb2
    core = core_pb2.core_entry()
    core.mtype = core_pb2.core_entry.X86_64
    tc = core.tc
    tc.task_state = TASK_DEAD
    tc.exit_code = p.exit_code
    tc.personality = 0
    tc.flags = 0
    tc.blk_sigset = 0
    set_str(tc, "comm", p.comm)
    return core


def _fill_thread_info(ti, thread) -> None:
    ti.clear_tid_addr = thread.info.clear_tid_addr
    arch_x86.gpregs_to_entry(arch_x86.regs_for_image(thread.gpregs), ti.gpregs)
    arch_x86.fpregs_to_entry(thread.xstate, ti.fpregs)
    for n in (12, 13, 14):      # GDT TLS slots: unused by 64-bit code, recorded empty
        d = ti.tls.add()
        d.entry_number, d.base_addr, d.limit = n, 0, 0
        d.seg_32bit = d.contents_h = d.contents_l = d.limit_in_pages = d.usable = False
        d.read_exec_only = d.seg_not_present = True


def _fill_thread_core(th, thread) -> None:
    status: Status = thread.status
    th.futex_rla, th.futex_rla_len = thread.robust_list
    th.sched_nice = thread.sched_nice
    th.sched_policy = thread.sched_policy
    th.sched_prio = thread.sched_prio
    th.blk_sigset = thread.sigmask
    if thread.info.pdeath_sig:
        th.pdeath_sig = thread.info.pdeath_sig
    ss_sp, ss_flags, ss_size = thread.info.sas
    th.sas.ss_sp, th.sas.ss_size, th.sas.ss_flags = ss_sp, ss_size, ss_flags
    th.signals_p.SetInParent()
    for raw in thread.signals_private:
        th.signals_p.signals.add().siginfo = raw
    cr = th.creds
    cr.uid, cr.euid, cr.suid, cr.fsuid = status.uids
    cr.gid, cr.egid, cr.sgid, cr.fsgid = status.gids
    cr.cap_inh.extend(_caps(status.cap_inh))
    cr.cap_prm.extend(_caps(status.cap_prm))
    cr.cap_eff.extend(_caps(status.cap_eff))
    cr.cap_bnd.extend(_caps(status.cap_bnd))
    cr.cap_amb.extend(_caps(status.cap_amb))
    cr.secbits = thread.info.secbits
    cr.groups.extend(status.groups)
    cr.no_new_privs = status.no_new_privs
    set_str(th, "comm", thread.comm)
    if thread.rseq:
        r = th.rseq_entry
        r.rseq_abi_pointer = thread.rseq["pointer"]
        r.rseq_abi_size = thread.rseq["size"]
        r.signature = thread.rseq["signature"]


def _fill_task_core(tc, proc) -> None:
    st: Stat = proc.stat
    par = proc.parasite
    tc.task_state = TASK_ALIVE
    if proc.proc.stop_signo:
        tc.task_state = TASK_STOPPED
        tc.stop_signo = proc.proc.stop_signo
    tc.exit_code = 0
    tc.personality = proc.personality
    tc.flags = st.flags
    tc.blk_sigset = proc.leader.sigmask
    set_str(tc, "comm", proc.leader.comm)
    for name, (isec, iusec, vsec, vusec) in zip(("real", "virt", "prof"), par.itimers):
        t = getattr(tc.timers, name)
        t.isec, t.iusec, t.vsec, t.vusec = isec, iusec, vsec, vusec
    tc.timers.posix.extend(proc.posix_timers)
    for rl in proc.rlimits:
        e = tc.rlimits.rlimits.add()
        e.cur, e.max = rl.cur, rl.max
    tc.signals_s.SetInParent()
    for raw in proc.signals_shared:
        tc.signals_s.signals.add().siginfo = raw
    tc.loginuid = proc.loginuid
    tc.oom_score_adj = proc.oom_score_adj
    tc.MergeFromString(_sigactions_wire(par.sigactions))
    tc.child_subreaper = par.child_subreaper


_SIGACTIONS_WIRE = {}


def _sigactions_wire(sigactions) -> bytes:
    """task_core_entry.sigactions on the wire: 62 entries, signals 1..64 without SIGKILL
    and SIGSTOP (what upstream writes and insists on reading). Built once per distinct
    set: the processes of a tree mostly share theirs."""
    key = tuple((sa.handler, sa.flags, sa.restorer, sa.mask) for sa in sigactions)
    wire = _SIGACTIONS_WIRE.get(key)
    if wire is None:
        from criu_py.images.pb import core_pb2
        tc = core_pb2.task_core_entry()
        add = tc.sigactions.add
        for sig, (handler, flags, restorer, mask) in enumerate(key, start=1):
            if sig not in (SIGKILL, SIGSTOP):
                add(sigaction=handler, flags=flags, restorer=restorer, mask=mask,
                    compat_sigaction=False)
        wire = _SIGACTIONS_WIRE[key] = tc.SerializePartialToString()
    return wire


def fill_ids(ids, ns_ids: dict, kobj: dict | None = None) -> None:
    """kernel-object ids (vm, files, fs, sighand) and namespace ids. Without kobj: the
    dumping tool's own ids, 1 each (inventory's root_ids); tasks' ids start at 2."""
    kobj = kobj or {}
    ids.vm_id = kobj.get("vm", ROOT_KOBJ_ID)
    ids.files_id = kobj.get("files", ROOT_KOBJ_ID)
    ids.fs_id = kobj.get("fs", ROOT_KOBJ_ID)
    ids.sighand_id = kobj.get("sighand", ROOT_KOBJ_ID)
    for name, value in ns_ids.items():
        setattr(ids, NS_FIELDS[name], value)


def namespace_ids(pid: int, inodes: dict | None = None) -> dict:
    """Small ids for the task's namespaces, numbered in NS_NAMES order (as upstream does);
    inodes: its proc.read_ns_ids() when read already."""
    from criu_py.proc import read_ns_ids
    if inodes is None:
        inodes = read_ns_ids(pid)
    return {name: i + 1 for i, name in enumerate(n for n in NS_NAMES if n in inodes)}


def build_ids(proc):
    from criu_py.images.pb import core_pb2
    ids = core_pb2.task_kobj_ids_entry()
    fill_ids(ids, proc.ns_ids, proc.proc.kobj)
    return ids


PRE_DUMP_READ = 2          # upstream's pre_dump_mode: memory read, not spliced


def build_inventory(ctx):
    from criu_py.images.pb import inventory_pb2
    inv = inventory_pb2.inventory_entry()
    inv.img_version = 2
    inv.fdinfo_per_id = True
    fill_ids(inv.root_ids, ctx.procs[0].ns_ids or namespace_ids(ctx.pid))
    from criu_py.cgroup import ROOT_CG_SET
    inv.root_cg_set = ROOT_CG_SET     # criu-py's own cgroup set
    inv.ns_per_id = True
    inv.lsmtype = inventory_pb2.NO_LSM
    from criu_py.files.sockets.netlock import DEFAULT, METHODS, SKIP
    # the method that locked connections; none locked: "skip", so no restore (criu-py's
    # or CRIU's) goes looking for a lock that was never taken
    locked = ctx.sockets is not None and ctx.sockets.lock is not None and ctx.sockets.lock.locked
    inv.network_lock_method = METHODS[ctx.opts.get("network_lock") or DEFAULT] if locked else SKIP
    if ctx.run_id:
        inv.dump_criu_run_id = ctx.run_id
    if ctx.opts.get("tcp_close"):
        inv.tcp_close = True
    # the freeze's time since boot (microseconds): a task started later under a pid of
    # the tree is not the one these images hold (upstream's pid-reuse check)
    inv.dump_uptime = ctx.dump_uptime
    if ctx.opts.get("pre_dump"):
        inv.pre_dump_mode = PRE_DUMP_READ
    return inv


def build_pstree(tree) -> list:
    """One pstree_entry per process (zombies too), root first, depth first."""
    from criu_py.images.pb import pstree_pb2
    out = []
    for p in tree.order:
        e = pstree_pb2.pstree_entry()
        e.pid = p.pid
        e.ppid = 0 if p.pid == tree.root else p.ppid
        e.pgid = p.pgid
        e.sid = p.sid
        e.threads.extend(p.threads)
        out.append(e)
    return out


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
    # Without the AT_NULL pair and at most AT_VECTOR_SIZE words: upstream refuses more.
    auxv = list(ctx.auxv)
    while len(auxv) >= 2 and auxv[-2] == 0:
        auxv = auxv[:-2]
    mm.mm_saved_auxv.extend(auxv[:AT_VECTOR_SIZE])
    mm.vmas.extend(vma_entries)
    mm.dumpable = ctx.parasite.dumpable
    mm.thp_disabled = ctx.parasite.thp_disabled
    return mm


AT_VECTOR_SIZE = 44


def build_stats(ctx):
    from criu_py.images.pb import stats_pb2
    s = stats_pb2.stats_entry()
    d = s.dump
    d.freezing_time = ctx.times.get("freezing", 0)
    d.frozen_time = ctx.times.get("frozen", 0)
    d.memdump_time = ctx.page_stats.memdump_us if ctx.page_stats else 0
    d.memwrite_time = ctx.page_stats.memwrite_us if ctx.page_stats else 0
    d.pages_scanned = ctx.page_stats.pages_scanned if ctx.page_stats else 0
    d.pages_skipped_parent = ctx.page_stats.pages_parent if ctx.page_stats else 0
    d.pages_written = ctx.page_stats.pages_written if ctx.page_stats else 0
    d.pages_lazy = 0
    d.shpages_scanned = ctx.shmem_stats.get("scanned", 0)
    d.shpages_skipped_parent = 0
    d.shpages_written = ctx.shmem_stats.get("written", 0)
    if ctx._irmap is not None:
        d.irmap_resolve = int(ctx._irmap.seconds * 1e6)
    return s
