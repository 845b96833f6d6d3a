#!/usr/bin/env python3
# redis-server holding ~1 GiB of keys, dumped and restored by criu-py and by upstream
# CRIU 4.2 (../shared/reference/criu-4.2) on the same server build, in the same run,
# rounds interleaved so machine noise hits both alike. Each round starts a fresh
# redis-server (127.0.0.1, a free port, no persistence), fills it with DEBUG POPULATE,
# dumps it (the process is killed), restores it detached and checks from a client that
# every key is there (DBSIZE and a few values). Wall times of the two commands, as a
# user sees them; medians and the ratio criu-py / upstream. Nothing is asserted.
#
#   .venv/bin/python bench/redis.py [--rounds 3] [--keys 950000] [--value 1000] [--no-upstream]
#
# Target (issue 12): dump and restore each at most 1.0x upstream's time.
import argparse
import ctypes
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = REPO.parent / "shared" / "reference" / "criu-4.2" / "criu"
PR_SET_CHILD_SUBREAPER = 36


def criu_py(*args) -> list[str]:
    script = Path(sys.executable).parent / "criu-py"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "criu_py"]
    return base + [str(a) for a in args]


def upstream(*args) -> list[str]:
    return [str(UPSTREAM)] + [str(a) for a in args]


def upstream_usable() -> bool:
    try:
        return subprocess.run(upstream("--version"), capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def reap_all() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def command(port: int, *args, timeout=600):
    """One RESP command on a fresh connection; the reply's first line (and bulk body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        parts = [str(a).encode() for a in args]
        s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\r\n", 1)[0]
        if line.startswith(b"$") and int(line[1:]) >= 0:
            n = int(line[1:])
            while len(data) < len(line) + 2 + n:
                data += s.recv(65536)
            return data[len(line) + 2:len(line) + 2 + n]
        return line


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_redis(binary: str, work: Path, keys: int, value: int) -> tuple[int, int]:
    port = free_port()
    p = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(work), "--daemonize", "no",
                          "--enable-debug-command", "yes", "--logfile", str(work / "redis.log")],
                         start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if command(port, "PING") == b"+PONG":
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    reply = command(port, "DEBUG", "POPULATE", keys, "key", value)
    if reply != b"+OK":
        raise RuntimeError(f"DEBUG POPULATE: {reply!r}")
    return p.pid, port


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def one_round(tool, binary: str, work: Path, keys: int, value: int) -> tuple[float, float, int]:
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    pid, port = start_redis(binary, work, keys, value)
    rss = rss_mib(pid)
    os.sync()
    t0 = time.perf_counter()
    res = subprocess.run(tool("dump", "-t", pid, "-D", images, "-o", "dump.log"),
                         capture_output=True, text=True, timeout=900)
    t1 = time.perf_counter()
    if res.returncode != 0:
        os.kill(pid, signal.SIGKILL)
        raise RuntimeError(f"dump failed: {res.stderr.strip()[-500:]}")
    while os.path.exists(f"/proc/{pid}"):
        reap_all()
        time.sleep(0.01)
    t2 = time.perf_counter()
    res = subprocess.run(tool("restore", "-D", images, "-d", "-o", "restore.log"),
                         capture_output=True, text=True, timeout=900)
    t3 = time.perf_counter()
    try:
        if res.returncode != 0:
            raise RuntimeError(f"restore failed: {res.stderr.strip()[-500:]}")
        size = int(command(port, "DBSIZE")[1:])
        if size != keys or command(port, "GET", "key:7")[:6] != b"value:":
            raise RuntimeError(f"restored server has {size} keys of {keys}")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while os.path.exists(f"/proc/{pid}"):
            reap_all()
            time.sleep(0.01)
    return t1 - t0, t3 - t2, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=950000)
    ap.add_argument("--value", type=int, default=1000)
    ap.add_argument("--no-upstream", action="store_true")
    args = ap.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tools = {"criu-py": criu_py}
    if not args.no_upstream:
        if upstream_usable():
            tools["upstream"] = upstream
        else:
            print(f"(upstream CRIU 4.2 not usable at {UPSTREAM}: criu-py alone)")
    work = Path(tempfile.mkdtemp(prefix="criu-py-bench-redis-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    times = {name: ([], []) for name in tools}
    rss = 0
    try:
        for r in range(args.rounds):
            for name, tool in tools.items():
                d, t, rss = one_round(tool, binary, work, args.keys, args.value)
                times[name][0].append(d)
                times[name][1].append(t)
                print(f"round {r + 1} {name:8} dump {d * 1e3:8.1f} ms  restore {t * 1e3:8.1f} ms  "
                      f"(redis RSS {rss} MiB)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nredis-server, {args.keys} keys of {args.value} bytes (RSS ~{rss} MiB), "
          f"median of {args.rounds} rounds:")
    med = {name: (statistics.median(d), statistics.median(t)) for name, (d, t) in times.items()}
    for name, (d, t) in med.items():
        print(f"  {name:8} dump {d * 1e3:8.1f} ms   restore {t * 1e3:8.1f} ms")
    if "upstream" in med:
        (cd, cr), (ud, ur) = med["criu-py"], med["upstream"]
        print(f"  ratio    dump {cd / ud:8.2f}x    restore {cr / ur:8.2f}x   (criu-py / upstream; "
              f"target <= 1.0x)")


if __name__ == "__main__":
    main()
