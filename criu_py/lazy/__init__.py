# Lazy restore (CRIU's split): `restore --lazy-pages` brings a tree back with the memory
# of its lazy ranges (lazy/ranges.py) left empty and registered with a userfaultfd in
# missing mode, and lets it run at once; `lazy-pages -D DIR` (lazy/daemon.py) fills that
# memory: each page fault with UFFDIO_COPY of the pages around it, and the rest in the
# background, in address order from the last fault on, until every page is in; then it
# closes the userfaultfd and exits.
#
# The hand-over (this module): each restored task makes its userfaultfd itself while it
# is still running Python (the uffd belongs to the mm of its maker, which is the task's
# for good: the restorer replaces the mappings, never the mm), asks for the events of a
# running task (fork, mremap, madvise(DONTNEED)/munmap), and sends it with its pid and
# lazy ranges to the daemon over the unix socket lazy-pages.socket in the work dir
# (SOCK_SEQPACKET; a JSON message and the fd as SCM_RIGHTS; the daemon answers once it
# and its guard hold the fd). Only then does its restorer map the memory, read the other
# pages and register the lazy ranges: every fault from then on - even one the kernel takes
# on the task's behalf - reaches a daemon that already holds the uffd.
#
# Pages can be pushed into a task only once its restorer has registered the ranges: the
# restore command says so ("running") once it has let the tree go; a fault or an event
# read from a task's uffd says it too.
#
# The restore command first asks the daemon whether it serves these images ("hello"),
# and tells it when the restore failed ("abort"), so that it does not wait for tasks
# that will never come.
import json
import os
import socket

from criu_py.errors import CriuError, RestoreError

SOCKET_NAME = "lazy-pages.socket"
NR_USERFAULTFD = 323
# UFFD_FEATURE_* (linux/userfaultfd.h): the events of a running task the daemon follows
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
FEATURES = (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
            UFFD_FEATURE_EVENT_UNMAP)
MAX_MESSAGE = 1 << 20
TIMEOUT = 30.0


def socket_path(work_dir: str) -> str:
    return os.path.join(work_dir or ".", SOCKET_NAME)


def dir_ident(path: str) -> list:
    st = os.stat(path)
    return [st.st_dev, st.st_ino]


def _connect(work_dir: str) -> socket.socket:
    path = socket_path(work_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], "little") != os.geteuid():
            raise RestoreError(f"the lazy-pages daemon at {path} runs as another user")
    except OSError as exc:
        sock.close()
        raise RestoreError(f"no lazy-pages daemon at {path} ({exc.strerror or exc}): start "
                           f"`criu-py lazy-pages -D DIR` first") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _ask(sock: socket.socket, msg: dict, fds=()) -> dict:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)
    answer = sock.recv(MAX_MESSAGE)
    if not answer:
        raise RestoreError("the lazy-pages daemon hung up")
    reply = json.loads(answer)
    if reply.get("error"):
        raise RestoreError(f"the lazy-pages daemon refused: {reply['error']}")
    return reply


def check_daemon(work_dir: str, images_dir: str) -> None:
    """restore --lazy-pages, before anything is made: a daemon listens in the work dir
    and serves these very images."""
    sock = _connect(work_dir)
    try:
        reply = _ask(sock, {"op": "hello", "dir": dir_ident(images_dir)})
    except (OSError, ValueError) as exc:
        raise RestoreError(f"the lazy-pages daemon at {socket_path(work_dir)} does not "
                           f"answer ({exc})") from None
    finally:
        sock.close()
    if reply.get("dir") != dir_ident(images_dir):
        raise RestoreError(f"the lazy-pages daemon at {socket_path(work_dir)} serves "
                           f"{reply.get('path')}, not {images_dir}")


def abort(work_dir: str, reason: str) -> None:
    """The restore failed: the daemon stops waiting (best effort)."""
    try:
        sock = _connect(work_dir)
    except CriuError:
        return
    try:
        sock.settimeout(2)
        _ask(sock, {"op": "abort", "reason": reason})
    except (CriuError, OSError, ValueError):
        pass
    finally:
        sock.close()


def make_uffd() -> int:
    """A userfaultfd of this process's mm (kernel faults included: no USER_MODE_ONLY)
    with the events of a running task."""
    from criu_py.native import lib
    fd = lib.criu_py_restore_syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK, 0, 0, 0, 0, 0)
    if fd < 0:
        raise RestoreError(f"userfaultfd() failed: {os.strerror(-fd)}")
    try:
        from criu_py.track.uffd import api
        offered = api(fd, FEATURES)
        if offered & FEATURES != FEATURES:
            raise RestoreError("this kernel's userfaultfd lacks the fork/mremap/remove/unmap "
                               "events a lazy restore needs")
    except BaseException:
        os.close(fd)
        raise
    return fd


def hand_over(work_dir: str, pid: int, uffd: int, ranges: list) -> None:
    """In the task, before its restorer runs: give the daemon our userfaultfd."""
    sock = _connect(work_dir)
    try:
        _ask(sock, {"op": "task", "pid": pid, "ranges": [[s, e] for s, e in ranges]}, [uffd])
    except (OSError, ValueError) as exc:
        raise RestoreError(f"handing the userfaultfd to the lazy-pages daemon failed: {exc}") from None
    finally:
        sock.close()


def tasks_run(work_dir: str, pids: list) -> None:
    """After the restore let the tree go: their ranges are registered, the daemon may
    push pages now. Best effort: a daemon that is gone has its guard kill the tasks."""
    if not pids:
        return
    try:
        sock = _connect(work_dir)
    except CriuError:
        return
    try:
        # not waiting for the answer: the tree runs already, the restore need not wait
        # for a daemon busy with its faults
        sock.send(json.dumps({"op": "running", "pids": list(pids)}).encode())
    except OSError:
        pass
    finally:
        sock.close()
