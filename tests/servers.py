# Real servers from Debian's packages for the socket tests (redis-server, nginx,
# PostgreSQL, python3 -m http.server): installing what a test needs with apt-get (a
# test skips only when that is impossible), picking free ports on 127.0.0.1, starting
# them in their own session with their files in the test's dir and tracking every
# process they make so the harness kills them (servers that rename themselves or
# daemonize do not keep the test's dir in their command line), and small clients: RESP
# for redis, PostgreSQL's simple query protocol, HTTP GET.
import os
import shutil
import signal
import socket
import struct
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import Task, wait_for

_APT_UPDATED = False


def need_debian(binary: str, package: str, find=None) -> str:
    """The path of `binary`, installing Debian's `package` when it is missing; skip (with
    the reason) only when it cannot be installed. find(): where the package puts it when
    that is not on PATH."""
    global _APT_UPDATED
    find = find or (lambda: shutil.which(binary) or
                    shutil.which(binary, path="/usr/sbin:/sbin:/usr/bin"))
    found = find()
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
        found = find()
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
    for line in _owned(new, h.dir):
        if line.startswith("table "):
            subprocess.run(["nft", "delete"] + line.split()[:3], capture_output=True)
        else:
            for cmd in ("iptables", "ip6tables"):
                subprocess.run([cmd, "-w", "-D"] + line.split()[1:], capture_output=True)


def our_locks(h) -> list[str]:
    """The lines of lock_state() that belong to the dumps in the test's dir. Tests check
    these, never the machine's whole state: another test session may hold a lock."""
    return _owned(lock_state().splitlines(), h.dir)


def _owned(lines, top) -> list[str]:
    """Of lock_state() lines, those of the dumps under `top`: the tables named after
    their run ids, the iptables rules of their connections."""
    tables, ports = locks_of_dumps(top)
    return [line for line in lines
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


def start_server(h, argv: list, marker: str, log_name: str, cwd=None, **popen) -> Task:
    """A server in its own session, stdin /dev/null, stdout/stderr to a file in the
    test's dir; tracked (by pid and a string of its command line) for cleanup. popen:
    more of Popen's options (user, group)."""
    out = open(h.path(log_name), "ab")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, cwd=cwd or h.dir, close_fds=True, **popen)
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


# ---------------------------------------------------------------- PostgreSQL
def need_postgres() -> Path:
    """The bin dir of Debian's PostgreSQL server (not on PATH: /usr/lib/postgresql/N/bin)."""
    def find():
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        return str(found[-1]) if found else None
    return Path(need_debian("postgres", "postgresql", find)).parent


def start_postgres(h, port: int) -> Task:
    """A PostgreSQL cluster of its own in the test's dir, run as the postgres user (it
    refuses root), listening on 127.0.0.1:port and on a unix socket in its data dir."""
    import pwd
    bindir = need_postgres()
    user = pwd.getpwnam("postgres")
    as_postgres = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    os.chmod(h.dir, 0o755)
    data = h.path("pgdata")
    data.mkdir(mode=0o700)
    os.chown(data, user.pw_uid, user.pw_gid)
    res = subprocess.run([bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres",
                          "--no-sync"], capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL, cwd=data, **as_postgres)
    assert res.returncode == 0, res.stderr
    argv = [bindir / "postgres", "-D", data, "-p", port, "-k", data,
            "-c", "listen_addresses=127.0.0.1", "-c", "shared_buffers=16MB",
            "-c", "max_connections=10", "-c", "fsync=off",
            "-c", "autovacuum=off"]         # no worker coming and going during a test
    task = start_server(h, [str(a) for a in argv], str(data), "postgres.log", cwd=data,
                        **as_postgres)
    wait_port(port)
    wait_for(lambda: _postgres_answers(port), timeout=30, what="postgres to accept queries")
    return task


def _postgres_answers(port: int) -> bool:
    """It listens before its startup process is done ("the database system is starting
    up"): true once a connection gets an answer."""
    try:
        db = Postgres(port)
    except (OSError, RuntimeError):
        return False
    try:
        return db("select 1") == [("1",)]
    except (OSError, RuntimeError):
        return False
    finally:
        db.close()


def stop_postgres(h, task: Task) -> None:
    """A fast shutdown (SIGINT): the postmaster removes its System V segment and its
    dynamic shared memory in /dev/shm on the way out. One that is gone already (killed
    by a failed restore) leaves its segment: removed here by the id in postmaster.pid."""
    if task.running():
        os.kill(task.pid, signal.SIGINT)
        wait_for(lambda: not task.running(), timeout=30, what="the postmaster to shut down")
    try:
        lines = (h.path("pgdata") / "postmaster.pid").read_text().splitlines()
    except OSError:
        return                          # removed by the shutdown: nothing left
    if len(lines) >= 7 and len(lines[6].split()) == 2:
        subprocess.run(["ipcrm", "-m", lines[6].split()[1]], capture_output=True)


class Postgres:
    """PostgreSQL's simple query protocol on one TCP connection (trust authentication):
    db("SQL") -> rows as tuples of str (None for NULL). backend_pid: the server process
    that serves this connection (BackendKeyData)."""

    def __init__(self, port: int, user: str = "postgres", database: str = "postgres"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        params = b"user\0%s\0database\0%s\0\0" % (user.encode(), database.encode())
        self.sock.sendall(struct.pack("!ii", 8 + len(params), 3 << 16) + params)
        self.backend_pid = None
        self.error = None               # the last ErrorResponse's severity and message
        self._until_ready()

    def close(self):
        self.sock.close()

    def _message(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buf) >= 5:
                n = struct.unpack_from("!i", self.buf, 1)[0]
                if len(self.buf) >= 1 + n:
                    kind, body = self.buf[:1], self.buf[5:1 + n]
                    self.buf = self.buf[1 + n:]
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("postgres closed the connection" +
                                      (f": {self.error}" if self.error else ""))
            self.buf += chunk

    def _until_ready(self) -> list:
        rows, self.error = [], None
        while True:
            kind, body = self._message()
            if kind == b"Z":                        # ReadyForQuery
                if self.error:
                    raise RuntimeError(self.error)
                return rows
            if kind == b"E":                        # ErrorResponse: fields, then ready
                self.error = " ".join(f[1:].decode(errors="replace")
                                 for f in body.split(b"\0") if f[:1] in (b"S", b"M"))
            elif kind == b"K":                      # BackendKeyData: pid, secret
                self.backend_pid = struct.unpack_from("!i", body)[0]
            elif kind == b"R" and struct.unpack_from("!i", body)[0] != 0:
                raise RuntimeError("postgres asks for a password (trust expected)")
            elif kind == b"D":                      # DataRow
                n, pos, row = struct.unpack_from("!h", body)[0], 2, []
                for _ in range(n):
                    size = struct.unpack_from("!i", body, pos)[0]
                    pos += 4
                    row.append(None if size < 0 else body[pos:pos + size].decode())
                    pos += max(size, 0)
                rows.append(tuple(row))

    def __call__(self, sql: str) -> list:
        query = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
        return self._until_ready()


# ---------------------------------------------------------------- HTTP
def http_get(port: int, path: str = "/", host="127.0.0.1") -> tuple[bytes, dict]:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        return r.read(), dict(r.headers)
