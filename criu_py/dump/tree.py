# The tree a dump takes: every process below the root PID (children of every thread,
# recursively) and every thread of each, all stopped with PTRACE_SEIZE + PTRACE_INTERRUPT.
# Tasks keep forking and starting threads until they are stopped, so the walk is
# repeated until a pass finds nothing new (as CRIU does); a thread that exits meanwhile
# is dropped, not an error. Zombies are recorded but not seized. A process in a group
# stop (SIGSTOP, or Ctrl-Z's SIGTSTP) is seized like any other: its trap reports the stop
# signal, so it is dumped as stopped, and a detach leaves it stopped (the kernel keeps a
# group stop across ptrace). Which processes share
# an mm, fd table, fs or signal handlers is found with kcmp(2) and numbered as CRIU's
# kernel-object ids (from 2: id 1 is the dumping tool's own, inventory's root_ids).
import os

from criu_py.errors import CriuError, DumpError, NoSuchProcess, Unsupported
from criu_py.log import log
from criu_py.proc import Record

NR_KCMP = 312
KCMP_FILE, KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND = 0, 1, 2, 3, 4
KOBJ_KINDS = (("vm", KCMP_VM), ("files", KCMP_FILES), ("fs", KCMP_FS),
              ("sighand", KCMP_SIGHAND))
FIRST_TASK_KOBJ_ID = 2
MAX_PASSES = 64

NR_VFORK, NR_CLONE, NR_CLONE3 = 58, 56, 435
SIGTRAP, STOP_SIGNALS = 5, (19, 20, 21, 22)     # SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU
CLONE_VM, CLONE_VFORK = 0x100, 0x4000


class Proc(Record):
    """One process of the tree. threads: tids in pstree order (the leader first);
    tracees: tid -> ptrace.Tracee of the stopped threads; zombie: exited, not reaped
    (exit_code: its wait status); kobj: kernel-object kind -> id (vm, files, fs, sighand);
    vfork_child: pid of the child it waits for in vfork() (its leader cannot stop);
    stop_signo: the signal of the group stop it was in when seized, else 0."""
    _fields = ("pid", "ppid", "pgid", "sid", "threads", "tracees", "zombie", "exit_code",
               "comm", "children", "kobj", "vfork_child", "stop_signo")
    zombie = False
    exit_code = 0
    vfork_child = 0
    stop_signo = 0

    def __init__(self, *args, **kwargs):
        self.threads, self.tracees, self.children, self.kobj = [], {}, [], {}
        super().__init__(*args, **kwargs)

    @property
    def leader(self):
        return self.tracees.get(self.pid)


class Tree:
    """The frozen tree: procs in pstree order (root first, then depth first), as
    upstream writes pstree.img. Leaving it releases every task: detached (still
    running, with any injected state undone by the code that injected it), unless
    kill_all() ended them."""

    def __init__(self, root: int):
        self.root = root
        self.timeout = 0
        self.procs: dict[int, Proc] = {}
        self.order: list[Proc] = []
        self.killed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    # ---------------------------------------------------------------- freezing
    def freeze(self, timeout: float = 0) -> None:
        """Seize every thread of every process below the root until a pass finds no new
        task. Raises before returning if the root itself cannot be stopped, or if a task
        has not stopped within `timeout` seconds (dump --timeout; 0: no limit): one in an
        uninterruptible sleep, as a task a cgroup freezer froze, never stops."""
        from criu_py import interrupts
        self.timeout = timeout
        with interrupts.deadline(timeout):
            self._freeze()

    def _freeze(self) -> None:
        from criu_py import proc as P
        new = [self.root]
        for _ in range(MAX_PASSES):
            stopping = []
            for pid in new:
                stopping += self._add_process(pid, P)
            for p in list(self.procs.values()):
                if p.zombie:
                    continue
                stopping += self._seize_new_threads(p, P)
            self._wait_stopped(stopping)
            new = self._unseen_children(P)
            if not new and not stopping:
                break
        else:
            raise CriuError(f"the tree of {self.root} keeps changing: gave up freezing it "
                            f"after {MAX_PASSES} passes")
        self._check_leaders()
        self._note_group_stops()
        self._order()

    def _add_process(self, pid: int, P) -> list:
        try:
            st = P.read_stat(pid)
        except NoSuchProcess:
            if pid == self.root:
                raise
            return []          # exited before we got to it
        p = Proc(pid=pid, ppid=st.ppid, pgid=st.pgid, sid=st.sid, comm=st.comm)
        self.procs[pid] = p
        if st.state == "Z":
            if pid == self.root:
                raise NoSuchProcess(f"pid {pid} is a zombie")
            p.zombie, p.exit_code, p.threads = True, st.exit_code, [pid]
            return []
        if st.state == "t":
            raise Unsupported(f"pid {pid} is stopped by a tracer (a debugger?)")
        if st.flags & 0x00200000:         # PF_KTHREAD
            raise Unsupported(f"pid {pid} is a kernel thread")
        return self._seize_new_threads(p, P)

    def _seize_new_threads(self, p: Proc, P) -> list:
        """Seize + interrupt the threads of p not seized yet; returns their tracees."""
        from criu_py.ptrace import Tracee
        try:
            tids = P.list_threads(p.pid)
        except NoSuchProcess:
            tids = []
        out = []
        for tid in tids:
            if tid in p.tracees:
                continue
            t = Tracee(tid)
            try:
                t.seize_nowait()
            except NoSuchProcess:
                continue                  # the thread exited meanwhile
            except CriuError:
                t.detach()
                raise
            p.tracees[tid] = t
            out.append(t)
        return out

    def _wait_stopped(self, tracees: list) -> None:
        from criu_py import interrupts
        owner = {tid: p for p in self.procs.values() for tid in p.tracees}
        for t in tracees:
            p = owner[t.pid]
            if t.pid == p.pid and self._vfork_blocked(p):
                continue                 # stops only once its vfork child is gone
            try:
                with interrupts.abortable():         # a signal to us, or the timeout
                    t.wait_stopped()
            except interrupts.DeadlineExpired:
                raise DumpError(self._not_stopping(t.pid, p.pid)) from None
            except NoSuchProcess:
                p.tracees.pop(t.pid, None)
                if t.pid == p.pid:
                    raise NoSuchProcess(f"pid {p.pid} exited while the tree was frozen") from None
                log.debug("thread %d of %d exited while the tree was frozen", t.pid, p.pid)

    def _not_stopping(self, tid: int, pid: int) -> str:
        """Why the freeze gave up on thread tid of process pid, in one line."""
        from criu_py import proc as P
        from criu_py.cgroup import frozen_cgroup
        who = f"pid {pid}" if tid == pid else f"thread {tid} of pid {pid}"
        try:
            state, wchan = P.read_stat(tid).state, P.read_wchan(tid)
            frozen = frozen_cgroup(P.read_cgroup(pid, tid))
        except CriuError:
            state, wchan, frozen = "?", "", None
        where = f" in {wchan}" if wchan else ""
        hint = f", in the frozen cgroup {frozen}: thaw it first" if frozen else ""
        return (f"{who} did not stop within {self.timeout:g} s (--timeout): it sleeps in "
                f"state {state}{where}{hint}")

    def _vfork_blocked(self, p: Proc) -> bool:
        """True when p's leader sleeps in vfork() until a child execs or exits: a
        PTRACE_INTERRUPT cannot stop it there."""
        from criu_py import proc as P
        if p.vfork_child:
            return True
        try:
            sc = P.read_syscall(p.pid)
            st = P.read_stat(p.pid)
        except NoSuchProcess:
            return False
        if st.state != "D" or sc.nr not in (NR_VFORK, NR_CLONE, NR_CLONE3):
            return False
        if sc.nr == NR_CLONE and not (sc.args[0] & CLONE_VFORK):
            return False
        for kid in P.read_children(p.pid):
            if kcmp(p.pid, kid, KCMP_VM) == 0:
                p.vfork_child = kid
                log.info("pid %d waits in vfork() for its child %d", p.pid, kid)
                return True
        return False

    def _unseen_children(self, P) -> list[int]:
        out, seen = [], set()
        for p in self.procs.values():
            if p.zombie:
                continue
            try:
                kids = P.read_children(p.pid)
            except NoSuchProcess:
                kids = []
            for kid in kids:
                if kid not in self.procs and kid not in seen:
                    seen.add(kid)
                    out.append(kid)
        return out

    def _check_leaders(self) -> None:
        """A process whose leader could not be seized was exiting: by now it is a zombie
        (its parent is frozen and cannot reap it) or gone; a live process whose main
        thread exited while others run is refused."""
        from criu_py import proc as P
        for p in list(self.procs.values()):
            if p.zombie or p.pid in p.tracees or self._vfork_blocked(p):
                continue
            try:
                st = P.read_stat(p.pid)
            except NoSuchProcess:
                st = None
            if st is None or st.state == "X":
                self._drop(p)
            elif st.state == "Z" and not p.tracees:
                for t in p.tracees.values():
                    t.detach()
                p.tracees, p.zombie, p.exit_code = {}, True, st.exit_code
            else:
                raise Unsupported(f"pid {p.pid}: its main thread has exited while other "
                                  f"threads run: not supported")

    def _note_group_stops(self) -> None:
        """The trap a PTRACE_INTERRUPT brings reports SIGTRAP, or the stop signal when the
        process is in a group stop (a pending SIGSTOP was delivered while it stopped):
        the leader's wait status said which (Tracee.stop_sig)."""
        for p in self.procs.values():
            t = p.leader
            if p.zombie or t is None or p.vfork_child:     # (a vfork parent stops later)
                continue
            signo = t.stop_sig
            if signo in STOP_SIGNALS:
                p.stop_signo = signo
                log.info("pid %d is stopped (signal %d): dumped as stopped", p.pid, signo)
            elif signo != SIGTRAP:
                log.debug("pid %d: its trap reports signal %d", p.pid, signo)

    def _drop(self, p: Proc) -> None:
        if p.pid == self.root:
            raise NoSuchProcess(f"pid {p.pid} exited while the tree was frozen")
        for t in p.tracees.values():
            t.detach()
        del self.procs[p.pid]

    def _order(self) -> None:
        """Parent links from what the kernel says now (all stopped) and pstree order."""
        from criu_py import proc as P
        for p in self.procs.values():
            p.children = []
            p.threads = [p.pid] + sorted(t for t in p.tracees if t != p.pid) \
                if not p.zombie else [p.pid]
        for p in self.procs.values():
            if p.pid == self.root:
                continue
            if not p.zombie:
                p.ppid = P.read_stat(p.pid).ppid
            parent = self.procs.get(p.ppid)
            if parent is None:
                raise CriuError(f"pid {p.pid} left the tree of {self.root} while it was frozen")
            parent.children.append(p)
        for p in self.procs.values():
            p.children.sort(key=lambda c: c.pid)
        self.order = []
        stack = [self.procs[self.root]]
        while stack:
            p = stack.pop()
            self.order.append(p)
            stack.extend(reversed(p.children))

    # ---------------------------------------------------------------- sharing
    def number_kernel_objects(self) -> None:
        """kobj ids for vm, files, fs and sighand: processes that share one get the same
        id (kcmp), the others their own; numbered from FIRST_TASK_KOBJ_ID."""
        import functools
        alive = [p for p in self.order if not p.zombie]
        position = {p.pid: i for i, p in enumerate(alive)}
        for kind, kcmp_type in KOBJ_KINDS:
            # kcmp orders the objects (1: less, 2: greater): sort, then equal ones are
            # neighbours; n log n calls instead of one per pair.
            def cmp(a, b, t=kcmp_type):
                r = kcmp(a.pid, b.pid, t)
                if r < 0 or r > 2:
                    raise CriuError(f"kcmp of {a.pid} and {b.pid} failed ({r})")
                return (0, -1, 1)[r]
            groups: list[list[Proc]] = []
            for p in sorted(alive, key=functools.cmp_to_key(cmp)):
                if groups and cmp(groups[-1][0], p) == 0:
                    groups[-1].append(p)
                else:
                    groups.append([p])
            # ids in pstree order of each group's first process, as a linear scan gives
            groups.sort(key=lambda g: min(position[p.pid] for p in g))
            for i, g in enumerate(groups):
                for p in g:
                    p.kobj[kind] = FIRST_TASK_KOBJ_ID + i

    # ---------------------------------------------------------------- release
    def stopped_threads(self):
        """(proc, tracee) for every stopped thread, leaders first within a process."""
        for p in self.order:
            for tid in p.threads:
                t = p.tracees.get(tid)
                if t is not None and not t.dead:
                    yield p, t

    def kill_all(self) -> None:
        """End every task (the default end of a dump): SIGKILL each process once."""
        import signal
        for p in self.order:
            if p.zombie:
                continue
            t = p.leader
            if t is not None:
                t.kill(wait=False)
            else:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for tr in p.tracees.values():
                tr.attached, tr.dead = False, True
        self.killed = True

    def release(self, stop: bool = False) -> None:
        """Detach every thread still traced: the tasks run on, or go back into the group
        stop they were in. With stop (dump --leave-stopped), each process gets a SIGSTOP
        first, which it takes as it leaves the trace: it stops before running its code."""
        import signal
        for p in self.procs.values():
            if stop and not p.zombie and p.tracees:
                try:
                    os.kill(p.pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            for t in p.tracees.values():
                if not t.dead:
                    t.detach()


_SYSCALL6 = None


def kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> int:
    """kcmp(2): 0 when the two tasks' objects are the same, else 1/2 (ordering); -errno."""
    global _SYSCALL6
    if _SYSCALL6 is None:               # looked up once: a dump makes n log n calls
        from criu_py.native import lib
        _SYSCALL6 = lib.criu_py_raw_syscall6
    return _SYSCALL6(NR_KCMP, pid1, pid2, kind, idx1, idx2, 0)
