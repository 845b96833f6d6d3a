# The lazy-pages daemon's guard: what keeps a lazily restored task from ever seeing wrong
# memory when the daemon dies before its work is done.
#
# When the last reference to a userfaultfd closes, the kernel forgets its registrations
# and wakes the faulting threads: a missing page of private anonymous memory is then
# simply filled with zeros. A daemon killed mid-way (SIGKILL, OOM) closes its uffds as it
# dies, so without more, a task would go on with zeros where its data should be - silently
# wrong. So the daemon forks this guard first and hands it a duplicate of every uffd it
# takes (and of those UFFD_EVENT_FORK brings), with the task's pidfd; "done" when a task
# has all its pages (the guard drops its copy then). When the daemon's end of the socket
# pair closes without a "bye", the daemon is gone with work undone: while the guard still
# holds the uffds (faulting threads stay asleep in the kernel, no zero fill), it SIGKILLs
# every task not done, with their descendants (forked children have a uffd of their own,
# but no pid the daemon knows), and only then closes the uffds and exits.
# So: the task is killed, never left running on wrong memory. The guard runs in a session
# of its own and ignores SIGINT/SIGTERM/SIGHUP (a signal to the daemon's process group must
# not take it along); comm `criu-py-guard`.
import os
import signal
import socket


def start() -> socket.socket:
    """Fork the guard; returns the daemon's end of the socket pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            code = _run(theirs)
        finally:
            os._exit(code)
    theirs.close()
    os.waitpid(pid, 0)              # the first child leaves at once (see _run)
    return ours


def hold(sock: socket.socket, key: int, pid: int, uffd: int, pidfd: int = -1) -> None:
    fds = [uffd] + ([pidfd] if pidfd >= 0 else [])
    socket.send_fds(sock, [f"hold {key} {pid}".encode()], fds)
    if sock.recv(16) != b"ok":
        raise OSError("the guard did not take the userfaultfd")


def done(sock: socket.socket, key: int) -> None:
    sock.send(f"done {key}".encode())


def bye(sock: socket.socket, timeout: float = 5.0) -> None:
    """All done: the guard lets go of what it holds and exits; we wait until it has."""
    try:
        sock.send(b"bye")
        sock.settimeout(timeout)
        while sock.recv(16):
            pass
    except OSError:
        pass
    sock.close()


def _set_name() -> None:
    try:
        from criu_py.native import ffi, lib
        name = ffi.new("char[16]", b"criu-py-guard")
        lib.criu_py_restore_syscall(157, 15, int(ffi.cast("uintptr_t", name)), 0, 0, 0, 0)
    except Exception:   # noqa: BLE001 - a name is a nicety
        pass


def _run(sock: socket.socket) -> int:
    # Leave the daemon's session and process group; then a second fork, so that the guard
    # is nobody's child who would have to reap it (it is reparented to init or the
    # nearest subreaper, like the daemon's other orphans).
    os.setsid()
    if os.fork():
        os._exit(0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    _set_name()
    held = {}                       # key -> (pid, uffd, pidfd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 256, 4)
        except InterruptedError:
            continue
        except OSError:
            msg, fds = b"", []
        if not msg:
            break                   # the daemon is gone
        words = msg.split()
        if words[0] == b"hold":
            key, pid = int(words[1]), int(words[2])
            held[key] = (pid, fds[0], fds[1] if len(fds) > 1 else -1)
            sock.send(b"ok")
        elif words[0] == b"done":
            entry = held.pop(int(words[1]), None)
            if entry is not None:
                _close(entry)
        elif words[0] == b"bye":
            for entry in held.values():
                _close(entry)
            return 0
    # The daemon died with work undone: kill before letting go of anything.
    from criu_py.proc import descendants
    pids = {pid for pid, _, _ in held.values() if pid > 0}
    victims = set(pids)
    for pid in pids:
        victims.update(descendants(pid))
    for pid, _, pidfd in held.values():
        if pidfd >= 0:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for entry in held.values():
        _close(entry)
    return 0


def _close(entry) -> None:
    for fd in entry[1:]:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
