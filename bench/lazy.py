#!/usr/bin/env python3
"""Lazy restore, lazy-pages fill rate and page-server dump speed against this machine's
limits and upstream CRIU 4.2 (when ../shared/reference/criu-4.2 is there).

    .venv/bin/python bench/lazy.py [--dir /tmp] [--sizes 256,4096] [--lazy-rounds 3]
                                   [--ps-mib 1024] [--ps-rounds 5]

1. restore-to-running: `restore --lazy-pages -d` of `crit make-lazy` images of a memhog of
   256 MiB and 4 GiB, with `lazy-pages -D` serving: the command's wall time (it returns once
   the task runs) and, inside it, the time from the restore's start to the tree running
   (restore.log), medians of --lazy-rounds restores. Target <= 10 ms, flat in the size;
   upstream 4.2 took 31 ms for 256 MiB.
2. fill rate: the daemon's bytes moved / time from the hand-over to the last page (the task
   idle, so almost all of it pushed in the background), against UFFDIO_COPY of 2 MiB chunks
   into registered fresh memory in this process (the machine's userfaultfd limit, measured
   here), median of the same restores. Target >= 2 GB/s.
3. page server: `dump --page-server` to `page-server` on 127.0.0.1 of a 1 GiB memhog against a
   local `dump` of the same task size, --ps-rounds rounds interleaved (medians and bests).
   Target >= 80% of the local rate.
Every workload checks its memory itself (SIGUSR1 -> OK) after each restore."""
import argparse
import contextlib
import ctypes
import fcntl
import mmap
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "workloads"))
from wl_build import build_workloads  # noqa: E402

MiB = 1 << 20
UPSTREAM = ROOT.parent / "shared" / "reference" / "criu-4.2" / "criu"
PIDS = set()


def criu_py(*args):
    script = Path(sys.executable).parent / "criu-py"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "criu_py"]
    return base + [str(a) for a in args]


def run(argv, timeout=600):
    t0 = time.perf_counter()
    res = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=timeout)
    return time.perf_counter() - t0, res


def background(argv, **kw):
    return subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def start_memhog(bins, work: Path, mib: int):
    log = work / f"memhog-{mib}-{time.monotonic_ns()}.log"
    p = background([bins["memhog"], log, mib, 0x5EED])
    PIDS.add(p.pid)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.exists() and "ready" in log.read_text():
            return p.pid, log
        time.sleep(0.02)
    raise RuntimeError("memhog did not get ready")


def check(pid: int, log: Path) -> str:
    n = len(re.findall(r"(OK|BAD) \d+", log.read_text()))
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.findall(r"((?:OK|BAD) \d+[^\n]*)", log.read_text())
        if len(found) > n:
            return found[-1]
        time.sleep(0.02)
    return "no answer"


def reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    reap(pid)
    PIDS.discard(pid)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    return path


def log_time(log: Path, pattern: str) -> float:
    """The (seconds) timestamp of the first line of a criu-py log matching pattern."""
    for line in log.read_text().splitlines():
        if re.search(pattern, line):
            return float(line[1:line.index(")")])
    raise RuntimeError(f"{pattern!r} not in {log}")


# ------------------------------------------------------------------ the machine's limit
def uffd_copy_limit(size: int = 512 * MiB, chunk: int = 2 * MiB) -> float:
    """UFFDIO_COPY of `chunk` bytes at a time into fresh registered anonymous memory."""
    from criu_py.lazy import make_uffd
    from criu_py.native import ffi, lib
    src = mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src.write(os.urandom(chunk))
    dst = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    s_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))
    d_addr = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    uffd = make_uffd()
    try:
        reg = bytearray(struct.pack("QQQQ", d_addr, size, 1, 0))
        fcntl.ioctl(uffd, 0xC020AA00, reg)                 # UFFDIO_REGISTER, MODE_MISSING
        done = ffi.new("uint64_t *")
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            r = lib.cp_uffd_fill(uffd, d_addr + off, s_addr, chunk, 0, done)
            if r:
                raise OSError(-r, os.strerror(-r))
        return size / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(uffd)


# ------------------------------------------------------------------ 1 + 2: lazy restore
def lazy_restore(bins, work: Path, mib: int) -> dict:
    pid, log = start_memhog(bins, work, mib)
    full, lazy = fresh(work / f"full-{mib}"), work / f"lazy-{mib}"
    shutil.rmtree(lazy, ignore_errors=True)
    _, res = run(criu_py("dump", "-t", pid, "-D", full, "-o", "dump.log"))
    if res.returncode:
        raise RuntimeError(f"dump failed: {res.stderr}")
    reap(pid)
    _, res = run(criu_py("crit", "make-lazy", full, lazy))
    if res.returncode:
        raise RuntimeError(f"make-lazy failed: {res.stderr}")
    daemon = background(criu_py("lazy-pages", "-D", lazy, "-o", "lazy.log", "-v4"))
    while not (lazy / "lazy-pages.socket").exists():
        if daemon.poll() is not None:
            raise RuntimeError(f"lazy-pages failed: {daemon.stderr.read()}")
        time.sleep(0.005)
    wall, res = run(criu_py("restore", "-D", lazy, "-d", "--lazy-pages", "-o", "restore.log",
                            "-v3"))
    if res.returncode:
        raise RuntimeError(f"restore failed: {res.stderr}")
    # the log's clock starts when the command has loaded (interpreter start-up excluded)
    inside = log_time(lazy / "restore.log", r"the tree of \d+ runs")
    daemon.wait(300)
    text = (lazy / "lazy.log").read_text()
    m = re.search(r"all done: (\d+) MiB in ([\d.]+) ms since the first hand-over \(([\d.]+) "
                  r"GB/s; (\d+) KiB on faults", text)
    verdict = check(pid, log)
    kill(pid)
    shutil.rmtree(full, ignore_errors=True)
    shutil.rmtree(lazy, ignore_errors=True)
    return {"wall": wall, "inside": inside, "fill": float(m.group(3)), "moved": int(m.group(1)),
            "faulted_kib": int(m.group(4)), "verdict": verdict}


def upstream_lazy(bins, work: Path, mib: int) -> dict | None:
    if not UPSTREAM.exists():
        return None
    pid, log = start_memhog(bins, work, mib)
    d = fresh(work / f"up-{mib}")
    _, res = run([UPSTREAM, "dump", "-t", pid, "-D", d, "-o", "dump.log"])
    if res.returncode:
        kill(pid)
        return {"error": "dump failed"}
    reap(pid)
    daemon = background([UPSTREAM, "lazy-pages", "-D", d, "-o", "lazy.log"])
    time.sleep(0.3)
    wall, res = run([UPSTREAM, "restore", "-D", d, "-d", "--lazy-pages", "-o", "restore.log"])
    t0 = time.perf_counter()
    daemon.wait(300)
    done = time.perf_counter() - t0 + wall
    verdict = check(pid, log) if res.returncode == 0 else "restore failed"
    kill(pid)
    shutil.rmtree(d, ignore_errors=True)
    return {"wall": wall, "done": done, "verdict": verdict}


# ------------------------------------------------------------------ 3: page server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settle() -> None:
    """Before a timed dump: the previous round's writeback and discards done (on this
    disk they otherwise land in the middle of the next dump, of either kind)."""
    os.sync()
    time.sleep(0.2)


def dump_rates(bins, work: Path, mib: int, rounds: int) -> dict:
    """Local dumps and page-server dumps of a memhog of mib MiB, interleaved: the wall
    times of each (the last page-server dump's images restored and checked)."""
    out = {"local": [], "ps": [], "verdict": None}
    for i in range(rounds):
        pid, log = start_memhog(bins, work, mib)
        d = fresh(work / "local")
        settle()
        wall, res = run(criu_py("dump", "-t", pid, "-D", d, "-o", "dump.log"))
        if res.returncode:
            raise RuntimeError(f"dump failed: {res.stderr}")
        reap(pid)
        PIDS.discard(pid)
        out["local"].append(wall)
        shutil.rmtree(d, ignore_errors=True)

        pid, log = start_memhog(bins, work, mib)
        src, dst = fresh(work / "src"), fresh(work / "dst")
        port = free_port()
        r, w = os.pipe()
        server = background(criu_py("page-server", "-D", dst, "--address", "127.0.0.1",
                                    "--port", port, "-o", "ps.log", "--status-fd", w),
                            pass_fds=[w])
        os.close(w)
        os.read(r, 1)
        os.close(r)
        settle()
        wall, res = run(criu_py("dump", "-t", pid, "-D", src, "-o", "dump.log",
                                "--page-server", "--address", "127.0.0.1", "--port", port))
        if res.returncode:
            raise RuntimeError(f"dump --page-server failed: {res.stderr}")
        server.wait(60)
        reap(pid)
        PIDS.discard(pid)
        out["ps"].append(wall)
        if i == rounds - 1:
            for path in src.iterdir():
                if path.suffix == ".img" or path.name == "stats-dump":
                    shutil.copy2(path, dst / path.name)
            _, res = run(criu_py("restore", "-D", dst, "-d", "-o", "restore.log"))
            out["verdict"] = check(pid, log) if res.returncode == 0 else \
                f"restore failed {res.stderr}"
            kill(pid)
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--sizes", default="256,4096")
    ap.add_argument("--lazy-rounds", type=int, default=3)
    ap.add_argument("--ps-mib", type=int, default=1024)
    ap.add_argument("--ps-rounds", type=int, default=5)
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)             # restored tasks come back to us
    work = Path(tempfile.mkdtemp(prefix="criu-py-bench-lazy-", dir=args.dir))
    work.chmod(0o700)
    try:
        bins = build_workloads(work, ["memhog"])
        limit = uffd_copy_limit()
        print(f"machine: UFFDIO_COPY of 2 MiB chunks into registered memory {limit:.2f} GB/s")
        print("1+2. restore --lazy-pages of make-lazy images (memhog), lazy-pages -D:")
        for mib in [int(x) for x in args.sizes.split(",")]:
            runs = [lazy_restore(bins, work, mib) for _ in range(args.lazy_rounds)]
            r = {k: statistics.median(x[k] for x in runs) for k in ("wall", "inside", "fill")}
            bad = [x["verdict"] for x in runs if not x["verdict"].startswith("OK")]
            print(f"  {mib:5d} MiB: restore returned (task running) in {r['wall'] * 1e3:6.1f} ms "
                  f"wall, {r['inside'] * 1e3:5.1f} ms inside the restore; fill {r['fill']:.2f} GB/s "
                  f"= {r['fill'] / limit:4.0%} of the uffd limit (medians of {len(runs)}; "
                  f"{runs[-1]['moved']} MiB, {runs[-1]['faulted_kib']} KiB on faults); "
                  f"tasks: {bad[0] if bad else 'all OK'}")
        up = upstream_lazy(bins, work, 256)
        if up is None:
            print("  upstream 4.2: not found (../shared/reference/criu-4.2)")
        elif "error" in up:
            print(f"  upstream 4.2: {up['error']}")
        else:
            print(f"    256 MiB upstream 4.2: restore returned in {up['wall'] * 1e3:6.1f} ms, "
                  f"daemon done at {up['done']:.2f} s; task: {up['verdict']}")
        print(f"3. dump of {args.ps_mib} MiB (memhog): local vs --page-server on 127.0.0.1, "
              f"{args.ps_rounds} rounds interleaved")
        d = dump_rates(bins, work, args.ps_mib, args.ps_rounds)
        rate = {k: args.ps_mib * MiB / statistics.median(d[k]) / 1e9 for k in ("local", "ps")}
        best = {k: args.ps_mib * MiB / min(d[k]) / 1e9 for k in ("local", "ps")}
        print(f"  local dump          median {statistics.median(d['local']):6.3f} s "
              f"{rate['local']:5.2f} GB/s   best {min(d['local']):6.3f} s")
        print(f"  dump --page-server  median {statistics.median(d['ps']):6.3f} s "
              f"{rate['ps']:5.2f} GB/s   best {min(d['ps']):6.3f} s")
        print(f"  page server / local: {rate['ps'] / rate['local']:4.0%} of the median rate, "
              f"{best['ps'] / best['local']:4.0%} of the best (target >= 80%); restored from "
              f"the server's dir: {d['verdict']}")
    finally:
        for pid in list(PIDS):
            kill(pid)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
