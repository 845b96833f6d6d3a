# What every task of the tree does in Python after it is forked, stage by stage (see
# restore/sync.py), until its PIE restorer takes over: its session and group, the
# resources its subtree shares (opened before it forks the children that inherit them),
# its copy-on-write memory, its children; then the group it joins, the end of helpers and
# zombies, the files its restorer maps, its fd table, cwd/root/umask, personality,
# rlimits and timers, and finally the restorer region built and entered. Runs in the
# forked tasks only (but for RestorerParts, the part of each restorer's plan that follows
# from the images alone, made by the restore command before the fork, where it is
# cheaper); a failure is reported in one line through the status pipe and aborts the
# whole restore.
import contextlib
import fcntl
import mmap
import os
import resource
import select
import signal
import struct
import sys
import time

from criu_py import mem as M
from criu_py.errors import RestoreError
from criu_py.proc import Record
from criu_py.restore import sync as S
from criu_py.restore.tree import ALIVE, HELPER, ZOMBIE

NR_PERSONALITY = 135
NR_MREMAP = 25
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
SIGKILL, SIGSTOP = 9, 19
MAP_FIXED_NOREPLACE = 0x100000


class FdSpace:
    """The restore's own fds (parked) live in a range of fd numbers that no task of the
    tree uses, [base, limit): fcntl(F_DUPFD) hands out the lowest free number there
    atomically, so tasks sharing one fd table never collide, and installing a task's fds
    never overwrites one of ours. `own`: parked by this task; `inherited`: parked by its
    ancestors (copies in its table after the fork)."""

    def __init__(self, base: int, limit: int):
        self.base, self.limit = base, limit
        self.own: set[int] = set()
        self.inherited: set[int] = set()

    def dup(self, fd: int) -> int:
        """A new parked fd for what fd refers to (close-on-exec)."""
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, self.base)
        if new >= self.limit:
            os.close(new)
            raise RestoreError(f"no free fd numbers left for the restore's own files "
                               f"({self.base}..{self.limit - 1} are full)")
        self.own.add(new)
        return new

    def park(self, fd: int) -> int:
        """Move fd into the parked range (the original number is closed)."""
        new = self.dup(fd)
        os.close(fd)
        return new

    def close(self, fd: int) -> None:
        os.close(fd)
        self.own.discard(fd)
        self.inherited.discard(fd)

    def after_fork(self) -> None:
        """In a new child: everything parked so far was its parent's."""
        self.inherited |= self.own
        self.own = set()


class TaskRun:
    """One task's side of the restore (an object of the forked process)."""

    def __init__(self, rs, t):
        self.rs = rs                    # restore.Restore (shared, inherited through fork)
        self.t = t                      # restore.tree.RTask
        self.fds: FdSpace = rs.fds
        self.status_fd = -1
        self.dirfd = -1
        self.resources: dict = rs.resource_fds     # key -> parked fd, or {file id: fd} for pipes
        self.restorer_fds: dict = {}
        self.exe_fd = -1
        self.uffd = -1                  # restore --lazy-pages: parked userfaultfd
        self.stage = "start"            # what a failure message names
        self.modules_at_fork = len(sys.modules)     # restore_stage says what it imported

    # ------------------------------------------------------------ the whole life
    def run(self) -> None:
        """Never returns: the task ends in its restorer (or exits: helpers, zombies,
        failures)."""
        t, sy = self.t, self.rs.sync
        self.stage = "start"
        import gc
        gc.disable()            # short-lived: no collection touching the inherited heap
        try:
            # Until the tree is let go, a task dies with its parent (and the root with the
            # restore command): nothing half-restored is left if the restore is killed,
            # even before the stages open.
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != self.rs.parent_of(t):
                os._exit(1)                 # the parent is gone already
            self.fds.after_fork()
            self.own_service_fds()
            sy.wait_stage(S.STAGE_FORK)
            with self.timed("fork"):
                self.fork_stage()
            sy.stage_done(S.STAGE_FORK)
            self.stage = "process group"
            if os.getpgid(0) != t.pgid:
                os.setpgid(0, t.pgid)
            alive = None
            if t.parent is not None and t.parent.kind == HELPER:
                # its helper parent exits next, on purpose: until it dies with its new
                # parent, it watches the restore command itself
                _prctl(PR_SET_PDEATHSIG, 0)
                alive = self.restore_command_alive
            sy.stage_done(S.STAGE_PGID, alive)
            self.stage = "helpers and zombies"
            self.cleanup_stage()            # helpers and zombies end here
            sy.stage_done(S.STAGE_CLEANUP, alive)
            self.stage = "restorer files"
            if t.parent is not None and t.parent.kind == HELPER:
                # its helper is gone: it dies with the parent it has now (a subreaper)
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != t.parent.parent.pid:
                    os._exit(1)         # that one died already
            with self.timed("prepare"):
                self.open_restorer_fds()
            sy.stage_done(S.STAGE_PREPARE)
            self.stage = "fd table"
            with self.timed("files"):
                if t.parent is None:
                    self.shell_job_foreground()
                if t.files_owner:
                    self.install_fds()
                if t.ctty is not None and t.kind == ALIVE:
                    self.set_foreground_group()
            sy.stage_done(S.STAGE_FILES)
            self.stage = "task state"
            self.restore_stage()            # enters the restorer
        except S.Aborted:
            os._exit(1)
        except RestoreError as exc:
            self.fail(str(exc))
        except OSError as exc:
            _log_traceback()
            self.fail(f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""))
        except BaseException as exc:   # noqa: BLE001 - a task must report, never unwind
            _log_traceback()
            self.fail(repr(exc))
        os._exit(1)

    @contextlib.contextmanager
    def timed(self, what: str):
        from criu_py.log import log
        t0 = time.monotonic()
        yield
        log.debug("pid %d: %s stage %.2f ms", self.t.pid, what, (time.monotonic() - t0) * 1e3)

    def fail(self, text: str) -> None:
        report(self.status_fd if self.status_fd >= 0 else self.rs.status_w,
               f"pid {self.t.pid}: {self.stage}: {text}")
        self.rs.sync.abort()

    def restore_command_alive(self) -> None:
        """S.Aborted once the restore command is gone (its pidfd reads as ended)."""
        if select.select([self.rs.command_pidfd], [], [], 0)[0]:
            raise S.Aborted()

    def own_service_fds(self) -> None:
        """Own copies of the status pipe, the images dir and the log file: tasks that
        share an fd table close only their own."""
        from criu_py.log import FdWriter, log
        rs = self.rs
        self.status_fd = self.fds.dup(rs.status_w)
        self.dirfd = rs.images.dirfd = self.fds.dup(rs.images.dirfd)
        if log.file is not None:
            # not owned: an fd table may be shared, only FdSpace closes parked fds
            log.file = FdWriter(self.fds.dup(log.file.fileno()))
        else:
            log.disabled = True         # stderr is about to become the task's
        if self.t.parent is None:
            # The root's fd table is a copy of the restore command's: nothing of it but
            # what was parked for the tree stays above the parked base.
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd >= self.fds.base and fd not in self.fds.own | self.fds.inherited:
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    # ------------------------------------------------------------ stage FORK
    def fork_stage(self) -> None:
        t = self.t
        self.stage = "cgroups"
        self.rs.cg_yard.move(0, *self.rs.cg_moves[t.pid])
        self.stage = "session"
        if t.subreaper:
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.stage = "files"
        if t.opens:
            self.open_resources()
        self.stage = "copy-on-write memory"
        if t.premap:
            from criu_py.mem.premap import premap_vmas
            premap_vmas(self)
        self.stage = "children"
        children = [c for c in t.children if not c.in_parent_mm]   # the restorer makes those
        early = [c for c in children if t.forks_before_setsid(c)]
        if early:
            self.fork_children(early)
        self.stage = "session"
        if t.sid == t.pid and os.getsid(0) != t.pid:
            os.setsid()
        elif t.pgid == t.pid and os.getpgid(0) != t.pid:
            os.setpgid(0, 0)
        if t.ctty is not None and t.sid == t.pid:
            self.stage = "controlling terminal"
            self.take_ctty()
        self.stage = "children"
        late = [c for c in children if c not in early]
        if late:
            self.fork_children(late)

    def fork_children(self, batch: list) -> None:
        """Fork the children in `batch` in one go (fork.clone_children)."""
        from criu_py.restore.fork import clone_children
        taken = os.environ.get("CRIU_PY_TEST_TAKE_PID")
        for c in batch if taken else ():
            if taken == str(c.pid):
                take_pid_for_test(c.pid)
        i = clone_children([(c.pid, c.clone_flags) for c in batch])
        if i:
            TaskRun(self.rs, batch[i - 1]).run()
            os._exit(1)

    def open_resources(self) -> None:
        """Open (make) what this task's subtree shares, before forking it."""
        from criu_py.files import ops_by_type
        from criu_py.files.locks import take_file_locks
        from criu_py.mem import shmem_restore
        tree = self.rs.tree
        ctx = FileContext(self)
        kinds = ops_by_type()
        for key in self.t.opens:
            res = self.rs.plan.resources[key]
            if res.kind == "shmem":
                obj = tree.shared[res.ids[0]]
                fd = shmem_restore.make(obj, self.rs.images)
                self.resources[key] = self.fds.park(fd)
                obj.fd = -1
                continue
            fds = {}
            for fid in res.ids:
                fe = tree.files[fid]
                ops = kinds.get(fe.type)
                if ops is None:
                    raise RestoreError(f"file id {fid}: no restore for file type {fe.type}")
                fd = ops.restore_fd(ctx, fe, _FdName(fid))
                if fid in self.rs.desc_locks:
                    take_file_locks(fd, self.rs.desc_locks[fid], _file_name(fe))
                fds[fid] = self.fds.park(fd)
            ctx.close_raw()
            self.resources[key] = fds

    def take_ctty(self) -> None:
        """A session leader's controlling pty, right after setsid() (the session's
        members forked from now on share it)."""
        index, pgrp, _ = self.t.ctty
        fds = self.resources.get(("tty", index), {})
        tree = self.rs.tree
        slaves = [fd for fid, fd in fds.items() if not tree.files[fid].tty.tty_info_id % 2]
        from criu_py.files import tty
        if slaves:
            tty.take_controlling_tty(slaves[0])
        else:
            fd = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            try:
                tty.take_controlling_tty(fd)
            finally:
                os.close(fd)

    def shell_job_foreground(self) -> None:
        """--shell-job, as CRIU: a root that leads its own group and had the caller's
        terminal becomes the foreground job of the restoring command's terminal."""
        t, rs = self.t, self.rs
        if rs.caller_tty < 0 or t.pgid != t.pid or t.sid == t.pid or \
                not any(i.id % 2 == 0 and i.id + 1 not in rs.tree.tty_infos
                        for i in rs.tree.tty_infos.values()):
            return
        from criu_py.files import tty
        tty.set_foreground(rs.caller_tty, t.pgid)

    def set_foreground_group(self) -> None:
        """Once the groups exist: the controlling pty's foreground group."""
        index, pgrp, _ = self.t.ctty
        if not pgrp:
            return
        from criu_py.files import tty
        fd = os.open(f"/dev/pts/{index}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            tty.set_foreground(fd, pgrp)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ stage CLEANUP
    def cleanup_stage(self) -> None:
        t = self.t
        waited = False
        for c in t.children:
            if c.kind == HELPER:
                _waitpid(c.pid)
                waited = True
            elif c.kind == ZOMBIE:
                os.waitid(os.P_PID, c.pid, os.WEXITED | os.WNOWAIT)
                waited = True
        if t.kind == HELPER:
            self.rs.sync.done()
            os._exit(0)
        if t.kind == ZOMBIE:
            self.rs.sync.done()
            die_as_zombie(t)
        if waited:
            drain_sigchld()

    # ------------------------------------------------------------ stage PREPARE
    def open_restorer_fds(self) -> None:
        """Mapped files, shared memory objects, the executable and the pages file, each
        parked as this task's own (its restorer closes them)."""
        img = self.t.img
        mem = img.memory
        for key, mf in mem.files.items():
            if mf.shmid is not None:
                self.restorer_fds[key] = self.fds.dup(self.resource_fd(("shmem", mf.shmid)))
                continue
            try:
                fd = os.open(mf.path, mf.flags | os.O_CLOEXEC)
            except OSError as exc:
                raise RestoreError(f"cannot open mapped file {mf.path}: {exc.strerror}") from None
            fd = self.fds.park(fd)
            self.restorer_fds[key] = fd
            self.rs.tree.check_opened(mf.file_id, fd, f"pid {self.t.pid}: a mapping")
        self.rs.tree.reg(img.mm.exe_file_id, "the exe link")
        exe = self.rs.tree.reg_path(img.mm.exe_file_id)
        exe_fd = os.open(exe, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.rs.tree.check_opened(img.mm.exe_file_id, exe_fd, f"pid {self.t.pid}: the executable")
            st, own = os.fstat(exe_fd), os.stat("/proc/self/exe")
        except BaseException:
            os.close(exe_fd)
            raise
        if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
            # Same file as our own executable (a Python task restored by criu-py): the link
            # is right already, and the kernel refuses to "replace" it while it is mapped.
            os.close(exe_fd)
            self.exe_fd = -1
        else:
            self.exe_fd = self.fds.park(exe_fd)
        for src in mem.sources:        # its own pages file, and its parents' (chains)
            src.fd = self.fds.park(src.images.open_raw(src.name))
        if self.t.mm_child is not None:
            self.prepare_mm_child(self.t.mm_child)

    def prepare_mm_child(self, v) -> None:
        """What the child that runs in our memory (made by our restorer) takes from us:
        its fd table (our own copies of the resources, moved to its numbers there) unless
        it shares ours, its cwd and root unless it shares our fs."""
        from criu_py.files import FD_CLOEXEC
        tree = self.rs.tree
        self.vfork_moves = []
        for fi in (v.img.fdinfos if v.files_owner else ()):
            src = self.fds.dup(self.resource_fd(resource_key(tree, fi.id))[fi.id])
            self.vfork_moves.append((src, fi.fd, bool(fi.flags & FD_CLOEXEC)))
        self.vfork_dirs = (-1, -1)
        if v.fs_owner:
            flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
            cwd = self.fds.park(os.open(tree.path(v.img.fs.cwd_id, "cwd"), flags))
            root = self.fds.park(os.open(tree.path(v.img.fs.root_id, "root"), flags))
            self.vfork_dirs = (cwd, root)

    def resource_fd(self, key) -> int:
        fd = self.resources.get(key)
        if fd is None:
            raise RestoreError(f"{key[0]} {key[1]} was not opened for this task")
        return fd

    # ------------------------------------------------------------ stage FILES
    def install_fds(self) -> None:
        """Every fd of the table at its number, from the parked resources; then every
        fd that is neither the task's nor still needed (inherited copies of resources,
        what the restore command had open) is closed."""
        task_fds = set()
        for fd, key, fid, inheritable in self.rs.fd_tables[self.t.pid]:
            os.dup2(self.resource_fd(key)[fid], fd, inheritable=inheritable)
            task_fds.add(fd)
        resources = self.resource_set()
        keep = task_fds | self.fds.own - resources
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep:
                continue
            if fd < self.fds.base or fd in self.fds.inherited or fd in resources:
                try:
                    os.close(fd)
                except OSError:
                    pass
                self.fds.own.discard(fd)
                self.fds.inherited.discard(fd)

    def resource_set(self) -> set:
        out = set()
        for v in self.resources.values():
            out.update(v.values() if isinstance(v, dict) else (v,))
        return out

    # ------------------------------------------------------------ stage RESTORE
    def restore_stage(self) -> None:
        from criu_py.log import log
        t0 = time.monotonic()
        t, img = self.t, self.t.img
        if img.memory.lazy:
            self.stage = "lazy-pages hand-over"
            self.hand_over_uffd()
            self.stage = "task state"
        self.tcp_repair_off()
        if t.fs_owner:
            set_fs(self.rs.tree, img)
        parts = self.rs.restorer_parts[t.pid]
        set_personality(parts.personality)
        set_rlimits(parts.rlimits)
        if parts.xfeatures:
            from criu_py.restore.sigframe import request_xfeatures
            request_xfeatures(parts.xfeatures)
        plan = self.build_plan()
        log.debug("pid %d: entering the restorer (%d VMAs, %d threads) after %.2f ms", t.pid,
                  len(plan.vmas), len(plan.threads), (time.monotonic() - t0) * 1e3)
        if len(sys.modules) != self.modules_at_fork:    # each task paid for it
            log.debug("pid %d: imported after the fork (load them in load_modules): %s",
                      t.pid, " ".join(list(sys.modules)[self.modules_at_fork:]))
        if log.file is not None:
            log.file.flush()
        enter_restorer(self, plan)

    def hand_over_uffd(self) -> None:
        """restore --lazy-pages: our userfaultfd goes to the lazy-pages daemon before the
        restorer maps anything; the restorer registers the lazy ranges with it and
        closes our copy with the other parked fds."""
        from criu_py.lazy import hand_over, make_uffd
        from criu_py.log import log
        uffd = make_uffd()
        try:
            hand_over(self.rs.lazy_dir, self.t.pid, uffd, self.t.img.memory.lazy)
        except BaseException:
            os.close(uffd)
            raise
        self.uffd = self.fds.park(uffd)
        log.debug("pid %d: userfaultfd handed to the lazy-pages daemon (%d ranges, %d pages)",
                  self.t.pid, len(self.t.img.memory.lazy), self.t.img.memory.lazy_pages)

    def tcp_repair_off(self) -> None:
        """The network lock is lifted by now (between stages FILES and RESTORE): the TCP
        connections this task holds first (pstree order) leave repair mode, while the
        task is still privileged, as CRIU's restorer does before the credentials."""
        repairers = self.rs.plan.repairers
        if not repairers or not self.t.files_owner or self.rs.opts.get("tcp_close"):
            return
        from criu_py.files.sockets import tcp     # loaded by the restore when it has sockets
        for fd in sorted({fi.fd for fi in self.t.img.fdinfos if repairers.get(fi.id) == self.t.pid}):
            tcp.repair_off_fd(fd)

    def build_plan(self):
        from criu_py.mem.restore import iovs_without, pie_vmas
        from criu_py.restore.pie import PiePlan
        t, img, rs = self.t, self.t.img, self.rs
        mem = img.memory
        for key, mf in mem.files.items():
            mf.fd = self.restorer_fds[key]
        premapped = getattr(t, "premap_addrs", {})
        done = [(v.start, v.end) for v in t.premap]
        trap = rs.trap.get(t.pid, False)
        parts = rs.restorer_parts[t.pid]
        keep = {self.status_fd}
        vfork = None
        if t.mm_child is not None:
            vfork = self.mm_child_plan(t.mm_child)
            keep |= {src for src, _, _ in vfork.fd_moves} | {vfork.cwd_fd, vfork.root_fd}
        close = sorted(self.fds.own - keep)
        return PiePlan(vfork=vfork,
            vmas=pie_vmas(mem, premapped),
            page_sources=[(src.fd, iovs_without(src.iovs, done)) for src in mem.sources],
            threads=parts.threads, status_fd=self.status_fd,
            vdso_vvar=mem.vdso_vvar, sigactions=parts.sigactions,
            mm_map=parts.mm_map, exe_fd=self.exe_fd, close_fds=close,
            trap_before_sigreturn=trap, signals=parts.signals,
            dumpable=img.mm.dumpable if img.mm.HasField("dumpable") else -1,
            tgid=t.pid, premap=getattr(t, "premap_area", (0, 0)),
            sync=(rs.sync.addr, S.SYNC_SIZE), stage_ready=S.STAGE_RESTORE, stage_go=S.STAGE_GO,
            itimers=parts.itimers, arm_itimers=True, posix_timers=parts.posix_timers,
            timerfds=self.timerfds_to_arm(), locks=self.posix_locks(),
            uffd=self.uffd, lazy=mem.lazy if self.uffd >= 0 else [])

    def timerfds_to_arm(self) -> list:
        """The timerfds this task's restorer arms (the first task holding each)."""
        from criu_py.files.timerfd import arming
        out, done = [], set()
        armers = self.rs.plan.armers
        for fi in (self.t.img.fdinfos if self.t.files_owner else ()):
            if armers.get(fi.id) != self.t.pid or fi.id in done:
                continue
            done.add(fi.id)
            e = self.rs.tree.files[fi.id].tfd
            flags, value, interval, ticks = arming(e)
            out.append((fi.fd, flags, e.clockid, ticks, interval + value))
        return out

    def posix_locks(self) -> list:
        return [(e.fd, e.type, e.start, e.len) for e in self.rs.posix_locks.get(self.t.pid, ())]


    def mm_child_plan(self, v):
        """The PiePlan of the child that runs in our memory: no memory of its own, the
        rest of a process's state set up by the restorer itself (what it shares with us
        left alone)."""
        from criu_py.restore.pie import PiePlan
        from criu_py.restore.tree import CLONE_SIGHAND
        core = v.img.core
        tc = core.tc
        targets = {dst for _, dst, _ in self.vfork_moves}
        ours = {fi.fd for fi in self.t.img.fdinfos} if v.files_owner else set()
        cwd_fd, root_fd = self.vfork_dirs
        close = sorted((ours - targets) | {src for src, _, _ in self.vfork_moves} |
                       ({cwd_fd, root_fd} - {-1}))
        rlimits = [(rl.cur, rl.max) for rl in tc.rlimits.rlimits] if tc.HasField("rlimits") else []
        itimers = None
        if tc.HasField("timers"):
            itimers = [(t.isec, t.iusec, t.vsec, t.vusec)
                       for t in (tc.timers.real, tc.timers.virt, tc.timers.prof)]
        rs = self.rs
        return PiePlan(
            vmas=[], status_fd=self.status_fd, tgid=v.pid,
            threads=[thread_plan(v.pid, core, False, rs.host_creds)], clone_flags=v.clone_flags,
            sigactions={} if v.clone_flags & CLONE_SIGHAND else sigactions(core), close_fds=close,
            signals=[s.siginfo for s in tc.signals_s.signals] if tc.HasField("signals_s") else [],
            sync=(rs.sync.addr, S.SYNC_SIZE), stage_ready=S.STAGE_RESTORE, stage_go=S.STAGE_GO,
            fd_moves=self.vfork_moves, cwd_fd=cwd_fd, root_fd=root_fd,
            umask=v.img.fs.umask if v.fs_owner and v.img.fs.HasField("umask") else -1,
            setsid=v.sid == v.pid, pgid=v.pgid if v.pgid != self.t.pgid else 0,
            personality=tc.personality, rlimits=rlimits, itimers=itimers)


class RestorerParts(Record):
    """What a process's restorer gets from its images alone: its threads' PieThreads
    (registers, sigframe state, credentials), sigactions, mm_map, timers and pending
    signals; and what the task sets before it: its personality, the resource limits
    (rlimits_to_set) and the xsave features its leader's state uses that it may not use
    yet (sigframe.missing_xfeatures, usually none: the tasks may use what the restore
    command may; request_xfeatures asks for them). Computed for every process in the
    restore command before the fork (restorer_parts), where that costs a fraction of the
    same Python work in each forked task: there, every object it makes or touches first
    costs a copy-on-write fault."""
    _fields = ("threads", "sigactions", "mm_map", "itimers", "posix_timers", "signals",
               "personality", "rlimits", "xfeatures")


def restorer_parts(rs, t) -> RestorerParts:
    from criu_py.restore.sigframe import missing_xfeatures
    img = t.img
    core = img.core
    trap = rs.trap.get(t.pid, False)
    threads = [thread_plan(tid, c, trap, rs.host_creds) for tid, c in img.threads]
    return RestorerParts(
        threads=threads, xfeatures=missing_xfeatures(threads[0].regs.xsave),
        sigactions=sigactions(core), mm_map=mm_map(img.mm), itimers=itimers(core),
        posix_timers=posix_timers(core),
        signals=[s.siginfo for s in core.tc.signals_s.signals] if core.tc.HasField("signals_s") else [],
        personality=core.tc.personality, rlimits=rlimits_to_set(core))


def _log_traceback() -> None:
    """Where an unexpected error came from, in the log at -v4."""
    from criu_py.log import DEBUG, log
    if log.verbosity >= DEBUG:
        import traceback
        log.debug("%s", traceback.format_exc().rstrip())


class _FdName:
    """What the kind modules print as "fd N" in errors, for a file opened before its
    task's fd table exists."""

    def __init__(self, fid: int):
        self.fd = f"(file id {fid})"


class FileContext:
    """What the file kinds' restore halves (FILE_KINDS[...].restore_fd) may ask for:
    the images, shared memory objects and other files already open (parked fds), the
    state of a group of descriptions made together (a pipe's ends, a pty's), and a
    way to put a file at a given fd number for a moment (epoll_ctl)."""

    def __init__(self, run: TaskRun):
        self.run = run
        self.tree = run.rs.tree
        self.pipe_data = run.rs.tree.pipe_data
        self.images = run.rs.images
        self._pipes: dict = {}
        self._groups: dict = {}
        self.raw_fds: list = []
        self.handed: set = set()      # raw pipe ends already used as a description

    def shared_fd(self, shmid: int) -> int:
        return self.run.resource_fd(("shmem", shmid))

    def inherited(self, name: str | None) -> int | None:
        """The parked fd `restore --inherit-fd` gave for the file CRIU calls `name`."""
        return self.run.rs.inherit_fds.get(name) if name is not None else None

    def memfd_shmid(self, inode_id: int) -> int:
        return self.run.rs.tree.memfd_inodes[inode_id].shmid

    def fd_of(self, fid: int) -> int:
        """The parked fd of files.img entry `fid` (opened by this task or an ancestor)."""
        fds = self.run.resource_fd(resource_key(self.tree, fid))
        if fid not in fds:
            raise RestoreError(f"file id {fid} was not opened for this task")
        return fds[fid]

    def armed_by_restorer(self, fid: int) -> bool:
        return fid in self.run.rs.plan.armers

    def repaired_by_restorer(self, fid: int) -> bool:
        """A TCP connection some task's restorer takes out of repair mode at the end."""
        return fid in self.run.rs.plan.repairers

    def caller_tty(self) -> int:
        fd = self.run.rs.caller_tty
        if fd < 0:
            raise RestoreError("the dump holds its caller's terminal (--shell-job), but this "
                               "restore has no terminal on its stdin")
        return fd

    @contextlib.contextmanager
    def fd_at(self, number: int, src: int):
        """src also at fd `number` for the block (what was there before is put back)."""
        saved = -1
        try:
            saved = fcntl.fcntl(number, fcntl.F_DUPFD_CLOEXEC, self.run.fds.base)
        except OSError:
            pass
        os.dup2(src, number, inheritable=False)
        try:
            yield number
        finally:
            if saved >= 0:
                os.dup2(saved, number, inheritable=False)
                os.close(saved)
            else:
                os.close(number)

    def group(self, key, make) -> dict:
        """Descriptions made together, once (make() -> {files.img id: fd})."""
        if key not in self._groups:
            fds = make()
            self._groups[key] = fds
            self.raw_fds.extend(fds.values())
        return self._groups[key]

    def pipe_ends(self, pipe_id: int, make) -> tuple[int, int]:
        if pipe_id not in self._pipes:
            ends = make()
            self._pipes[pipe_id] = ends
            self.raw_fds.extend(ends)
        return self._pipes[pipe_id]

    def close_raw(self) -> None:
        for fd in self.raw_fds:
            os.close(fd)
        self.raw_fds = []
        self._groups = {}


def fd_table(tree, img) -> list:
    """(fd, resource key, files.img id, inheritable) of each fd of a task's table, in
    its fdinfo order: what install_fds() puts where. Made in the restore command: the
    fdinfos and file entries read through protobuf, and each file kind's resource key,
    cost every task copy-on-write faults."""
    from criu_py.files import FD_CLOEXEC
    return [(fi.fd, resource_key(tree, fi.id), fi.id, not fi.flags & FD_CLOEXEC)
            for fi in img.fdinfos]


def resource_key(tree, fid: int) -> tuple:
    from criu_py.files import ops_by_type
    fe = tree.files[fid]
    return ops_by_type()[fe.type].resource_key(fe, tree)


def _file_name(fe) -> str:
    for name in ("reg", "fifo", "tty"):
        if fe.HasField(name):
            return getattr(fe, name).name if name == "reg" else f"file id {fe.id}"
    return f"file id {fe.id}"


def cg_set_of(t) -> int:
    """The cgroup set a task goes into: its core's; a helper's or zombie's without one
    stay in their parent's (0: where the restore command is)."""
    from criu_py.cgroup.restore import task_cg_set
    while t is not None:
        if t.img is not None:
            cg = task_cg_set(t.img.core)
            if cg:
                return cg
        t = t.parent
    return 0


def take_pid_for_test(pid: int) -> None:
    """Test hook (CRIU_PY_TEST_TAKE_PID): another process takes `pid` right before this
    task forks the task that needs it, as a PID taken during a restore would be."""
    from criu_py.restore.fork import clone_with_pid
    if clone_with_pid(pid) == 0:
        os.execv("/bin/sleep", ["sleep", "600"])


# ---------------------------------------------------------------- helpers and zombies
def die_as_zombie(t) -> None:
    """End with the dumped wait status: exit(code), or killed by the same signal (no
    core file)."""
    from criu_py.native import ffi
    name = ffi.new("char[16]", os.fsencode(t.img.core.tc.comm)[:15])
    _prctl(15, int(ffi.cast("uintptr_t", name)))        # PR_SET_NAME: ps shows its name
    status = t.exit_code
    sig = status & 0x7F
    if sig:
        _prctl(4, 0)                             # PR_SET_DUMPABLE 0: no core file
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    os._exit((status >> 8) & 0xFF)


def drain_sigchld() -> None:
    """The SIGCHLDs of helpers and zombies that ended during the restore (the dumped
    pending signals come back later, in the restorer)."""
    while signal.sigtimedwait([signal.SIGCHLD], 0) is not None:
        pass


def _waitpid(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue


def _prctl(option: int, arg: int) -> None:
    from criu_py.native import lib
    r = lib.criu_py_restore_syscall(157, option, arg, 0, 0, 0, 0)
    if r < 0:
        raise OSError(-r, f"prctl({option}): {os.strerror(-r)}")


# ---------------------------------------------------------------- process state
def set_personality(persona: int) -> None:
    from criu_py.native import lib
    r = lib.criu_py_restore_syscall(NR_PERSONALITY, persona, 0, 0, 0, 0, 0)
    if r < 0:
        raise OSError(-r, os.strerror(-r))


def set_fs(tree, img) -> None:
    """cwd, then root (paths are as the dump saw them, from outside any chroot)."""
    fd = os.open(tree.path(img.fs.cwd_id, "cwd"), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tree.check_opened(img.fs.cwd_id, fd, "cwd")
        os.fchdir(fd)
    finally:
        os.close(fd)
    root = tree.path(img.fs.root_id, "root")
    if root != "/":
        os.chroot(root)
    if img.fs.HasField("umask"):
        os.umask(img.fs.umask)


def itimers(core) -> list | None:
    """The interval timers (real, virt, prof) as the restorer sets them, right before
    the task returns: (interval s, us, time left s, us); a timer whose time left read 0
    while it has an interval gets the interval (as CRIU does), so it stays armed."""
    tc = core.tc
    if not tc.HasField("timers"):
        return None
    out = []
    for t in (tc.timers.real, tc.timers.virt, tc.timers.prof):
        value = (t.vsec, t.vusec) if (t.vsec, t.vusec) != (0, 0) else (t.isec, t.iusec)
        out.append((t.isec, t.iusec) + value)
    return out


def posix_timers(core) -> list:
    """PiePlan.posix_timers from tc.timers.posix, by id (same rule for 0 time left)."""
    tc = core.tc
    if not tc.HasField("timers"):
        return []
    out = []
    for p in sorted(tc.timers.posix, key=lambda p: p.it_id):
        value = (p.vsec, p.vnsec) if (p.vsec, p.vnsec) != (0, 0) else (p.isec, p.insec)
        thread = p.notify_thread_id if p.HasField("notify_thread_id") else 0
        out.append((p.it_id, p.clock_id, p.si_signo, p.it_sigev_notify, thread, p.sival_ptr,
                    (p.isec, p.insec) + value))
    return out


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard one while fds are installed (the task's own
    limits come back in set_rlimits at the end)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard, hard


def set_rlimits(limits: list) -> None:
    """The task's resource limits (rlimits_to_set), best effort: without
    CAP_SYS_RESOURCE a hard limit above ours cannot be set, and then ours stays
    (documented in image-contract.md)."""
    for res, cur, hi in limits:
        try:
            resource.setrlimit(res, (cur, hi))
        except (OSError, ValueError):
            pass


def rlimits_to_set(core) -> list:
    """(resource, soft, hard) of the dumped limits that set_rlimits() sets: those that
    differ from ours (the restore command's now, which every task inherits: nothing
    changes them before) and the fd limit, which raise_fd_limit() moves. Made in the
    restore command (RestorerParts): the core's 16 limits read in every task cost it
    protobuf work and a setrlimit each."""
    if not core.tc.HasField("rlimits"):
        return []
    inf = 2**64 - 1
    out = []
    for res, rl in enumerate(core.tc.rlimits.rlimits):
        cur = resource.RLIM_INFINITY if rl.cur == inf else rl.cur
        hi = resource.RLIM_INFINITY if rl.max == inf else rl.max
        if res != resource.RLIMIT_NOFILE:
            try:
                if resource.getrlimit(res) == (cur, hi):
                    continue
            except (OSError, ValueError):
                pass
        out.append((res, cur, hi))
    return out


def block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def sigactions(core) -> dict:
    """signo -> (handler, flags, restorer, mask) from the core (64 entries as criu-py
    0.1 wrote them, or 62 without SIGKILL/SIGSTOP as upstream does)."""
    acts = list(core.tc.sigactions)
    if len(acts) == 64:
        signos = range(1, 65)
    else:
        signos = [s for s in range(1, 65) if s not in (SIGKILL, SIGSTOP)][:len(acts)]
    return {s: (a.sigaction, a.flags, a.restorer, a.mask)
            for s, a in zip(signos, acts) if s not in (SIGKILL, SIGSTOP)}


def thread_registers(core):
    from criu_py import arch_x86
    from criu_py.restore.sigframe import LEGACY_XSAVE_SIZE, TaskRegisters
    ti = core.thread_info
    gp = arch_x86.gpregs_from_entry(ti.gpregs)
    xsave = arch_x86.fpregs_from_entry(ti.fpregs)
    if len(xsave) < LEGACY_XSAVE_SIZE:
        raise RestoreError("core: the dump holds no xsave state")
    # Without its trailing zeros (AMX tile data, ... that the thread did not use: ~8 of
    # 11 KiB here): every thread's registers are held from the planning to the fork, and
    # the frame's area is padded back with zeros to this CPU's size (fpstate_for_sigreturn)
    xsave = xsave[:max(len(xsave.rstrip(b"\0")), LEGACY_XSAVE_SIZE)]
    altstack = (0, 2, 0)                # SS_DISABLE
    th = core.thread_core if core.HasField("thread_core") else None
    if th is not None and th.HasField("sas"):
        sas = th.sas
        if sas.ss_size and not sas.ss_flags & 2:
            altstack = (sas.ss_sp, sas.ss_flags & 0x80000000, sas.ss_size)   # keep SS_AUTODISARM
    mask = th.blk_sigset if th is not None and th.HasField("blk_sigset") else core.tc.blk_sigset
    return TaskRegisters(gp=gp, xsave=xsave, sigmask=mask, altstack=altstack)


task_registers = thread_registers


def thread_creds(th, host):
    """PieCreds of a dumped thread, or None when they are what the restore runs with."""
    from criu_py.restore.pie import PieCreds
    if not th.HasField("creds"):
        return None
    c = th.creds
    creds = PieCreds(uids=(c.uid, c.euid, c.suid, c.fsuid), gids=(c.gid, c.egid, c.sgid, c.fsgid),
                     cap_inh=tuple(c.cap_inh[:2]) or (0, 0), cap_prm=tuple(c.cap_prm[:2]) or (0, 0),
                     cap_eff=tuple(c.cap_eff[:2]) or (0, 0), cap_bnd=tuple(c.cap_bnd[:2]) or (0, 0),
                     cap_amb=tuple(c.cap_amb[:2]) or (0, 0), secbits=c.secbits,
                     no_new_privs=int(c.no_new_privs), groups=tuple(c.groups),
                     cap_last_cap=host.cap_last_cap)
    return None if creds == host.creds else creds


def thread_plan(tid: int, core, trap: bool, host):
    """PieThread of one dumped thread."""
    from criu_py.restore.pie import PieThread
    regs = thread_registers(core)
    th = core.thread_core if core.HasField("thread_core") else None
    pt = PieThread(tid=tid, regs=regs, frame_on_stack=trap,
                   clear_child_tid=core.thread_info.clear_tid_addr)
    if th is None:
        return pt
    if th.HasField("rseq_entry") and th.rseq_entry.rseq_abi_pointer:
        r = th.rseq_entry
        pt.rseq = (r.rseq_abi_pointer, r.rseq_abi_size, r.signature)
    if th.futex_rla:
        pt.robust_list = (th.futex_rla, th.futex_rla_len)
    if th.HasField("sched_policy") and th.sched_policy not in (0,):
        pt.sched = (th.sched_policy, th.sched_prio)
    if th.HasField("sched_nice"):
        pt.nice = th.sched_nice
    comm = th.comm if th.HasField("comm") else (core.tc.comm if core.HasField("tc") else "")
    pt.comm = os.fsencode(comm)
    if th.HasField("signals_p"):
        pt.signals = [s.siginfo for s in th.signals_p.signals]
    pt.creds = thread_creds(th, host)
    if th.HasField("pdeath_sig"):
        pt.pdeath_sig = th.pdeath_sig
    return pt


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


def frames_fit_on_stacks(img) -> bool:
    """Every thread's sigframe can go below its sp (inside one writable private VMA)."""
    from criu_py.restore.pie import frame_bytes_here, stack_frame_addr
    frame = frame_bytes_here()
    for _, core in img.threads:
        sp = core.thread_info.gpregs.sp
        lo = stack_frame_addr(sp, frame)
        if not any(v.start <= lo and sp <= v.end and v.prot & M.PROT_WRITE
                   and not v.status & (M.VMA_FILE_SHARED | M.VMA_ANON_SHARED)
                   for v in img.memory.vmas):
            return False
    return True


def enter_restorer(run: TaskRun, plan) -> None:
    from criu_py.native import lib
    from criu_py.restore import pie
    img = run.t.img
    blob = lib.criu_py_pie_blob_end() - lib.criu_py_pie_blob_start()
    size = pie.region_size(plan, blob)
    base = pie.map_free(size, [(v.start, v.end) for v in img.mm.vmas
                               if not v.status & M.VMA_AREA_VSYSCALL],
                        mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    entry, args, stack = pie.prepare(plan, base, size)
    pie.enter(entry, args, stack)


def report(fd: int, text: str) -> None:
    data = ("T" + text.replace("\n", " ")).encode(errors="surrogateescape")
    try:
        os.write(fd, struct.pack("<I", len(data)) + data)
    except OSError:
        pass

