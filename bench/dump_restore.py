#!/usr/bin/env python3
# Measures criu-py's dump and restore against this machine's own limits, taken in the
# same run: a 1 GiB anonymous-memory process (the memhog workload) and the small counter.
# Nothing is asserted; it prints rates, fractions of the relevant limit and the targets.
# Other work on the machine skews every number: limits are the best of a few runs, and
# a quiet machine gives the meaningful fractions.
#
#   .venv/bin/python bench/dump_restore.py [--dir DIR] [--size-mib 1024] [--rounds 5]
#
# Limits measured (1 MiB per call, one thread, the images dir's filesystem, no fsync):
#   read    process_vm_readv from the 1 GiB child into a reused buffer
#   write   write(2) of a reused buffer to a file
#   r->w    read then write, as a dump must do
#   fault   faulting in fresh anonymous memory (MADV_POPULATE_WRITE)
#   fill    preadv from the (cached) file into fresh anonymous memory, as a restore must do
import argparse
import contextlib
import ctypes
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "workloads"))
from wl_build import build_workloads  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
PR_SET_CHILD_SUBREAPER = 36
MADV_POPULATE_WRITE = 23
TARGET_DUMP_FRACTION = 0.60
TARGET_RESTORE_S = 0.8
TARGET_COUNTER_DUMP_S = 0.060
SUMMARY: list[str] = []  # one line per target, printed at the end


def target(name: str, value: str, met: bool) -> None:
    SUMMARY.append(f"  {'met    ' if met else 'NOT met'}  {name}: {value}")

libc = ctypes.CDLL(None, use_errno=True)


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(IoVec), ctypes.c_ulong,
                                  ctypes.POINTER(IoVec), ctypes.c_ulong, ctypes.c_ulong]
libc.process_vm_readv.restype = ctypes.c_ssize_t


def criu_py(*args) -> list[str]:
    script = Path(sys.executable).parent / "criu-py"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "criu_py"]
    return base + [str(a) for a in args]


def run_timed(argv) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - t0, res


def wait_line(log: Path, prefix: str, count: int = 1, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lines = [ln for ln in log.read_text().split("\n")[:-1] if ln.startswith(prefix)]
        except FileNotFoundError:
            lines = []
        if len(lines) >= count:
            return lines[count - 1]
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {prefix!r} in {log}")


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class Tasks:
    """PIDs started or restored by the bench, killed and reaped at the end."""

    def __init__(self):
        self.pids = set()

    def kill_all(self):
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


def start(argv, tasks: Tasks) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    tasks.pids.add(p.pid)
    return p


def reap(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.005)
    raise RuntimeError(f"pid {pid} did not end")


def big_mapping(pid: int, size: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if end - start >= size and len(line.split()) < 6:
                return start
    raise RuntimeError(f"no anonymous mapping of {size} bytes in pid {pid}")


# ------------------------------------------------------------------ machine limits

def private_anon(size: int) -> mmap.mmap:
    # mmap.mmap(-1, n) alone would be MAP_SHARED (shmem): not what a process's heap is
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def measure_limits(pid: int, remote: int, size: int, scratch_dir: Path) -> dict:
    buf = private_anon(MiB)
    local = IoVec(ctypes.addressof(ctypes.c_char.from_buffer(buf)), MiB)
    view = memoryview(buf)

    def read_chunk(off):
        rem = IoVec(remote + off, MiB)
        n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(rem), 1, 0)
        if n != MiB:
            raise OSError(ctypes.get_errno(), "process_vm_readv")

    limits = {}
    os.sync()  # dirty page cache being written back slows faults down by 3x here
    fresh = private_anon(size)
    t0 = time.perf_counter()
    fresh.madvise(MADV_POPULATE_WRITE)
    limits["fault"] = gbps(size, time.perf_counter() - t0)
    fresh.close()

    read_chunk(0)
    t0 = time.perf_counter()
    for off in range(0, size, MiB):
        read_chunk(off)
    limits["read"] = gbps(size, time.perf_counter() - t0)

    path = scratch_dir / "bench-write.tmp"
    try:
        os.sync()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t0 = time.perf_counter()
        for _ in range(0, size, MiB):
            os.write(fd, view)
        limits["write"] = gbps(size, time.perf_counter() - t0)
        os.close(fd)

        os.sync()
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        t0 = time.perf_counter()
        for off in range(0, size, MiB):
            read_chunk(off)
            os.write(fd, view)
        limits["r->w"] = gbps(size, time.perf_counter() - t0)
        os.close(fd)

        os.sync()
        fresh = private_anon(size)
        fview = memoryview(fresh)
        fd = os.open(path, os.O_RDONLY)
        chunk = 64 * MiB
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            if os.preadv(fd, [fview[off:off + chunk]], off) != chunk:
                raise RuntimeError("short preadv")
        limits["fill"] = gbps(size, time.perf_counter() - t0)
        os.close(fd)
        fview.release()
        fresh.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    view.release()
    buf.close()
    return limits


# ------------------------------------------------------------------ stats-dump

def stats_breakdown(images: Path) -> str:
    try:
        from criu_py.images import ImageDir
        st = ImageDir(str(images)).read_one("stats-dump").dump
    except Exception as exc:  # images module missing or stats not written: skip the part
        return f"    (stats-dump not readable: {exc})"
    return (f"    stats-dump: freezing {st.freezing_time / 1e3:.1f} ms, frozen {st.frozen_time / 1e3:.1f} ms, "
            f"memdump {st.memdump_time / 1e3:.1f} ms, memwrite {st.memwrite_time / 1e3:.1f} ms; "
            f"pages scanned {st.pages_scanned}, skipped {st.pages_skipped_parent}, "
            f"written {st.pages_written}")


# ------------------------------------------------------------------ the runs

def bench_big(bins, work: Path, size_mib: int, limit_rounds: int, tasks: Tasks) -> bool:
    size = size_mib * MiB
    log = work / "memhog.log"
    print(f"== {size_mib} MiB anonymous memory (memhog)")
    proc = start([bins["memhog"], log, size_mib, 0x1234], tasks)
    wait_line(log, "ready", timeout=120)
    remote = big_mapping(proc.pid, size)
    runs = [measure_limits(proc.pid, remote, size, work) for _ in range(limit_rounds)]
    limits = {name: max(r[name] for r in runs) for name in runs[0]}  # best of N: others share the CPUs
    for name in ("read", "write", "r->w", "fault", "fill"):
        spread = ", ".join(f"{r[name]:.2f}" for r in runs)
        print(f"  limit {name:6s} {limits[name]:6.2f} GB/s  (best of {spread})")

    images = work / "big"
    images.mkdir()
    os.sync()
    wall, res = run_timed(criu_py("dump", "-t", proc.pid, "-D", images, "-o", "dump.log"))
    if res.returncode != 0:
        print(f"  dump FAILED: {res.stderr.strip()}")
        return False
    proc.wait(30)
    rate = gbps(size, wall)
    print(f"  dump    {wall:6.3f} s  {rate:5.2f} GB/s  = {rate / limits['r->w']:4.0%} of r->w "
          f"(target >= {TARGET_DUMP_FRACTION:.0%})")
    target(f"{size_mib} MiB dump >= {TARGET_DUMP_FRACTION:.0%} of read->write",
           f"{rate / limits['r->w']:.0%} ({wall:.3f} s)", rate / limits["r->w"] >= TARGET_DUMP_FRACTION)
    print(stats_breakdown(images))

    wall, res = run_timed(criu_py("restore", "-D", images, "-d", "-o", "restore.log"))
    if res.returncode != 0:
        print(f"  restore FAILED: {res.stderr.strip()}")
        return False
    rate = gbps(size, wall)
    print(f"  restore {wall:6.3f} s  {rate:5.2f} GB/s  = {rate / limits['fill']:4.0%} of fill, "
          f"{rate / limits['fault']:4.0%} of fault (target <= {TARGET_RESTORE_S} s)")
    target(f"{size_mib} MiB restore <= {TARGET_RESTORE_S} s", f"{wall:.3f} s", wall <= TARGET_RESTORE_S)
    os.kill(proc.pid, signal.SIGUSR1)
    verdict = _verdict(log)
    print(f"  after restore the task reports: {verdict}")
    os.kill(proc.pid, signal.SIGKILL)
    reap(proc.pid)
    return verdict.startswith("OK")


def _verdict(log: Path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().split("\n")[:-1]:
            if line.startswith(("OK", "BAD")):
                return line
        time.sleep(0.01)
    return "no answer"


def bench_counter(bins, work: Path, rounds: int, tasks: Tasks) -> bool:
    print("== counter (small C process)")
    log = work / "counter.log"
    proc = start([bins["counter"], log], tasks)
    wait_line(log, "", count=20)
    pid = proc.pid
    dumps, restores = [], []
    last_images = None
    for i in range(rounds):
        images = work / f"counter-{i}"
        images.mkdir()
        wall, res = run_timed(criu_py("dump", "-t", pid, "-D", images))
        if res.returncode != 0:
            print(f"  dump FAILED: {res.stderr.strip()}")
            return False
        dumps.append(wall)
        if i == 0:
            proc.wait(10)
        else:
            reap(pid)
        n = len(log.read_text().split("\n")) - 1
        wall, res = run_timed(criu_py("restore", "-D", images, "-d"))
        if res.returncode != 0:
            print(f"  restore FAILED: {res.stderr.strip()}")
            return False
        restores.append(wall)
        wait_line(log, "", count=n + 3)
        last_images = images
    lines = log.read_text().split()
    counts = [int(c) for p, c in zip(lines[::2], lines[1::2])]
    ok = counts == list(range(1, len(counts) + 1)) and set(lines[::2]) == {str(pid)}
    print(f"  dump    median {statistics.median(dumps) * 1e3:6.1f} ms  min {min(dumps) * 1e3:6.1f} ms "
          f"(target <= {TARGET_COUNTER_DUMP_S * 1e3:.0f} ms; upstream ~30 ms)")
    target(f"counter dump <= {TARGET_COUNTER_DUMP_S * 1e3:.0f} ms wall", f"median {statistics.median(dumps) * 1e3:.0f} ms",
           statistics.median(dumps) <= TARGET_COUNTER_DUMP_S)
    print(f"  restore median {statistics.median(restores) * 1e3:6.1f} ms  min {min(restores) * 1e3:6.1f} ms "
          f"(upstream ~20 ms)")
    print(stats_breakdown(last_images))
    print(f"  count continuous across {rounds} dump/restore rounds, same pid: {'yes' if ok else 'NO'}")
    os.kill(pid, signal.SIGKILL)
    reap(pid)
    return ok


def bench_startup():
    print("== start-up floor")
    for label, argv in (("python -c pass", [sys.executable, "-c", "pass"]),
                        ("criu-py --version", criu_py("--version"))):
        times = [run_timed(argv)[0] for _ in range(5)]
        print(f"  {label:18s} median {statistics.median(times) * 1e3:6.1f} ms")


def main():
    ap = argparse.ArgumentParser(description="Dump/restore speed of criu-py against this machine's limits.")
    ap.add_argument("--dir", default="/tmp", help="where images go (its filesystem is measured)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5, help="dump/restore rounds of the counter")
    ap.add_argument("--limit-rounds", type=int, default=3, help="runs of each limit (best is kept)")
    args = ap.parse_args()
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")

    tasks = Tasks()
    work = Path(tempfile.mkdtemp(prefix="criu-py-bench-", dir=args.dir))
    ok = True
    try:
        bins = build_workloads(work, ["counter", "memhog"])
        print(f"criu-py bench: images under {work} ({os.uname().release}, {os.cpu_count()} CPUs)")
        bench_startup()
        for part in (lambda: bench_counter(bins, work, args.rounds, tasks),
                     lambda: bench_big(bins, work, args.size_mib, args.limit_rounds, tasks)):
            try:
                ok = part() and ok
            except Exception as exc:
                print(f"  FAILED: {exc}")
                ok = False
    finally:
        tasks.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    print("== targets (not asserted)")
    print("\n".join(SUMMARY) or "  (none measured)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
