# What the freshly forked task does in Python before the PIE restorer takes over: its
# session and group, personality, file descriptors at their numbers, cwd/root/umask,
# comm, rlimits, timers, the fds the restorer needs parked at the top of the fd table,
# all signals blocked, and finally the restorer region built and entered. Runs in the
# child only.
import os
import resource
import signal
import struct
from dataclasses import dataclass, field

from criu_py import mem as M
from criu_py.errors import RestoreError

NR_PERSONALITY = 135
NR_PRCTL = 157
PR_SET_NAME = 15
SIGKILL, SIGSTOP = 9, 19


class FdTable:
    """Hands out fd numbers from the top of the fd table down, never one the task uses,
    so the tool's own fds (images, pages, mapped files, status pipe) stay clear of the
    task's, even when the task itself holds the highest allowed number."""

    def __init__(self, task_fds: set[int]):
        self.task_fds = task_fds
        self.next = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1
        self.parked: set[int] = set()

    def park(self, fd: int) -> int:
        while self.next in self.task_fds or self.next in self.parked:
            self.next -= 1
        if self.next < 3:
            raise RestoreError("no free fd numbers left for the restore's own files")
        new = self.next
        os.dup2(fd, new, inheritable=False)
        if new != fd:
            os.close(fd)
        self.parked.add(new)
        self.next -= 1
        return new


@dataclass
class RestoreContext:
    """State shared by the file kinds' restore halves (FILE_KINDS[...].restore_fd)."""
    pipe_data: dict
    images: object = None
    memory: object = None               # mem.restore.MemoryPlan (shared objects)
    _pipes: dict = field(default_factory=dict)
    raw_fds: list = field(default_factory=list)

    def shared_fd(self, shmid: int) -> int:
        """An O_RDWR fd of shared memory object `shmid`, made and filled on first use."""
        from criu_py.mem import shmem_restore
        obj = self.memory.shared[shmid]
        if obj.fd < 0:
            shmem_restore.make(obj, self.images)
        return obj.fd

    def memfd_shmid(self, inode_id: int) -> int:
        return self.memory.memfd_inodes[inode_id].shmid

    def pipe_ends(self, pipe_id: int, make) -> tuple[int, int]:
        if pipe_id not in self._pipes:
            ends = make()
            self._pipes[pipe_id] = ends
            self.raw_fds.extend(ends)
        return self._pipes[pipe_id]


def set_session(t, shell_job: bool) -> None:
    pid, sid, pgid = t.pid, t.pstree.sid, t.pstree.pgid
    if sid == pid:
        os.setsid()
        return
    if not shell_job:
        raise RestoreError(f"pid {pid} was not a session leader (sid {sid}): use --shell-job")
    if pgid == pid:
        os.setpgid(0, 0)


def set_personality(t) -> None:
    from criu_py.native import lib
    r = lib.criu_py_restore_syscall(NR_PERSONALITY, t.core.tc.personality, 0, 0, 0, 0, 0)
    if r < 0:
        raise OSError(-r, os.strerror(-r))


def make_shared_memory(t, fdt: FdTable) -> RestoreContext:
    """Every shared memory object, made and filled, its fd parked."""
    ctx = RestoreContext(pipe_data=t.pipe_data, images=t.images, memory=t.memory)
    for obj in t.memory.shared.values():
        ctx.shared_fd(obj.shmid)
        obj.fd = fdt.park(obj.fd)
    return ctx


def install_fds(t, fdt: FdTable, ctx: RestoreContext) -> None:
    """Open every file of fdinfo, park the results, then dup2 each to its number."""
    from criu_py.files import FD_CLOEXEC, FILE_KINDS
    kind_by_type = {ops.fd_type: ops for ops in FILE_KINDS.values()}
    opened: dict[int, int] = {}          # file id -> parked fd (dup'ed fds share one)
    for fi in t.fdinfos:
        if fi.id not in opened:
            fe = t.files[fi.id]
            ops = kind_by_type.get(fe.type)
            if ops is None:
                raise RestoreError(f"fd {fi.fd}: no restore for file type {fe.type}")
            opened[fi.id] = fdt.park(ops.restore_fd(ctx, fe, fi))
    for fd in ctx.raw_fds:
        os.close(fd)
    for fi in t.fdinfos:
        os.dup2(opened[fi.id], fi.fd, inheritable=not fi.flags & FD_CLOEXEC)
    for fd in opened.values():
        os.close(fd)
        fdt.parked.discard(fd)


def set_fs(t) -> None:
    """cwd, then root (paths are as the dump saw them, from outside any chroot)."""
    os.chdir(t.reg(t.fs.cwd_id, "cwd").name)
    root = t.reg(t.fs.root_id, "root").name
    if root != "/":
        os.chroot(root)
    if t.fs.HasField("umask"):
        os.umask(t.fs.umask)


def set_scheduling_and_timers(t) -> None:
    """Nice value, scheduling policy and the interval timers (the kernel keeps them
    across the restorer; an armed ITIMER_REAL fires after the task is back)."""
    th = t.core.thread_core
    if th.HasField("sched_nice"):
        os.setpriority(os.PRIO_PROCESS, 0, th.sched_nice)
    if th.HasField("sched_policy") and th.sched_policy not in (0,):
        os.sched_setscheduler(0, th.sched_policy, os.sched_param(th.sched_prio))
    if t.core.tc.HasField("timers"):
        for which, name in ((signal.ITIMER_REAL, "real"), (signal.ITIMER_VIRTUAL, "virt"),
                            (signal.ITIMER_PROF, "prof")):
            tm = getattr(t.core.tc.timers, name)
            value = tm.vsec + tm.vusec / 1e6
            if value:
                signal.setitimer(which, value, tm.isec + tm.iusec / 1e6)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one while fds are installed (the task's own
    limits come back in set_rlimits at the end)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def set_rlimits(t) -> None:
    """The task's resource limits, best effort: without CAP_SYS_RESOURCE a hard limit
    above ours cannot be set, and then ours stays (documented in image-contract.md)."""
    if not t.core.tc.HasField("rlimits"):
        return
    inf = 2**64 - 1
    for res, rl in enumerate(t.core.tc.rlimits.rlimits):
        cur = resource.RLIM_INFINITY if rl.cur == inf else rl.cur
        hi = resource.RLIM_INFINITY if rl.max == inf else rl.max
        try:
            resource.setrlimit(res, (cur, hi))
        except (OSError, ValueError):
            pass


def set_comm(t) -> None:
    from criu_py.native import ffi, lib
    name = ffi.new("char[16]", t.core.tc.comm.encode()[:15])
    lib.criu_py_restore_syscall(NR_PRCTL, PR_SET_NAME, int(ffi.cast("uintptr_t", name)), 0, 0, 0, 0)


def open_restorer_fds(t, fdt: FdTable) -> tuple[int, int]:
    """Mapped files, the executable and the pages file, parked. Returns (pages fd, exe fd)."""
    for mf in t.memory.files.values():
        if mf.shmid is not None:
            mf.fd = t.memory.shared[mf.shmid].fd
            continue
        try:
            mf.fd = fdt.park(os.open(mf.path, mf.flags | os.O_CLOEXEC))
        except OSError as exc:
            raise RestoreError(f"cannot open mapped file {mf.path}: {exc.strerror}") from None
    exe = t.reg(t.mm.exe_file_id, "the exe link").name
    st, own = os.stat(exe), os.stat("/proc/self/exe")
    if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
        # Same file as our own executable (a Python task restored by criu-py): the link
        # is right already, and the kernel refuses to "replace" it while it is mapped.
        exe_fd = -1
    else:
        exe_fd = fdt.park(os.open(exe, os.O_RDONLY | os.O_CLOEXEC))
    pages_fd = fdt.park(t.images.open_raw(t.memory.pages_name))
    return pages_fd, exe_fd


def close_other_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def sigactions(core) -> dict:
    """signo -> (handler, flags, restorer, mask) from the core (64 entries as criu-py
    writes them, or 62 without SIGKILL/SIGSTOP as upstream does)."""
    acts = list(core.tc.sigactions)
    if len(acts) == 64:
        signos = range(1, 65)
    else:
        signos = [s for s in range(1, 65) if s not in (SIGKILL, SIGSTOP)][:len(acts)]
    return {s: (a.sigaction, a.flags, a.restorer, a.mask)
            for s, a in zip(signos, acts) if s not in (SIGKILL, SIGSTOP)}


def task_registers(core):
    from criu_py import arch_x86
    from criu_py.restore.sigframe import TaskRegisters
    ti = core.thread_info
    gp = arch_x86.gpregs_from_entry(ti.gpregs)
    xsave = arch_x86.fpregs_from_entry(ti.fpregs)
    if len(xsave) < 576:
        raise RestoreError("core: the dump holds no xsave state")
    altstack = (0, 2, 0)                # SS_DISABLE
    if core.HasField("thread_core") and core.thread_core.HasField("sas"):
        sas = core.thread_core.sas
        if sas.ss_size and not sas.ss_flags & 2:
            altstack = (sas.ss_sp, sas.ss_flags & 0x80000000, sas.ss_size)   # keep SS_AUTODISARM
    return TaskRegisters(gp=gp, xsave=xsave, sigmask=core.tc.blk_sigset, altstack=altstack)


def mm_map(mm) -> dict:
    auxv = list(mm.mm_saved_auxv)
    if len(auxv) % 2:
        auxv.append(0)
    if auxv[-2:] != [0, 0]:
        auxv += [0, 0]
    return {"start_code": mm.mm_start_code, "end_code": mm.mm_end_code,
            "start_data": mm.mm_start_data, "end_data": mm.mm_end_data,
            "start_brk": mm.mm_start_brk, "brk": mm.mm_brk, "start_stack": mm.mm_start_stack,
            "arg_start": mm.mm_arg_start, "arg_end": mm.mm_arg_end,
            "env_start": mm.mm_env_start, "env_end": mm.mm_env_end, "auxv": auxv}


def build_plan(t, pages_fd: int, exe_fd: int, status_fd: int, fdt: FdTable, trap: bool):
    from criu_py.mem.restore import pie_vmas
    from criu_py.restore.pie import PiePlan
    core = t.core
    rseq = None
    if core.HasField("thread_core") and core.thread_core.HasField("rseq_entry"):
        r = core.thread_core.rseq_entry
        if r.rseq_abi_pointer:
            rseq = (r.rseq_abi_pointer, r.rseq_abi_size, r.signature)
    regs = task_registers(core)
    return PiePlan(
        vmas=pie_vmas(t.memory), iovs=list(t.memory.iovs), pages_fd=pages_fd,
        regs=regs, status_fd=status_fd, vdso_vvar=t.memory.vdso_vvar,
        frame_on_stack=trap,
        sigactions=sigactions(core), new_rseq=rseq,
        clear_child_tid=core.thread_info.clear_tid_addr, mm_map=mm_map(t.mm), exe_fd=exe_fd,
        close_fds=sorted(fdt.parked - {status_fd}))


def frame_fits_on_stack(t, regs) -> bool:
    """The sigframe can go below the task's sp (inside one writable private VMA)."""
    from criu_py.restore.pie import frame_bytes, stack_frame_addr
    sp = regs.gp["sp"]
    lo = stack_frame_addr(sp, frame_bytes(regs))
    return any(v.start <= lo and sp <= v.end and v.prot & M.PROT_WRITE
               and not v.status & (M.VMA_FILE_SHARED | M.VMA_ANON_SHARED) for v in t.memory.vmas)


def enter_restorer(t, plan) -> None:
    from criu_py.native import lib
    from criu_py.restore import pie
    blob = lib.criu_py_pie_blob_end() - lib.criu_py_pie_blob_start()
    size = pie.region_size(plan, blob)
    busy = pie.current_layout() + [(v.start, v.end) for v in t.mm.vmas
                                   if not v.status & M.VMA_AREA_VSYSCALL]
    base = pie.free_gap(size, busy)
    pie.map_region(base, size)
    entry, args, stack = pie.prepare(plan, base, size)
    pie.enter(entry, args, stack)


def run_child(t, status_fd: int, go_fd: int, shell_job: bool, trap: bool) -> None:
    """The whole child side; reports the failing stage through status_fd. Starts once
    the parent says go (it has seized us by then when `trap`)."""
    from criu_py.log import log
    stage = "start"
    try:
        if os.read(go_fd, 1) != b"g":
            os._exit(1)
        os.close(go_fd)
        block_signals()        # traced: a delivered signal would stop us, unseen
        stage = "cgroups"      # issue 10: into its cgroups before anything else
        if t.cg_yard is not None:
            from criu_py.cgroup.restore import task_cg_set
            t.cg_yard.move(0, task_cg_set(t.core))
        raise_fd_limit()
        fdt = FdTable({fi.fd for fi in t.fdinfos})
        status_fd = fdt.park(status_fd)
        t.images.dirfd = fdt.park(t.images.dirfd)
        log.disabled = True            # its fds are about to be replaced by the task's
        stage = "session"
        set_session(t, shell_job)
        stage = "personality"
        set_personality(t)
        stage = "shared memory"
        ctx = make_shared_memory(t, fdt)
        stage = "files"
        install_fds(t, fdt, ctx)
        stage = "restorer fds"
        pages_fd, exe_fd = open_restorer_fds(t, fdt)     # paths as the dump saw them
        os.close(t.images.dirfd)
        fdt.parked.discard(t.images.dirfd)
        close_other_fds({fi.fd for fi in t.fdinfos} | fdt.parked | {status_fd})
        stage = "cwd/root/umask"
        set_fs(t)
        stage = "comm"
        set_comm(t)
        stage = "scheduling/timers"
        set_scheduling_and_timers(t)      # after blocking: an early SIGALRM stays pending
        stage = "rlimits"
        set_rlimits(t)
        stage = "restorer set-up"
        from criu_py.restore.sigframe import request_xfeatures
        request_xfeatures(task_registers(t.core).xsave)
        plan = build_plan(t, pages_fd, exe_fd, status_fd, fdt, trap)
        plan.trap_before_sigreturn = trap
        enter_restorer(t, plan)
    except RestoreError as exc:
        _report(status_fd, f"{stage}: {exc}")
    except OSError as exc:
        _report(status_fd, f"{stage}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""))
    except BaseException as exc:   # noqa: BLE001 - the child must report, never unwind
        _report(status_fd, f"{stage}: {exc!r}")
    os._exit(1)


def _report(fd: int, text: str) -> None:
    data = ("T" + text.replace("\n", " ")).encode()
    try:
        os.write(fd, struct.pack("<I", len(data)) + data)
    except OSError:
        pass
