# `criu-py lazy-pages -D DIR [--page-server --address A --port N]`: the daemon that fills
# the memory of lazily restored tasks (criu_py/lazy/__init__.py has the hand-over).
#
# It starts by reading which processes of DIR will hand it a userfaultfd (lazy/ranges.py)
# and checking the images it reads, forks its guard (lazy/guard.py), listens on
# WORKDIR/lazy-pages.socket and then runs one loop (epoll) until every expected task has
# come and has all its pages:
#   - a page fault is answered at once: UFFDIO_COPY of the FAULT_CHUNK-aligned window
#     around it (what is still missing of it), or a zero page where nothing was dumped;
#   - the events of a running task move what is left to bring: UFFD_EVENT_FORK (the
#     child gets a uffd of its own and a copy of what its parent still lacks),
#     UFFD_EVENT_REMAP (mremap: the pages move with their data), UFFD_EVENT_REMOVE and
#     UFFD_EVENT_UNMAP (madvise(DONTNEED), munmap: nothing to bring there any more);
#   - with nothing to answer, the rest is pushed in the background, BACKGROUND_CHUNK at a
#     time, in address order from the last fault on (wrapping around), one task after the
#     other;
#   - a task whose memory is gone (exit, exec: ESRCH) is done; a task with every page in
#     is done: its uffd is closed (the registrations go with it: memory never dumped gets
#     zeros from the kernel from then on, as it should).
# Pages come from mapped pages files, each piece checked against the dump's digests the
# first time it is used, or from the dump's page server (lazy-pages --page-server). Any
# failure (a damaged piece, a page server that goes away) ends the daemon with one Error
# line, and its guard then kills the tasks that were still waiting: never wrong memory.
import errno
import json
import os
import select
import socket
import time

from criu_py.commands import notify_status_fd
from criu_py.errors import CriuError, ImageError
from criu_py.log import log

FAULT_CHUNK = 64 << 10
BACKGROUND_CHUNK = 2 << 20
MAX_MSGS = 64
UFFD_EVENT_PAGEFAULT, UFFD_EVENT_FORK, UFFD_EVENT_REMAP = 0x12, 0x13, 0x14
UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP = 0x15, 0x16


class LazyError(CriuError):
    pass


class Task:
    """One userfaultfd being served: a restored process, or a child one of them forked
    (pid 0: not known)."""

    def __init__(self, key: int, pid: int, uffd: int, segs: list, parent=None):
        self.key = key
        self.pid = pid
        self.uffd = uffd
        self.segs = segs             # sorted [start, end, source, offset]: still to bring
        self.parent = parent
        self.cursor = 0              # background fill goes on from here
        # its ranges are registered (the restore said the tree runs, or a message came
        # from its uffd): only then can pages be pushed without a fault asking
        self.registered = parent is not None
        self.pidfd = -1
        self.total = sum(e - s for s, e, _, _ in segs)
        self.faulted = self.pushed = self.faults = 0
        self.started = time.monotonic()

    def name(self) -> str:
        return f"pid {self.pid}" if self.pid else f"a child of {self.parent.name()}"


# ---------------------------------------------------------------- segment lists
def _find(segs: list, addr: int) -> int:
    """Index of the first segment whose end is above addr."""
    lo, hi = 0, len(segs)
    while lo < hi:
        mid = (lo + hi) // 2
        if segs[mid][1] <= addr:
            lo = mid + 1
        else:
            hi = mid
    return lo


def take(segs: list, lo: int, hi: int) -> list:
    """Cut [lo, hi) out of segs; the pieces cut, in order."""
    out, rest = [], []
    i = j = _find(segs, lo)
    while j < len(segs) and segs[j][0] < hi:
        s, e, src, off = segs[j]
        a, b = max(s, lo), min(e, hi)
        out.append([a, b, src, off + (a - s)])
        if s < a:
            rest.append([s, a, src, off])
        if b < e:
            rest.append([b, e, src, off + (b - s)])
        j += 1
    segs[i:j] = rest
    return out


def put_back(segs: list, pieces: list) -> None:
    for p in pieces:
        i = _find(segs, p[0])
        segs.insert(i, list(p))


def shift(segs: list, frm: int, to: int, length: int) -> None:
    moved = take(segs, frm, frm + length)
    for p in moved:
        p[0] += to - frm
        p[1] += to - frm
    take(segs, to, to + length)          # nothing of the old contents there survives
    put_back(segs, moved)


# ---------------------------------------------------------------- the daemon
class Daemon:
    def __init__(self, opts: dict):
        self.opts = opts
        self.images_dir = opts.get("images_dir") or "."
        self.work_dir = opts.get("work_dir") or self.images_dir
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.lookup = None
        self.remote = None            # pageserver.client.LazyClient
        self.expected = {}            # pid -> lazy ranges (lazy.ranges.expected_tasks)
        self.arrived = set()
        self.tasks = {}               # uffd -> Task
        self.by_pidfd = {}
        self.conns = {}
        self.guard = None
        self.listen = None
        self.epoll = None
        self.next_key = 1
        self.rr = 0                   # round robin over tasks for the background
        self.delay_until = None       # test hook: no background fill before this
        self.failure = None
        self.t_first = None
        self.bytes_faulted = self.bytes_pushed = 0
        self.msgs = None

    # ------------------------------------------------------------ set-up
    def prepare(self) -> None:
        from criu_py.images import ImageDir
        from criu_py.lazy import ranges, socket_path
        from criu_py.lazy.source import Lookup
        from criu_py.native import ffi
        images = ImageDir(self.images_dir)
        try:
            self.expected = ranges.expected_tasks(images, self.page_size)
            self.lookup = Lookup(images, self.page_size, remote=bool(self.opts.get("page_server")))
        except BaseException:
            images.close()
            raise
        # every segment of every expected task resolves now: a missing source or parent
        # fails here, before anything is restored
        self.plans = {pid: self.lookup.segments(pid, r) for pid, r in self.expected.items()}
        if self.opts.get("page_server"):
            from criu_py.pageserver.client import LazyClient
            self.remote = LazyClient(self.opts.get("address") or "127.0.0.1", self.opts["port"])
        self.msgs = ffi.new("struct cp_uffd_msg[]", MAX_MSGS)
        self.done_out = ffi.new("uint64_t *")
        path = socket_path(self.work_dir)
        if os.path.lexists(path):
            _remove_stale_socket(path)
        self.listen = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            self.listen.bind(path)
        except OSError as exc:
            raise LazyError(f"cannot listen at {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        self.listen.listen(64)
        self.socket_path = path
        from criu_py.lazy import guard
        self.guard = guard.start()
        self.epoll = select.epoll()
        self.epoll.register(self.listen.fileno(), select.EPOLLIN)
        delay = os.environ.get("CRIU_PY_TEST_LAZY_DELAY")
        self.test_delay = float(delay) if delay else 0.0
        total = sum(e - s for segs in self.plans.values() for s, e, _, _ in segs)
        log.info("lazy-pages: serving %s for %d task(s) (%d MiB to bring), socket %s",
                 self.images_dir, len(self.expected), total >> 20, path)

    def close(self) -> None:
        for t in list(self.tasks.values()):
            self._close_task(t, done=False)
        for c in list(self.conns.values()):
            c.close()
        if self.listen is not None:
            self.listen.close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self.remote is not None:
            self.remote.close(ok=self.failure is None)
        if self.lookup is not None:
            self.lookup.close()

    # ------------------------------------------------------------ main loop
    def run(self) -> int:
        if not self.expected:
            log.info("lazy-pages: no process of %s has lazy memory: nothing to do",
                     self.images_dir)
            return 0
        notify_status_fd(self.opts)
        while len(self.arrived) < len(self.expected) or self.tasks:
            self.step()
        return 0

    def step(self) -> None:
        background = any(t.segs and t.registered for t in self.tasks.values())
        timeout = -1
        if background:
            timeout = 0
            if self.delay_until is not None:
                left = self.delay_until - time.monotonic()
                if left > 0:
                    timeout = left
        events = self.epoll.poll(timeout)
        for fd, _ in events:
            if fd == self.listen.fileno():
                self._accept()
            elif fd in self.conns:
                self._request(fd)
            elif fd in self.tasks:
                self.drain(self.tasks[fd])
            elif fd in self.by_pidfd:
                t = self.by_pidfd[fd]
                log.debug("lazy-pages: %s exited", t.name())
                self._close_task(t, done=True)
        if not events and background and (self.delay_until is None
                                          or time.monotonic() >= self.delay_until):
            self.background_step()

    # ------------------------------------------------------------ hand-over socket
    def _accept(self) -> None:
        conn, _ = self.listen.accept()
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], "little") != os.geteuid():
            conn.close()
            return
        self.conns[conn.fileno()] = conn
        self.epoll.register(conn.fileno(), select.EPOLLIN)

    def _request(self, fd: int) -> None:
        conn = self.conns[fd]
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            self._drop_conn(fd)
            return
        msg = {}
        try:
            msg = json.loads(data)
            reply = self._answer(msg, fds)
        except (ValueError, KeyError, TypeError) as exc:
            for x in fds:
                os.close(x)
            reply = {"error": f"bad request ({exc})"}
        except LazyError as exc:
            for x in fds:
                os.close(x)
            reply = {"error": str(exc)}
        try:
            conn.send(json.dumps(reply).encode())
        except OSError:
            pass
        self._drop_conn(fd)
        if isinstance(msg, dict) and msg.get("op") == "abort":
            raise LazyError(f"the restore failed ({msg.get('reason', 'no reason given')})")

    def _drop_conn(self, fd: int) -> None:
        conn = self.conns.pop(fd)
        self.epoll.unregister(fd)
        conn.close()

    def _answer(self, msg: dict, fds: list) -> dict:
        from criu_py.lazy import dir_ident
        op = msg["op"]
        if op == "hello":
            return {"dir": dir_ident(self.images_dir), "path": os.path.abspath(self.images_dir)}
        if op == "abort":
            return {"ok": True}
        if op == "running":
            pids = {int(p) for p in msg["pids"]}
            for t in self.tasks.values():
                if t.pid in pids:
                    t.registered = True
            return {"ok": True}
        if op != "task" or len(fds) != 1:
            raise LazyError(f"unknown request {op!r}")
        pid = int(msg["pid"])
        ranges = [(int(s), int(e)) for s, e in msg["ranges"]]
        if pid not in self.expected or pid in self.arrived:
            raise LazyError(f"pid {pid} has no lazy memory in {self.images_dir} (or came twice)")
        if ranges != list(self.expected[pid]):
            raise LazyError(f"pid {pid}: its lazy ranges differ from those of the images")
        self.arrived.add(pid)
        t = Task(self._key(), pid, fds[0], [list(s) for s in self.plans.pop(pid)])
        try:
            t.pidfd = os.pidfd_open(pid)
        except OSError:
            t.pidfd = -1
        self._add_task(t)
        if self.t_first is None:
            self.t_first = time.monotonic()
            if self.test_delay:
                self.delay_until = self.t_first + self.test_delay
        log.info("lazy-pages: pid %d handed over its userfaultfd (%d MiB to bring)",
                 pid, t.total >> 20)
        return {"ok": True}

    def _key(self) -> int:
        self.next_key += 1
        return self.next_key

    def _add_task(self, t: Task) -> None:
        from criu_py.lazy import guard
        try:
            guard.hold(self.guard, t.key, t.pid, t.uffd, t.pidfd)
        except OSError as exc:
            raise LazyError(f"the guard is gone ({exc})") from None
        self.tasks[t.uffd] = t
        self.epoll.register(t.uffd, select.EPOLLIN)
        if t.pidfd >= 0:
            self.by_pidfd[t.pidfd] = t
            self.epoll.register(t.pidfd, select.EPOLLIN)
        if not t.segs:
            self._close_task(t, done=True)

    def _close_task(self, t: Task, done: bool) -> None:
        from criu_py.lazy import guard
        if t.uffd not in self.tasks:
            return
        del self.tasks[t.uffd]
        self.epoll.unregister(t.uffd)
        os.close(t.uffd)
        if t.pidfd >= 0:
            self.by_pidfd.pop(t.pidfd, None)
            self.epoll.unregister(t.pidfd)
            os.close(t.pidfd)
        if done:
            try:
                guard.done(self.guard, t.key)
            except OSError:
                pass
            dt = time.monotonic() - t.started
            log.info("lazy-pages: %s done: %d KiB on faults (%d faults), %d KiB pushed, "
                     "%.1f ms", t.name(), t.faulted >> 10, t.faults, t.pushed >> 10, dt * 1e3)

    # ------------------------------------------------------------ uffd messages
    def drain(self, t: Task) -> None:
        """Read and answer everything the uffd has queued (events in their order)."""
        from criu_py.native import lib
        for _ in range(1000):
            if t.uffd not in self.tasks:
                return
            n = lib.cp_uffd_read_msgs(t.uffd, self.msgs, MAX_MSGS)
            if n < 0:
                if n == -errno.ESRCH:
                    self._close_task(t, done=True)
                    return
                raise LazyError(f"{t.name()}: reading its userfaultfd: {os.strerror(-n)}")
            if n == 0:
                break
            t.registered = True
            retry = []
            for i in range(n):
                m = self.msgs[i]
                ev = m.event
                if ev == UFFD_EVENT_PAGEFAULT:
                    addr = m.arg1 & ~(self.page_size - 1)
                    if not self.fault(t, addr):
                        retry.append(addr)
                elif ev == UFFD_EVENT_FORK:
                    self.fork(t, int(m.arg0))
                elif ev == UFFD_EVENT_REMAP:
                    log.debug("lazy-pages: %s: mremap %#x -> %#x (%d KiB)", t.name(),
                              m.arg0, m.arg1, m.arg2 >> 10)
                    shift(t.segs, m.arg0, m.arg1, m.arg2)
                elif ev in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
                    log.debug("lazy-pages: %s: %s %#x-%#x", t.name(),
                              "remove" if ev == UFFD_EVENT_REMOVE else "unmap", m.arg0, m.arg1)
                    take(t.segs, m.arg0, m.arg1)
                if t.uffd not in self.tasks:
                    return
            for addr in retry:
                # the layout was changing (EAGAIN): the event is read by now
                for _ in range(1000):
                    if t.uffd not in self.tasks or self.fault(t, addr):
                        break
                    self._read_events_only(t)
            if t.uffd in self.tasks and not t.segs:
                self._close_task(t, done=True)
                return

    def _read_events_only(self, t: Task) -> None:
        """Between retries of a fault: take the non-fault events queued (the layout change
        that made the copy fail), keep the faults for the normal loop."""
        from criu_py.native import lib
        n = lib.cp_uffd_read_msgs(t.uffd, self.msgs, MAX_MSGS)
        if n <= 0:
            time.sleep(0.0002)
            return
        for i in range(n):
            m = self.msgs[i]
            if m.event == UFFD_EVENT_PAGEFAULT:
                self.fault(t, m.arg1 & ~(self.page_size - 1))
            elif m.event == UFFD_EVENT_FORK:
                self.fork(t, int(m.arg0))
            elif m.event == UFFD_EVENT_REMAP:
                shift(t.segs, m.arg0, m.arg1, m.arg2)
            elif m.event in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
                take(t.segs, m.arg0, m.arg1)

    def fault(self, t: Task, addr: int) -> bool:
        """Answer a fault at addr; False: try again once the pending events are read."""
        from criu_py.native import lib
        t.faults += 1
        lo = addr - addr % FAULT_CHUNK
        i = _find(t.segs, addr)
        if i < len(t.segs) and t.segs[i][0] <= addr:
            s, e = t.segs[i][0], t.segs[i][1]
            r = self.serve(t, max(lo, s), min(lo + FAULT_CHUNK, e), faulted=True)
            if r == "again":
                return False
            if r == "gone":
                return True
            t.cursor = min(lo + FAULT_CHUNK, e)
        else:
            # nothing was dumped here (or it was brought already, or dropped by
            # DONTNEED): zeros, as the kernel would have given
            r = lib.cp_uffd_fill(t.uffd, addr, 0, self.page_size, 0, self.done_out)
            if r == -errno.EAGAIN:
                return False
            if r in (-errno.ESRCH, -errno.ENOSPC):
                self._close_task(t, done=True)
                return True
        lib.cp_uffd_wake_range(t.uffd, addr, self.page_size)
        return True

    def fork(self, parent: Task, ufd: int) -> None:
        child = Task(self._key(), 0, ufd, [list(s) for s in parent.segs], parent=parent)
        child.cursor = parent.cursor
        log.debug("lazy-pages: %s forked (%d KiB still to bring)", parent.name(),
                  child.total >> 10)
        self._add_task(child)

    # ------------------------------------------------------------ moving pages
    def background_step(self) -> None:
        tasks = [t for t in self.tasks.values() if t.segs and t.registered]
        if not tasks:
            return
        t = tasks[self.rr % len(tasks)]
        self.rr += 1
        i = _find(t.segs, t.cursor)
        if i >= len(t.segs):
            i = 0
        s, e = t.segs[i][0], t.segs[i][1]
        lo = max(s, t.cursor) if t.segs[i][0] <= t.cursor < e else s
        hi = min(e, lo + BACKGROUND_CHUNK)
        r = self.serve(t, lo, hi, faulted=False)
        if r == "again":
            self.drain(t)
            return
        if t.uffd in self.tasks:
            t.cursor = hi
            if not t.segs:
                self._close_task(t, done=True)

    def serve(self, t: Task, lo: int, hi: int, faulted: bool) -> str:
        """Copy what is still to bring of [lo, hi) into t: "ok", "again" (layout
        changing: read the events, then retry) or "gone" (the task's memory is gone)."""
        from criu_py.lazy.source import REMOTE
        from criu_py.native import lib
        pieces = take(t.segs, lo, hi)
        for k, (a, b, src, off) in enumerate(pieces):
            if src == REMOTE:
                ptr = self.remote.fetch(t.pid or self._root_pid(t), off, b - a)
            else:
                try:
                    ptr = self.lookup.files[src].address(off, b - a)
                except ImageError as exc:
                    raise LazyError(f"{exc}: not served to {t.name()}") from None
            r = lib.cp_uffd_fill(t.uffd, a, ptr, b - a, 0, self.done_out)
            done = self.done_out[0]
            self._count(t, done if r else b - a, faulted)
            if r == 0:
                continue
            rest = [[a + done, b, src, off + done]] + [list(p) for p in pieces[k + 1:]]
            if r == -errno.EAGAIN:
                put_back(t.segs, rest)
                return "again"
            if r == -errno.ENOENT:
                # that page is no longer registered (unmapped meanwhile: its event
                # follows); drop it, keep the rest
                rest[0][0] += self.page_size
                rest[0][3] += self.page_size
                put_back(t.segs, [p for p in rest if p[0] < p[1]])
                return "again"
            if r in (-errno.ESRCH, -errno.ENOSPC):
                self._close_task(t, done=True)
                return "gone"
            raise LazyError(f"{t.name()}: UFFDIO_COPY at {a + done:#x}: {os.strerror(-r)}")
        return "ok"

    def _root_pid(self, t: Task) -> int:
        while t.parent is not None:
            t = t.parent
        return t.pid

    def _count(self, t: Task, n: int, faulted: bool) -> None:
        if faulted:
            t.faulted += n
            self.bytes_faulted += n
        else:
            t.pushed += n
            self.bytes_pushed += n


def _remove_stale_socket(path: str) -> None:
    """A socket left by a daemon that died: removed; one that answers: refused."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise LazyError(f"another lazy-pages daemon listens at {path}")


def lazy_pages(opts: dict) -> int:
    """The lazy-pages command."""
    d = Daemon(opts)
    t0 = time.monotonic()
    try:
        d.prepare()
        rc = d.run()
    except BaseException as exc:
        d.failure = exc
        raise
    finally:
        d.close()
        if d.guard is not None:
            from criu_py.lazy import guard
            if d.failure is None:
                guard.bye(d.guard)
            else:
                d.guard.close()          # the guard kills what was still waiting
    moved = d.bytes_faulted + d.bytes_pushed
    del t0
    if d.t_first is not None:
        dt = time.monotonic() - d.t_first
        log.info("lazy-pages: all done: %d MiB in %.1f ms since the first hand-over "
                 "(%.2f GB/s; %d KiB on faults, %d MiB in the background)", moved >> 20,
                 dt * 1e3, moved / dt / 1e9 if dt else 0.0, d.bytes_faulted >> 10,
                 d.bytes_pushed >> 20)
    return rc
