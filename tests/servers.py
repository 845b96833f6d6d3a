# Real servers from Debian's packages for the socket tests (redis-server, nginx,
# python3 -m http.server): installing what a test needs with apt-get (a test skips only
# when that is impossible), picking free ports on 127.0.0.1, starting them in their own
# session with their files in the test's dir and tracking every process they make so
# the harness kills them (servers that rename themselves or daemonize do not keep the
# test's dir in their command line), and small clients: RESP for redis, HTTP GET.
import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import Task, wait_for

_APT_UPDATED = False


def need_debian(binary: str, package: str) -> str:
    """The path of `binary`, installing Debian's `package` when it is missing; skip (with
    the reason) only when it cannot be installed."""
    global _APT_UPDATED
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin:/usr/bin")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{binary} is missing and {package} cannot be installed here (needs root "
                    f"and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in range(2):
        if attempt or not _APT_UPDATED:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            _APT_UPDATED = True
        res = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env,
                             capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin:/usr/bin")
        if found:
            return found
    pytest.skip(f"cannot install {package}: {res.stderr.strip()[-300:]}")


def need_nftables() -> None:
    """criu-py's default network lock (libnftables, or the nft binary)."""
    need_debian("nft", "nftables")


def lock_state() -> str:
    """The network locks that exist now: nftables tables, and iptables rules that spare
    CRIU's mark 0xc114 (one per line)."""
    out = ""
    if shutil.which("nft"):
        out += subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    for cmd in ("iptables", "ip6tables"):
        if shutil.which(cmd):
            rules = subprocess.run([cmd, "-w", "-S"], capture_output=True, text=True).stdout
            out += "".join(r + "\n" for r in rules.splitlines() if "0xc114" in r)
    return out


@pytest.fixture(autouse=True)
def no_lock_left(request):
    """Whatever happens in a test, the network locks its dumps took go away with it (a
    failed restore keeps the lock on purpose, for another try). Only its own: another
    test session may run on the machine meanwhile, and lifting its lock would let its
    restore's connections be reset. Ours are the tables named after the run ids of the
    dumps in the test's dir, and the iptables rules of those dumps' connections."""
    # the harness first, so that its dir is still there when this ends
    h = request.getfixturevalue("h") if "h" in request.fixturenames else None
    before = set(lock_state().splitlines())
    yield
    new = set(lock_state().splitlines()) - before
    if not new or h is None:
        return
    tables, ports = locks_of_dumps(h.dir)
    for line in new:
        if line.startswith("table inet CRIU-") and " ".join(line.split()[1:3]) in tables:
            subprocess.run(["nft", "delete"] + line.split()[:3], capture_output=True)
        elif line.startswith("-A ") and _rule_ports(line) in ports:
            for cmd in ("iptables", "ip6tables"):
                subprocess.run([cmd, "-w", "-D"] + line.split()[1:], capture_output=True)


def our_locks(h) -> list[str]:
    """The lines of lock_state() that belong to the dumps in the test's dir: the tables
    named after their run ids, the iptables rules of their connections. Tests check
    these, never the machine's whole state: another test session may hold a lock."""
    tables, ports = locks_of_dumps(h.dir)
    return [line for line in lock_state().splitlines()
            if (line.startswith("table inet CRIU-") and " ".join(line.split()[1:3]) in tables)
            or (line.startswith("-A ") and _rule_ports(line) in ports)]


def locks_of_dumps(top) -> tuple[set, set]:
    """The network locks the dumps under `top` took: nftables table names ("inet
    CRIU-..."), and (port, port) of their connections, both ways (the iptables rules)."""
    from criu_py.files.sockets import inet, netlock
    from criu_py.images import ImageDir
    tables, ports = set(), set()
    for inventory in Path(top).rglob("inventory.img"):
        try:
            with ImageDir(inventory.parent) as images:
                inv = images.read_entries("inventory.img")[0]
                if inv.HasField("dump_criu_run_id"):
                    tables.add(netlock.table_name(inv.dump_criu_run_id, 0))
                if images.exists("files.img"):
                    for fe in images.read_entries("files.img")[1:]:
                        if fe.HasField("isk") and inet.is_connection(fe.isk):
                            ports.add((fe.isk.src_port, fe.isk.dst_port))
                            ports.add((fe.isk.dst_port, fe.isk.src_port))
        except Exception:            # noqa: BLE001 - not a dump we can read: not ours
            continue
    return tables, ports


def _rule_ports(rule: str) -> tuple[int, int] | None:
    words = rule.split()
    try:
        return int(words[words.index("--sport") + 1]), int(words[words.index("--dport") + 1])
    except (ValueError, IndexError):
        return None


def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def start_server(h, argv: list, marker: str, log_name: str, cwd=None) -> Task:
    """A server in its own session, stdin /dev/null, stdout/stderr to a file in the
    test's dir; tracked (by pid and a string of its command line) for cleanup."""
    out = open(h.path(log_name), "ab")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, cwd=cwd or h.dir, close_fds=True)
    finally:
        out.close()
    task = Task(p.pid, marker, None, p)
    h.tasks.append(task)
    return task


def track(h, pid: int, marker: str) -> Task:
    """A process the test did not start itself (a daemon's child, a worker)."""
    task = Task(pid, marker, None)
    h.tasks.append(task)
    return task


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def wait_port(port: int, host="127.0.0.1", timeout=20.0) -> None:
    def up():
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            return False
    wait_for(up, timeout=timeout, what=f"something to listen on {host}:{port}")


# ---------------------------------------------------------------- redis
class Redis:
    """A RESP client on one connection (kept across dump and restore)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                self.buf += chunk
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def __call__(self, *args):
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) +
                          b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return self._reply()


def start_redis(h, port: int, *extra) -> Task:
    binary = need_debian("redis-server", "redis-server")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(h.dir), "--logfile", str(h.path("redis.log")), "--daemonize", "no",
            *map(str, extra)]
    task = start_server(h, argv, f"127.0.0.1:{port}", "redis.out")
    wait_port(port)
    return task


# ---------------------------------------------------------------- HTTP
def http_get(port: int, path: str = "/", host="127.0.0.1") -> tuple[bytes, dict]:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        return r.read(), dict(r.headers)
