# `criu-py restore`: bring a dumped tree back: every process with its PID, parent,
# session and group, every thread with its TID, memory (shared copy-on-write where it was),
# registers, files and signal state. restore_tasks() is the checklist: read and check
# every image, plan the tree, fork the root with its PID (each task forks its own
# children, restore/task.py), walk every task through the stages of the shared sync page
# (restore/sync.py), then release the tree from its restorers and wait for the root
# (or return at once with -d). A failure at any stage kills every task created and
# reports one line naming the task and the stage.
import contextlib
import os
import signal
import time

from criu_py.errors import CriuError, RestoreError
from criu_py.log import log
from criu_py.log import step as log_step

PR_SET_CHILD_SUBREAPER = 36


def _step(name: str):
    return log_step("restore", name)


class Restore:
    """The restore command's state; every task inherits it through fork."""

    def __init__(self, opts: dict):
        self.opts = opts
        self.tree = None              # restore.images.TreeImages
        self.images = None            # its ImageDir
        self.plan = None              # restore.tree.TreePlan
        self.sync = None              # restore.sync.SyncPage
        self.fds = None               # restore.task.FdSpace
        self.status_r = self.status_w = -1
        self.command_pidfd = -1       # parked: a pidfd of this command, for the tasks
        self.resource_fds = {}        # filled by each task for itself after the fork
        self.trap = {}                # pid -> its restorer region is removed with ptrace
        self.host_creds = None
        self.command_pid = os.getpid()
        self.cg_yard = None           # criu_py.cgroup.restore.Yard
        self.root_pid = 0
        self.running = False          # the tree was let go: do not kill it
        self.started = self.fork_started = 0.0      # time.monotonic(), for stats-restore
        self.forking_us = 0
        self.regions = {}             # pid -> (start, length) of its restorer region
        self.messages = []            # one-line failures the tasks reported
        self.failures = []            # failure records of the restorers
        self.desc_locks = {}          # files.img id -> flock/OFD entries to take when opened
        self.posix_locks = {}         # pid -> POSIX lock entries its restorer takes
        self.caller_tty = -1          # parked: our stdin when it is a terminal (--shell-job)
        self.inherit = {}             # --inherit-fd: CRIU's name of a file -> the caller's fd
        self.inherit_fds = {}         # and -> its parked copy, for the tasks
        self.ghosts = []              # paths of the deleted files recreated for the restore
        self.ghost_dirs = []          # and of the directories, in the order made
        self.sysv = None              # criu_py.sysvipc.Segments
        self.lazy_dir = None          # restore --lazy-pages: the daemon's work dir (absolute)
        self.pages_check = None       # integrity.PagesCheck: the pages files, in a thread
        self.restorer_parts = {}      # pid -> restore.task.RestorerParts
        self.cg_moves = {}            # pid -> (its cgroup set, its parent's): cg_yard.move()
        self.fd_tables = {}           # pid -> restore.task.fd_table() of each fd table owner
        self._status_buf = b""

    def parent_of(self, t) -> int:
        """The pid that forks task t: its parent's, or ours for the root."""
        return t.parent.pid if t.parent is not None else self.command_pid


def restore_tasks(opts: dict) -> int:
    from criu_py import scripts
    from criu_py.images import integrity
    from criu_py.restore import images as restore_images
    lazy = bool(opts.get("lazy_pages"))
    rs = Restore(opts)
    rs.started = time.monotonic()
    with contextlib.ExitStack() as stack:
        # the pages files are checked in a thread while the tree is built and fills its
        # memory (the rest is checked now); nothing runs and no connection is let go
        # before they pass.
        # --lazy-pages: the pages files piece by piece (PagesCheck.deferred, the daemon)
        rs.pages_check = stack.enter_context(
            integrity.verifying(opts.get("images_dir") or ".", opts, lazy=lazy))
        if lazy:
            with _step("lazy-pages daemon"):
                check_lazy_daemon(rs)
            stack.push(lambda *exc: abort_lazy_daemon(rs, exc[1]))
        if opts.get("action_script"):
            with _step("pre-restore scripts"):
                scripts.run(opts, "pre-restore")
        with _step("read and check images"):
            rs.inherit = inherited_fds(opts.get("inherit_fd") or ())
            rs.tree = restore_images.load(opts.get("images_dir") or ".", lazy=lazy,
                                          checked=rs.pages_check.checked,
                                          inherited=frozenset(rs.inherit))
            rs.pages_check.checked = None
            rs.images = rs.tree.images
        stack.callback(rs.tree.close)
        if lazy:
            with _step("check the pages read here"):
                check_pages_read(rs, rs.pages_check.deferred)
        with _step("plan the tree"):
            plan_tree(rs)
        with _step("check pids, vdso, credentials"):
            check_pids_free(rs)
            check_vdso(rs)
            plan_region_removal(rs)
            rs.host_creds = host_creds()
            plan_file_locks(rs)
        with _step("plan the restorers"):
            plan_restorers(rs)
        with _step("sockets"):
            check_sockets(rs)
        with _step("deleted files"):
            stack.callback(remove_ghosts, rs)
            make_ghosts(rs)
        with _step("SysV shared memory"):
            make_sysv_segments(rs, stack)
        with _step("cgroup yard"):               # mounted until the end
            from criu_py.cgroup.restore import open_yard
            rs.cg_yard = stack.enter_context(open_yard(opts, rs.images))
        if opts.get("pidfile"):
            write_pidfile(opts["pidfile"], rs, stack)
        with _step("sync page, status pipe, fd space"):
            prepare_shared(rs, stack)
        with _step("load modules"):
            load_modules(rs)
        with _step("fork the root"):
            rs.fork_started = time.monotonic()
            fork_root(rs, stack)
        rs.pages_check.start()          # a thread only now: our one fork must not copy it
        with _step("stages"):
            run_stages(rs)
        with _step("pages files checked"):
            rs.pages_check.wait()
        if opts.get("action_script"):
            with _step("post-restore, pre-resume scripts"):
                scripts.run(opts, "post-restore", rs.root_pid)   # fails: the tree is killed
                scripts.report(opts, "pre-resume", rs.root_pid)
        with _step("release the tree"):
            release_tree(rs)
        if lazy:
            with _step("lazy-pages: the tasks run"):
                tell_lazy_daemon(rs)
        if opts.get("action_script"):
            with _step("post-resume scripts"):
                scripts.report(opts, "post-resume", rs.root_pid)
        with _step("stats"):
            write_stats(rs)
    log.info("restore: the tree of %d runs (%d processes)", rs.root_pid,
             len(rs.plan.alive))
    if opts.get("detach"):
        return 0
    from criu_py import interrupts
    interrupts.raise_at_once(f"the tree of {rs.root_pid} is restored and keeps running")
    return wait_for_task(rs.root_pid)


# ------------------------------------------------------------------ lazy restore
def check_lazy_daemon(rs: Restore) -> None:
    """restore --lazy-pages: a lazy-pages daemon serves these images in the work dir
    (the tasks connect to it by this absolute path, wherever their cwd is)."""
    from criu_py.lazy import check_daemon, socket_path
    images_dir = rs.opts.get("images_dir") or "."
    work_dir = rs.opts.get("work_dir") or images_dir
    check_daemon(work_dir, images_dir)
    rs.lazy_dir = os.path.abspath(work_dir)
    log.debug("restore: the lazy-pages daemon at %s serves %s", socket_path(rs.lazy_dir),
              images_dir)


def abort_lazy_daemon(rs: Restore, exc) -> None:
    """A failed lazy restore: the daemon stops waiting for tasks that will not come."""
    if exc is None or rs.running or not rs.lazy_dir:
        return
    from criu_py.lazy import abort
    abort(rs.lazy_dir, str(exc) or type(exc).__name__)


def tell_lazy_daemon(rs: Restore) -> None:
    """The tasks run with their lazy ranges registered: the daemon may push pages
    into them now (before, a copy would find no registered range)."""
    from criu_py.lazy import tasks_run
    pids = [t.pid for t in rs.tree.tasks if t.memory is not None and t.memory.lazy]
    tasks_run(rs.lazy_dir, pids)


def check_pages_read(rs: Restore, deferred) -> None:
    """A lazy restore checks only the pieces of pages files it reads itself (the
    lazy-pages daemon checks the others as it serves them)."""
    reads = {}                     # (dir ident, pages name) -> (ImageDir, [(offset, length)])
    for t in rs.tree.tasks:
        if t.memory is None:
            continue
        for src in t.memory.sources:
            st = os.fstat(src.images.dirfd)
            key = (st.st_dev, st.st_ino, src.name)
            entry = reads.setdefault(key, (src.images, []))
            off = 0
            for addr, n in src.iovs:
                if addr is not None:
                    entry[1].append((off, n))
                off += n
    checked = 0
    for (_, _, name), (images, ranges) in reads.items():
        checked += deferred.check_reads(images, name, ranges)
    log.debug("restore: %d pieces of pages files checked (the rest is the lazy-pages "
              "daemon's)", checked)


# ------------------------------------------------------------------ planning
def plan_tree(rs: Restore) -> None:
    from criu_py.restore.tree import plan_tree as plan
    rs.plan = plan(rs.tree, os.getsid(0), os.getpgid(0))
    rs.root_pid = rs.plan.root.pid
    root = rs.plan.root
    if root.sid != root.pid and not rs.opts.get("shell_job"):
        raise RestoreError(f"pid {root.pid} was not a session leader (sid {root.sid}): "
                           f"use --shell-job")


# How long the restore waits, in all, for PIDs still held by dead processes nobody has
# reaped yet: a dump that killed the tree has just returned, and the zombies of its
# orphans wait for init (here it takes it about a second).
PID_RELEASE_WAIT = 5.0
PF_EXITING = 0x4


def check_pids_free(rs: Restore) -> None:
    """Every PID and TID of the tree free. A PID held by a process that is exiting or
    dead but not yet reaped is waited for (PID_RELEASE_WAIT); by anything else, or for
    longer, it is an error naming the holder."""
    deadline = None
    for t in rs.plan.all:
        ids = [t.pid] + (t.img.tids[1:] if t.img is not None and not t.img.zombie else [])
        for pid in ids:
            while (holder := _pid_holder(pid)) is not None:
                what, dying = holder
                if not dying:
                    raise RestoreError(f"pid {pid} is in use by {what}: cannot restore the "
                                       f"task with its PID")
                if deadline is None:
                    deadline = time.monotonic() + PID_RELEASE_WAIT
                    log.info("restore: pid %d is still held by %s: waiting up to %.0f s for "
                             "it to be released", pid, what, PID_RELEASE_WAIT)
                if time.monotonic() > deadline:
                    raise RestoreError(f"pid {pid} is in use by {what} (for over "
                                       f"{PID_RELEASE_WAIT:.0f} s): cannot restore the task "
                                       f"with its PID")
                time.sleep(0.005)


def _pid_holder(pid: int) -> tuple[str, bool] | None:
    """None if nothing holds pid; else (what holds it, whether that is only a process
    that is exiting or dead and waits to be reaped)."""
    from criu_py import proc
    from criu_py.errors import NoSuchProcess
    if not proc.pid_exists(pid):
        return None
    try:
        st = proc.read_stat(pid)
    except NoSuchProcess:
        return None
    except CriuError:
        return "a task we cannot read", False
    if st.num_threads <= 1 and st.state in ("Z", "X"):
        return f"a dead process ({st.comm}) its parent {st.ppid} has not reaped", True
    if st.num_threads <= 1 and st.flags & PF_EXITING:
        return f"an exiting process ({st.comm})", True
    return f"{st.comm} (state {st.state})", False


def check_vdso(rs: Restore) -> None:
    from criu_py.mem.restore import check_vdso as check
    for t in rs.plan.alive:
        check(t.img.memory, t.img.mm, t.pid)


def plan_region_removal(rs: Restore) -> None:
    """Per process: whether the restore command will unmap its restorer region with
    ptrace at the end (needs the dumped vdso, a `syscall` in it, and room for every
    thread's sigframe on that thread's stack)."""
    from criu_py import mem as M
    from criu_py.restore.task import frames_fit_on_stacks
    from criu_py.restore.tracer import vdso_syscall_offset
    off = vdso_syscall_offset()
    for t in rs.plan.alive:
        vdso = [v for v in t.img.mm.vmas if v.status & M.VMA_AREA_VDSO]
        # processes sharing one mm keep the region: it is in both (and a vfork parent
        # sleeps in its code)
        ok = bool(vdso) and off is not None and frames_fit_on_stacks(t.img) and \
            not t.in_parent_mm and t.mm_child is None
        rs.trap[t.pid] = ok
        if ok:
            t.syscall_addr = vdso[0].start + off
        else:
            log.info("restore: the restorer region will stay mapped in %d", t.pid)


class HostCreds:
    """The restore's own credentials: a thread dumped with the same ones keeps ours."""

    def __init__(self):
        from criu_py import proc
        from criu_py.restore.pie import PieCreds
        st = proc.read_status(os.getpid())
        split = lambda v: (v & 0xFFFFFFFF, v >> 32)   # noqa: E731
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                self.cap_last_cap = int(f.read())
        except OSError:
            self.cap_last_cap = 40
        self.creds = PieCreds(uids=st.uids, gids=st.gids, cap_inh=split(st.cap_inh),
                              cap_prm=split(st.cap_prm), cap_eff=split(st.cap_eff),
                              cap_bnd=split(st.cap_bnd), cap_amb=split(st.cap_amb),
                              secbits=_securebits(), no_new_privs=st.no_new_privs,
                              groups=tuple(st.groups), cap_last_cap=self.cap_last_cap)


def _securebits() -> int:
    from criu_py.native import lib
    r = lib.criu_py_restore_syscall(157, 27, 0, 0, 0, 0, 0)      # PR_GET_SECUREBITS
    return max(r, 0)


def host_creds() -> HostCreds:
    return HostCreds()


def plan_restorers(rs: Restore) -> None:
    """What each process's restorer gets from its images alone (restore.task.
    RestorerParts), the cgroup sets every task moves between and the fd tables, computed
    here once for the whole tree: in every forked task the same Python work would cost
    several times as much (copy-on-write faults)."""
    from criu_py.restore.task import cg_set_of, fd_table, restorer_parts
    rs.restorer_parts = {t.pid: restorer_parts(rs, t) for t in rs.plan.alive
                         if not t.in_parent_mm}
    rs.fd_tables = {t.pid: fd_table(rs.tree, t.img) for t in rs.plan.alive
                    if t.files_owner and not t.in_parent_mm}
    rs.cg_moves = {t.pid: (cg_set_of(t), cg_set_of(t.parent) if t.parent else None)
                   for t in rs.plan.forked}


def plan_file_locks(rs: Restore) -> None:
    from criu_py.files.locks import by_file
    rs.desc_locks, rs.posix_locks = by_file(rs.tree)


def check_sockets(rs: Restore) -> None:
    """Sockets the options must allow (as CRIU: established TCP connections need
    --tcp-established or --tcp-close, a dump made with --tcp-close needs --tcp-close,
    datagram peers outside the tree --ext-unix-sk; stream ones come from --inherit-fd,
    see unix.UnixOps.check_image); queued data and TCP streams are read
    now, so a bad image stops the restore before anything is made."""
    from criu_py.files.sockets import inet, unix
    tree, opts = rs.tree, rs.opts
    inv = tree.inventory
    if inv is not None and inv.HasField("tcp_close") and inv.tcp_close and not opts.get("tcp_close"):
        raise RestoreError("the dump was made with --tcp-close: restore with --tcp-close")
    conns = [fe.isk for fe in tree.files.values() if fe.HasField("isk") and inet.is_connection(fe.isk)]
    if not conns and not any(fe.HasField("usk") for fe in tree.files.values()):
        return
    unix.images_of(tree)
    streams = inet.streams_of(tree)
    if conns and not (opts.get("tcp_established") or opts.get("tcp_close")):
        raise RestoreError(f"the images hold {len(conns)} established TCP connection(s): "
                           f"restore with --tcp-established (or --tcp-close)")
    if not opts.get("tcp_close"):
        for e in conns:
            if e.ino not in streams:
                raise RestoreError(f"inet socket {e.ino:#x}: an established TCP connection "
                                   f"without its tcp-stream-{e.ino:x}.img: restore with "
                                   f"--tcp-close")
    if not opts.get("ext_unix_sk"):
        for fe in tree.files.values():
            if fe.HasField("usk") and fe.usk.uflags & unix.USK_EXTERN and \
                    fe.usk.type == unix.SOCK_DGRAM:
                raise RestoreError(f"unix socket {unix.show_name(fe.usk.name)} is outside the "
                                   f"tree: restore with --ext-unix-sk")


def unlock_network(rs: Restore) -> None:
    """Every TCP connection exists, in repair mode: lift the lock the dump took (as CRIU,
    before the connections leave repair mode in their tasks, at the start of stage
    RESTORE). A failure is a warning: the connections then stay quiet until the lock is
    removed by hand."""
    from criu_py.files.sockets import inet, netlock
    tree = rs.tree
    conns = [inet.connection(fe.isk) for fe in tree.files.values()
             if fe.HasField("isk") and inet.is_connection(fe.isk) and fe.isk.ino in inet.streams_of(tree)]
    if not conns:
        return
    rs.pages_check.wait()               # damaged images must not cost the connections
    inv = tree.inventory
    method = inv.network_lock_method if inv.HasField("network_lock_method") else netlock.IPTABLES
    run_id = inv.dump_criu_run_id if inv.HasField("dump_criu_run_id") else None
    try:
        netlock.unlock_restored(method, run_id, rs.root_pid, conns)
    except Exception as exc:            # noqa: BLE001 - the tree runs: say it, go on
        log.warning("restore: %s", exc)


def make_ghosts(rs: Restore) -> None:
    """Deleted files come back under their old name for as long as the tasks open and
    map them, deleted directories for as long as the tasks make them their cwd (removed
    again once every task has: remove_ghosts)."""
    import stat
    from criu_py.files import ghost
    tree = rs.tree
    names = {}
    for fid, gid in tree.remaps.items():
        names.setdefault(gid, tree.path(fid, "a deleted file"))
    for gid, name in sorted(names.items()):
        made = ghost.create(tree.images, gid, name)
        tree.ghost_paths[gid] = made[-1]
        if stat.S_ISDIR(os.lstat(made[-1]).st_mode):
            rs.ghost_dirs += made           # a cwd: the tasks go there in stage RESTORE
        else:
            rs.ghosts += made
    for t in rs.plan.alive:
        for mf in t.img.memory.files.values():
            if mf.path is not None and mf.file_id in tree.remaps:
                mf.path = tree.reg_path(mf.file_id)


def make_sysv_segments(rs: Restore, stack) -> None:
    """SysV segments the tree attaches, semaphore sets and message queues it uses: the
    ones gone since the dump are made again."""
    from criu_py import sysvipc
    ns_id = rs.tree.root.ids.ipc_ns_id if rs.tree.root.ids.HasField("ipc_ns_id") else 3
    rs.sysv = sysvipc.Segments(sysvipc.load(rs.images, ns_id), sysvipc.load_sems(rs.images, ns_id),
                               sysvipc.load_queues(rs.images, ns_id))
    stack.callback(lambda: rs.sysv.undo() if not rs.running else None)
    rs.sysv.prepare()


def remove_ghosts(rs: Restore, dirs: bool = True) -> None:
    """The recreated deleted files go (after stage PREPARE: every task has opened and
    mapped them), and with dirs the recreated directories (after stage RESTORE: every
    task has its cwd); all of them when the restore fails."""
    for path in rs.ghosts:
        try:
            os.unlink(path)
        except OSError:
            pass
    rs.ghosts = []
    if dirs:
        from criu_py.files.ghost import remove_dirs
        remove_dirs(rs.ghost_dirs)
        rs.ghost_dirs = []


# ------------------------------------------------------------------ set-up
def prepare_shared(rs: Restore, stack) -> None:
    """The sync page, the status pipe (tasks write, we read), the fd range for the
    restore's own fds, and ourselves as child subreaper (orphans of a failed restore
    come to us to be reaped)."""
    from criu_py.log import FdWriter
    from criu_py.log import log as logger
    from criu_py.restore.sync import SyncPage
    from criu_py.restore.task import FdSpace, raise_fd_limit
    _, hard = raise_fd_limit()
    base, limit = parked_fd_range(rs, hard)
    rs.fds = FdSpace(base, limit)
    avoid = [(v.start, v.end) for t in rs.plan.alive for v in t.img.mm.vmas]
    rs.sync = SyncPage.create(avoid)
    stack.callback(rs.sync.unmap)
    r, w = os.pipe2(os.O_CLOEXEC)
    rs.status_r = r
    rs.status_w = rs.fds.park(w)
    stack.callback(_close_quietly, r)
    stack.callback(_close_quietly, rs.status_w)
    rs.images.dirfd = rs.fds.park(rs.images.dirfd)
    # a task that may not die with its parent for a while watches us through this
    rs.command_pidfd = rs.fds.park(os.pidfd_open(os.getpid()))
    stack.callback(_close_quietly, rs.command_pidfd)
    for parent in rs.tree.chain[1:]:        # incremental dumps: the parents' pages files
        parent.dirfd = rs.fds.park(parent.dirfd)
    if os.isatty(0):                        # the caller's terminal (--shell-job)
        rs.caller_tty = rs.fds.dup(0)
    rs.inherit_fds = {name: rs.fds.dup(fd) for name, fd in rs.inherit.items()}
    if rs.cg_yard.fd >= 0:                  # every task moves itself in through it
        rs.cg_yard.fd = rs.fds.park(rs.cg_yard.fd)
    if logger.file is not None:
        logger.file.flush()
        logger.file = FdWriter(rs.fds.park(os.dup(logger.file.fileno())))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stack.callback(_prctl, PR_SET_CHILD_SUBREAPER, 0)
    stack.callback(kill_unless_running, rs)


def inherited_fds(specs) -> dict:
    """--inherit-fd fd[N]:NAME, as CRIU: the caller's fd N stands for the dumped file
    CRIU calls NAME (pipe:[INODE], socket:[INODE], a regular file's path without its
    first '/'; FileOps.inherit_name of each kind).
    {name: fd}; one-line errors for a malformed spec or a closed fd."""
    import re
    out = {}
    for spec in specs:
        m = re.fullmatch(r"fd\[(\d+)\]:(.+)", spec, re.DOTALL)
        if m is None:
            raise CriuError(f"--inherit-fd {spec}: not fd[N]:RESOURCE")
        fd, name = int(m.group(1)), m.group(2)
        try:
            os.fstat(fd)
        except OSError as exc:
            raise CriuError(f"--inherit-fd {spec}: fd {fd} is not open here "
                            f"({exc.strerror})") from None
        if name in out:
            raise CriuError(f"--inherit-fd {spec}: {name} is given twice")
        out[name] = fd
        log.info("restore: %s comes from our fd %d", name, fd)
    return out


def parked_fd_range(rs: Restore, hard: int) -> tuple[int, int]:
    """The widest run of fd numbers no task of the tree uses: [base, limit). The numbers
    epoll targets were added with count as used (they are put there for epoll_ctl)."""
    tfds = {te.tfd for fe in rs.tree.files.values() if fe.HasField("epfd") for te in fe.epfd.tfd}
    used = sorted({fi.fd for t in rs.plan.alive for fi in t.img.fdinfos} | {0, 1, 2} |
                  {fd for fd in tfds if fd < hard})
    best = (0, 0)
    edges = used + [hard]
    for lo, hi in zip(edges, edges[1:]):
        if hi - lo - 1 > best[1] - best[0]:
            best = (lo + 1, hi)
    if best[1] - best[0] < 32:
        raise RestoreError("no free fd numbers left for the restore's own files "
                           f"(the tasks use {len(used)} of {hard})")
    return best


def load_modules(rs: Restore) -> None:
    """Import (and compute once) what every task needs after the fork: each of up to
    hundreds of tasks would otherwise import and compute it for itself (a task that
    does says so at -v4: "imported after the fork"). Then freeze the garbage
    collector's view of what exists: a collection in a task would write to every page
    of the heap it inherited (copy-on-write faults in every task)."""
    import gc
    from criu_py.files import FILE_KINDS
    present = {fe.type for fe in rs.tree.files.values()}
    for ops in FILE_KINDS.values():
        if ops.fd_type in present:
            for name in ops.restore_imports:
                __import__(name)
    if rs.lazy_dir:
        import criu_py.lazy  # noqa: F401  (each task hands its userfaultfd over)
        import criu_py.track.uffd  # noqa: F401
    import criu_py.mem.premap  # noqa: F401
    import criu_py.mem.restore  # noqa: F401
    import criu_py.mem.shmem_restore  # noqa: F401
    import criu_py.restore.fork  # noqa: F401
    import criu_py.restore.pie  # noqa: F401
    import criu_py.cgroup.restore  # noqa: F401
    from criu_py.arch_x86 import xsave_layout
    from criu_py.native import lib
    from criu_py.restore.pie import known_layout, warm_types
    from criu_py.restore.sigframe import local_xstate
    known_layout()              # where the tasks look for free ranges (map_free)
    warm_types()                # the C types they name
    local_xstate()
    xsave_layout()
    lib.criu_py_glibc_rseq_addr()
    gc.freeze()


def fork_root(rs: Restore, stack) -> None:
    from criu_py.restore.fork import clone_with_pid
    from criu_py.restore.task import TaskRun, block_signals
    pid = clone_with_pid(rs.root_pid)
    if pid == 0:
        block_signals()
        TaskRun(rs, rs.plan.root).run()
        os._exit(1)


def write_pidfile(path: str, rs: Restore, stack) -> None:
    """Written before the fork (a bad path fails early); removed if the restore fails."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RestoreError(f"cannot write the pidfile {path}: {exc.strerror}") from None
    with open(fd, "w") as f:
        f.write(f"{rs.plan.root.pid}\n")
    stack.callback(_remove_unless_running, path, rs)


def _remove_unless_running(path: str, rs: Restore) -> None:
    if not rs.running:
        try:
            os.unlink(path)
        except OSError:
            pass


# ------------------------------------------------------------------ stages
def run_stages(rs: Restore) -> None:
    from criu_py.restore import sync as S
    everyone = len(rs.plan.forked)
    alive = len([t for t in rs.plan.alive if not t.in_parent_mm])
    for stage, n in ((S.STAGE_FORK, everyone), (S.STAGE_PGID, everyone),
                     (S.STAGE_CLEANUP, everyone), (S.STAGE_PREPARE, alive),
                     (S.STAGE_FILES, alive), (S.STAGE_RESTORE, len(rs.plan.alive))):
        t = time.monotonic()
        rs.sync.open_stage(stage, n)
        try:
            rs.sync.wait_stage_done(lambda: check_progress(rs, stage))
        except S.Aborted:
            raise RestoreError(failure_message(rs, stage)) from None
        log.debug("restore: stage %s done in %.2f ms", S.STAGE_NAMES[stage],
                  (time.monotonic() - t) * 1e3)
        if stage == S.STAGE_FORK:
            rs.forking_us = int((time.monotonic() - rs.fork_started) * 1e6)
        if _KILL_AFTER_STAGE == stage:
            os.kill(os.getpid(), signal.SIGKILL)     # test hook (see _KILL_AFTER_STAGE)
        if stage == S.STAGE_PREPARE:
            remove_ghosts(rs, dirs=False)   # every task has opened and mapped them
        elif stage == S.STAGE_FILES:
            unlock_network(rs)          # every connection exists (in repair mode until RESTORE)
        elif stage == S.STAGE_RESTORE:
            rs.sysv.attached()          # every segment is attached where it was
            remove_ghosts(rs)           # every task has its cwd
    read_status(rs)
    place_threads_in_cgroups(rs)


# Test hook: CRIU_PY_TEST_KILL_AFTER_STAGE=N makes the restore command SIGKILL itself once
# every task is done with stage N (restore/sync.py's numbers), before the next opens.
_KILL_AFTER_STAGE = int(os.environ.get("CRIU_PY_TEST_KILL_AFTER_STAGE", "0") or 0)


def place_threads_in_cgroups(rs: Restore) -> None:
    """Every thread (and child made by a restorer) exists now: threads with a cgroup set
    of their own go into it; then the limits that had to wait for the tasks."""
    from criu_py.cgroup.restore import task_cg_set
    for t in rs.plan.alive:
        own = task_cg_set(t.img.core)
        if t.in_parent_mm:
            rs.cg_yard.move(t.pid, own, task_cg_set(t.parent.img.core))
        for tid, core in t.img.threads[1:]:
            rs.cg_yard.move_thread(tid, task_cg_set(core), own)
    rs.cg_yard.apply_properties()


def read_status(rs: Restore) -> tuple[list, list]:
    """What arrived on the status pipe so far (without blocking)."""
    from criu_py.native import lib
    from criu_py.restore.fork import parse_status
    os.set_blocking(rs.status_r, False)
    try:
        while True:
            chunk = os.read(rs.status_r, 65536)
            if not chunk:
                break
            rs._status_buf += chunk
    except BlockingIOError:
        pass
    records, messages, rs._status_buf = parse_status(rs._status_buf)
    rs.messages += messages
    for r in records:
        if r.stage == lib.PIE_STAGE_DONE:
            rs.regions[r.pid] = (r.arg, r.ret)
        else:
            rs.failures.append(r)
    return records, messages


def check_progress(rs: Restore, stage: int) -> None:
    """Between waits: a task that reported a failure or died, or a signal to us (SIGINT,
    SIGTERM), aborts the restore. Tasks are looked at in /proc only while some have not
    counted themselves done (a wait that timed out): once all have, none is waited for,
    and one that dies since stops the next stage."""
    from criu_py import interrupts
    from criu_py.restore import sync as S
    interrupts.check(f"while {S.STAGE_NAMES[stage]}")
    read_status(rs)
    if rs.messages or rs.failures or rs.sync.error():
        rs.sync.abort()
        raise RestoreError(failure_message(rs, stage))
    if rs.sync.nr_in_progress == 0:
        return
    for t in rs.plan.all:
        if t.kind != "alive" and stage > S.STAGE_CLEANUP or t.in_parent_mm and stage < S.STAGE_GO:
            continue
        state = _proc_state(t.pid)
        if state in ("Z", "X") and not (t.kind != "alive" and stage >= S.STAGE_CLEANUP):
            rs.sync.abort()
            raise RestoreError(f"restore of pid {t.pid} failed: it died while "
                               f"{S.STAGE_NAMES[stage]}")


def failure_message(rs: Restore, stage: int) -> str:
    from criu_py.restore import sync as S
    from criu_py.restore.fork import StatusRecord, describe_record
    read_status(rs)
    if rs.messages:
        return f"restore failed: {rs.messages[0]}"
    if rs.failures:
        return f"restore failed: {describe_record(rs.failures[0])}"
    err = rs.sync.error()
    if err:
        st, ret, pid, arg = err
        return f"restore failed: {describe_record(StatusRecord(st, ret, arg, pid))}"
    return f"restore failed while {S.STAGE_NAMES.get(stage, stage)}"


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", errors="surrogateescape") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


# ------------------------------------------------------------------ the end
def release_tree(rs: Restore) -> None:
    """Every thread is set up: seize them (with PTRACE_O_EXITKILL: if we die now, they
    die with us), let the tree go, unmap the regions and sync page and bring every thread
    to the entry of its rt_sigreturn; then, all at once as far as we can, drop EXITKILL
    (from there each completes its return whatever happens to us), finish, detach."""
    from criu_py import interrupts
    from criu_py.restore import sync as S
    from criu_py.restore.sync import SYNC_SIZE
    from criu_py.restore.tracer import commit, finish_release, prepare_release, seize, wait_trap
    traced = [t for t in rs.plan.alive if rs.trap.get(t.pid)]
    stopping = [t for t in rs.plan.alive if t.img.stopped or rs.opts.get("leave_stopped")]
    for t in traced:
        if t.pid not in rs.regions:
            raise RestoreError(f"restore of pid {t.pid} failed: its restorer did not report")
        for tid in t.img.tids:
            seize(tid)
    # the others return into the task on their own once the stage opens: stop them
    # first, in the restorer's wait (a SIGCONT lets them on into their rt_sigreturn)
    stop_tasks(t for t in stopping if not rs.trap.get(t.pid))
    rs.sync.open_stage(S.STAGE_GO, 0)
    for t in traced:
        for tid in t.img.tids:
            wait_trap(tid)
    prepare_release([(t.img.tids, t.syscall_addr, [rs.regions[t.pid], (rs.sync.addr, SYNC_SIZE)])
                     for t in traced])
    interrupts.hold()                  # committed: the tree runs, whatever comes
    everyone = [tid for t in traced for tid in t.img.tids]
    commit(everyone)
    rs.running = True
    # pending from their entry into rt_sigreturn: they stop before running any of their code
    stop_tasks(t for t in stopping if rs.trap.get(t.pid))
    finish_release(everyone)


def stop_tasks(tasks) -> None:
    """A task dumped stopped comes back stopped, as does every task with --leave-stopped.
    Always by SIGSTOP: the kernel discards SIGTSTP, SIGTTIN and SIGTTOU sent to an
    orphaned process group, which the restored one may now be (the image keeps the
    dumped signal)."""
    for t in tasks:
        log.info("restore: pid %d is left stopped", t.pid)
        try:
            os.kill(t.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass


def write_stats(rs: Restore) -> None:
    """stats-restore in the work dir, as CRIU writes it, and with --display-stats on
    stdout. The tree runs already: a dir we may not write to only costs the file."""
    from criu_py import mem as M
    from criu_py.images import ImageDir
    from criu_py.images.pb import stats_pb2
    entry = stats_pb2.stats_entry()
    r = entry.restore
    r.pages_compared, r.pages_skipped_cow = rs.sync.cow_counts
    r.pages_restored = sum(n for t in rs.plan.alive if not t.in_parent_mm
                           for src in t.img.memory.sources
                           for addr, n in src.iovs if addr is not None) // M.PAGE_SIZE
    r.forking_time = rs.forking_us
    r.restore_time = int((time.monotonic() - rs.started) * 1e6)
    work_dir = rs.opts.get("work_dir") or rs.opts.get("images_dir") or "."
    try:
        with ImageDir(work_dir) as d:
            d.write_entries("stats-restore", [entry])
    except (CriuError, OSError) as exc:
        log.info("restore: stats-restore not written in %s: %s", work_dir, exc)
    if rs.opts.get("display_stats"):
        from criu_py.stats import display
        display(entry)


def kill_unless_running(rs: Restore) -> None:
    """After a failure: abort the stages, kill every task of ours, reap them."""
    if rs.running or rs.sync is None:
        return
    from criu_py.proc import descendants
    rs.sync.abort()
    deadline = time.monotonic() + 5
    while True:
        kids = descendants(os.getpid())
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap_all()
        if not kids or time.monotonic() > deadline:
            break
        time.sleep(0.005)


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG | 0x40000000)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _prctl(option: int, arg: int) -> None:
    from criu_py.native import lib
    lib.criu_py_restore_syscall(157, option, arg, 0, 0, 0, 0)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def wait_for_task(pid: int) -> int:
    """Like `criu restore` without -d: wait for the task; its exit status, 128+signal."""
    while True:
        try:
            _, st = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if os.WIFEXITED(st):
            return os.WEXITSTATUS(st)
        if os.WIFSIGNALED(st):
            return 128 + os.WTERMSIG(st)
