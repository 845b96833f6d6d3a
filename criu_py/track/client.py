# The commands' side of the tracking holder (track/holder.py): take the state the
# holder of a previous images dir keeps, and start a holder for this dump's dir.
import os
import socket
import sys

from criu_py.errors import CriuError
from criu_py.log import log
from criu_py.track import holder as H

START_TIMEOUT = 20.0


class Lease:
    """State taken from a holder, which waits for our verdict: keep (we did not change
    the tracking state: it serves on), release (exit: we carry on, or tracking ends)."""

    def __init__(self, sock, state: dict, mms: dict):
        self.sock = sock
        self.state = state
        self.mms = mms                  # pid -> TrackedMm (our duplicates of its fds)

    def _say(self, word: bytes) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(word)
        except OSError:
            pass
        self.close()

    def keep(self) -> None:
        self._say(b"keep")

    def release(self) -> None:
        self._say(b"release")

    def close(self) -> None:
        """Without a word: the holder exits, the state being unknown."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def take(images_dir: str) -> Lease | None:
    """The tracking state of the holder of `images_dir`, or None when it has none."""
    from criu_py.track import TrackedMm
    try:
        name = H.socket_name(*H.dir_ident(images_dir))
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(10)
        sock.connect(name)
        if H.peer_uid(sock) != os.geteuid():
            log.warning("the tracking holder of %s runs as another user: ignored", images_dir)
            sock.close()
            return None
        sock.send(b"take")
        state, fds = H.recv_state(sock)
    except (OSError, EOFError, ValueError) as exc:
        log.debug("no tracking holder for %s (%s)", images_dir, exc)
        sock.close()
        return None
    mms = {}
    for i, t in enumerate(state["tasks"]):
        uffd, pagemap_fd, pidfd = fds[3 * i:3 * i + 3]
        mms[t["pid"]] = TrackedMm(t["pid"], t["start"], uffd=uffd, pagemap_fd=pagemap_fd,
                                  pidfd=pidfd)
    return Lease(sock, state, mms)


def start_holder(state: dict, mms: list) -> int:
    """Start a holder with `state` and the fds of `mms`; its pid once it serves."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        b.set_inheritable(True)
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
        argv = [sys.executable, "-m", "criu_py.track.holder", str(b.fileno()),
                state.get("path", "")]
        # the holder imports criu_py.track.holder the way this process found criu_py
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(H.__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
        b.close()
        b = None
        state = dict(state, tasks=[{"pid": m.pid, "start": m.start} for m in mms],
                     protocol=H.PROTOCOL)
        a.settimeout(START_TIMEOUT)
        H.send_state(a, state, [fd for m in mms for fd in m.fds()])
        answer = a.recv(4096)
    except OSError as exc:
        raise CriuError(f"starting the tracking holder failed: {exc.strerror or exc}") from None
    finally:
        a.close()
        if b is not None:
            b.close()
    if answer != b"ready":
        text = answer.decode(errors="replace") or "it exited"
        raise CriuError(f"the tracking holder did not start: {text}")
    return pid
