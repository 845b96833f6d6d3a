# The tracking holder: a small process that keeps the userfaultfds of tracked tasks open
# between two criu-py commands. Write tracking with uffd-wp lasts only as long as the
# uffd is open somewhere, and `pre-dump` and `dump` are separate processes; the tasks
# themselves must not hold it (a tracked program sees no extra fd). So each pre-dump
# (or `dump --track-mem --leave-running`) hands the uffds, with a pagemap fd and a pidfd
# per tracked process, to a holder started for its images dir, and the next command
# finds that holder by the dir: an abstract unix socket named after the dir's device and
# inode. The holder exits when its state is taken for good, when every tracked process
# has exited or exec'ed, or when the command that took it dies (its tracking state is
# then unknown: the next dump falls back to a full one).
#
# Protocol (SOCK_SEQPACKET, peers must have our effective uid): "take" -> a JSON state
# message, then the fds in batches; then the taker says "keep" (it did not touch the
# tracking state: serve on) or "release" (exit), and EOF means release. "quit" ends a
# holder; "status" returns the JSON state without fds.
#
# Run as `python -m criu_py.track.holder FD DIR`, FD a socket on which the spawning
# command sends the initial state. Imports only the standard library.
import errno
import json
import os
import select
import socket
import struct
import sys
import time

NAME_PREFIX = "criu-py-track:"
MAX_FDS_PER_MSG = 240           # SCM_MAX_FD is 253
MSG_MAX = 1 << 20
CHECK_EVERY = 1.0               # seconds between checks for exec'ed tasks
PROTOCOL = 1


def socket_name(dev: int, ino: int) -> bytes:
    """The abstract socket name of the holder for the images dir (dev, ino)."""
    return b"\0" + f"{NAME_PREFIX}{dev}:{ino}".encode()


def dir_ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def send_state(sock: socket.socket, state: dict, fds: list[int]) -> None:
    """The JSON state, then its fds in batches (the state says how many)."""
    state = dict(state, nfds=len(fds))
    sock.sendmsg([json.dumps(state).encode()])
    for i in range(0, len(fds), MAX_FDS_PER_MSG):
        socket.send_fds(sock, [b"F"], fds[i:i + MAX_FDS_PER_MSG])


def recv_state(sock: socket.socket) -> tuple[dict, list[int]]:
    data = sock.recv(MSG_MAX)
    if not data:
        raise EOFError("the peer closed the connection")
    state = json.loads(data)
    fds = []
    while len(fds) < state["nfds"]:
        _, got, _, _ = socket.recv_fds(sock, 16, MAX_FDS_PER_MSG)
        if not got:
            for fd in fds:
                os.close(fd)
            raise EOFError("the peer closed the connection before sending every fd")
        fds += got
    return state, fds


# ---------------------------------------------------------------- the daemon
class Holder:
    def __init__(self, state: dict, fds: list[int]):
        self.state = state
        self.tasks = []              # [task dict, [uffd, pagemap fd, pidfd]]
        for i, t in enumerate(state["tasks"]):
            self.tasks.append([t, fds[3 * i:3 * i + 3]])
        self.listener = None

    def drop(self, entry, why: str) -> None:
        for fd in entry[1]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.tasks.remove(entry)

    def check_tasks(self) -> None:
        """Drop tasks that exited (pidfd readable) or exec'ed (their old pagemap fd reads
        nothing): they are not tracked any more."""
        for entry in list(self.tasks):
            _, (_, pagemap_fd, pidfd) = entry
            r, _, _ = select.select([pidfd], [], [], 0)
            if r:
                self.drop(entry, "exited")
                continue
            try:
                alive = len(os.pread(pagemap_fd, 8, 0)) == 8
            except OSError:
                alive = False
            if not alive:
                self.drop(entry, "exec'ed")

    def bind(self, name: bytes) -> None:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                s.bind(name)
                s.listen(8)
                self.listener = s
                return
            except OSError as exc:
                s.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
            # an older holder of this dir: its images were overwritten, its state is stale
            quit_holder(name)
            time.sleep(0.02)
        raise OSError(errno.EADDRINUSE, "another holder keeps the name")

    def serve(self) -> None:
        last = time.monotonic()
        while self.tasks:
            pidfds = [e[1][2] for e in self.tasks]
            r, _, _ = select.select([self.listener] + pidfds, [], [], CHECK_EVERY)
            if time.monotonic() - last >= CHECK_EVERY or any(fd in r for fd in pidfds):
                self.check_tasks()
                last = time.monotonic()
            if self.listener in r and self.handle(self.listener.accept()[0]):
                return

    def handle(self, conn: socket.socket) -> bool:
        """One request; True when the holder is done."""
        with conn:
            try:
                if peer_uid(conn) != os.geteuid():
                    return False
                conn.settimeout(10)
                req = conn.recv(64)
                if req == b"quit":
                    return True
                if req == b"status":
                    conn.sendmsg([json.dumps(self.public_state()).encode()])
                    return False
                if req != b"take":
                    return False
                self.check_tasks()
                fds = [fd for _, f in self.tasks for fd in f]
                send_state(conn, self.public_state(), fds)
                conn.settimeout(None)       # the taker may work for a long time
                answer = conn.recv(64)
            except OSError:
                return False                # a broken request changes nothing
            return answer != b"keep"

    def public_state(self) -> dict:
        return dict(self.state, tasks=[t for t, _ in self.tasks], holder=os.getpid())


def quit_holder(name: bytes) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(5)
        s.connect(name)
        if peer_uid(s) == os.geteuid():
            s.send(b"quit")
            s.recv(1)               # wait for it to close: the name is free then
    except OSError:
        pass
    finally:
        s.close()


def main(argv: list[str]) -> int:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write("criu-py-track")
    except OSError:
        pass
    boot = socket.socket(fileno=int(argv[1]))
    try:
        state, fds = recv_state(boot)
        holder = Holder(state, fds)
        holder.bind(socket_name(*state["dir"]))
        boot.send(b"ready")
    except Exception as exc:         # noqa: BLE001 - tell the spawner, in one line
        try:
            boot.send(f"error {exc}".encode())
        except OSError:
            pass
        return 1
    finally:
        boot.close()
    holder.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
