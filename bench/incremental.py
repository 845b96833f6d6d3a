#!/usr/bin/env python3
# Incremental dumps, snapshots and the irmap cache (issue 9), measured on real workloads
# through the real CLI; nothing is asserted, the numbers and the targets are printed.
#
#   .venv/bin/python bench/incremental.py [--dir DIR] [--rounds 3] [--no-upstream]
#                                         [--only incremental,snapshot,irmap]
#
# incremental  a 1 GiB process rewriting 1% of its memory per second (tests/workloads/
#              dirtier.c): pre-dump, wait until about 1% more is written, then dump
#              --track-mem --prev-images-dir. Its frozen time (stats-dump) against a full
#              dump of the same process by criu-py and by upstream CRIU 4.2 (which cannot
#              pre-dump here). Target: <= 20 ms frozen.
# snapshot     dump --leave-running of a 1 GiB process rewriting all of its memory in a
#              tight loop (rewriter.c, which logs its own rate every 20 ms): frozen time,
#              and the task's rate while its memory is copied against its rate before.
#              Targets: <= 20 ms frozen, >= 50% of its rate. The images are checked to hold
#              one moment of the loop.
# irmap        a watcher (notifier.c) of a file deep in a tree of 100,000 files: dump with
#              --force-irmap and the tree as --irmap-scan-path, with no cache and with the
#              cache of a pre-dump. Target: the warm dump's irmap time >= 10x faster.
# Other load on the machine skews everything: run it on a quiet machine.
import argparse
import contextlib
import ctypes
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "workloads"))
sys.path.insert(0, str(REPO))
from wl_build import build_workloads  # noqa: E402

UPSTREAM = REPO.parent / "shared" / "reference" / "criu-4.2" / "criu"
PR_SET_CHILD_SUBREAPER = 36
SUMMARY: list[str] = []


def target(name: str, value: str, met: bool) -> None:
    SUMMARY.append(f"  {'met    ' if met else 'NOT met'}  {name}: {value}")


def criu_py(*args) -> list[str]:
    script = Path(sys.executable).parent / "criu-py"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "criu_py"]
    return base + [str(a) for a in args]


def upstream(*args) -> list[str]:
    return [str(UPSTREAM)] + [str(a) for a in args]


def run(argv, check=True) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    res = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=600)
    dt = time.perf_counter() - t0
    if check and res.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1]} failed: {res.stderr.strip()[-800:]}")
    return dt, res


def stats(images: Path):
    from criu_py.images import ImageDir
    with ImageDir(images) as d:
        return d.read_one("stats-dump").dump


def wait_line(log: Path, pattern: str, count: int = 1, timeout: float = 120.0) -> re.Match:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ms = [m for m in (rx.fullmatch(ln) for ln in log.read_text().split("\n")[:-1]) if m]
        except FileNotFoundError:
            ms = []
        if len(ms) >= count:
            return ms[count - 1]
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {pattern!r} in {log}")


class Procs:
    """Processes the bench started (or restored: we are their subreaper)."""

    def __init__(self):
        self.pids = set()

    def start(self, argv) -> int:
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.pids.add(p.pid)
        return p.pid

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.reap(pid)

    @staticmethod
    def reap(pid: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            if not os.path.exists(f"/proc/{pid}"):
                return
            time.sleep(0.005)

    def kill_all(self) -> None:
        for pid in list(self.pids):
            self.kill(pid)
        # holders of the tracking state end with their tasks; reap them too
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------- incremental
def incremental(bins, work: Path, rounds: int, procs: Procs, use_upstream: bool) -> None:
    print("\n== incremental dump of 1 GiB with ~1% written after a pre-dump ==")
    rows = {"criu-py incremental": [], "criu-py full": [], "upstream 4.2 full": []}
    dirty = []
    walls = {k: [] for k in rows}
    for r in range(rounds):
        log = work / f"dirtier-{r}.log"
        pid = procs.start([bins["dirtier"], log, 1024, 10])
        wait_line(log, rf"ready {pid}")
        pre, dump = fresh(work / "pre"), fresh(work / "dump")
        t_pre = time.monotonic()
        run(criu_py("pre-dump", "-t", pid, "-D", pre, "-o", "pre.log", "-v2"))
        # the pre-dump froze the tree at its start: ~1% is written 1 s after that
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t_pre)))
        wall, _ = run(criu_py("dump", "-t", pid, "-D", dump, "--track-mem", "--prev-images-dir",
                              "../pre", "-o", "dump.log", "-v2"))
        st = stats(dump)
        rows["criu-py incremental"].append(st.frozen_time / 1e3)
        walls["criu-py incremental"].append(wall)
        dirty.append(100 * st.pages_written / max(st.pages_scanned, 1))
        procs.reap(pid)
        if r == 0:               # the images are right: restore and let the task check itself
            run(criu_py("restore", "-D", dump, "-d", "-o", "restore.log"))
            os.kill(pid, signal.SIGUSR1)
            line = wait_line(log, rf"(OK|BAD) {pid} .*").group(0)
            print(f"  restored from the chain: {line.split(' p7')[0]}")
            procs.kill(pid)
        for tool, name in ((criu_py, "criu-py full"), (upstream, "upstream 4.2 full")):
            if tool is upstream and not use_upstream:
                continue
            log = work / f"dirtier-{name[:4]}-{r}.log"
            pid = procs.start([bins["dirtier"], log, 1024, 10])
            wait_line(log, rf"ready {pid}")
            time.sleep(0.5)
            full = fresh(work / "full")
            wall, _ = run(tool("dump", "-t", pid, "-D", full, "-o", "dump.log"))
            rows[name].append(stats(full).frozen_time / 1e3)
            walls[name].append(wall)
            procs.reap(pid)
    print(f"  written since the pre-dump: {statistics.median(dirty):.2f}% of the pages (median)")
    for name, vals in rows.items():
        if vals:
            print(f"  {name:22} frozen {statistics.median(vals):8.1f} ms   wall "
                  f"{statistics.median(walls[name]):6.2f} s   (rounds: "
                  f"{', '.join(f'{v:.1f}' for v in vals)} ms)")
    inc = statistics.median(rows["criu-py incremental"])
    full = statistics.median(rows["criu-py full"])
    print(f"  frozen: incremental / full = 1 / {full / inc:.0f}")
    if rows["upstream 4.2 full"]:
        print(f"  frozen: incremental / upstream full = 1 / "
              f"{statistics.median(rows['upstream 4.2 full']) / inc:.0f}")
    target("frozen time of the incremental dump, 1 GiB with ~1% written", f"{inc:.1f} ms (<= 20 ms)",
           inc <= 20)


# ---------------------------------------------------------------- snapshot
def check_rewriter_images(images: Path, pid: int) -> tuple[int, int]:
    from criu_py.images import PE_PRESENT, ImageDir, pagemap_nr_pages
    with ImageDir(images) as d:
        pm = d.read_entries(f"pagemap-{pid}.img")
        mm = d.read_one(f"mm-{pid}.img")
        fd = d.open_raw(f"pages-{pm[0].pages_id}.img")
    try:
        where, off = {}, 0
        for e in pm[1:]:
            n = pagemap_nr_pages(e)
            if e.flags & PE_PRESENT:
                where[e.vaddr] = (off, n)
                off += n * 4096
        area = max(mm.vmas, key=lambda v: v.end - v.start)
        data = bytearray()
        for vaddr in sorted(a for a in where if area.start <= a < area.end):
            o, n = where[vaddr]
            data += os.pread(fd, n * 4096, o)
        magic, state = struct.unpack_from("<QQ", data, 0)
        gen, index = state >> 32, state & 0xFFFFFFFF
        for i in range(1, len(data) // 4096):
            page = bytes(data[i * 4096:(i + 1) * 4096])
            new, old = struct.pack("<Q", gen << 32 | i), struct.pack("<Q", (gen - 1) << 32 | i)
            if i != index and page != (new if i < index else old) * 512:
                raise RuntimeError(f"snapshot images: page {i} is not of gen {gen} index {index}")
        return gen, index
    finally:
        os.close(fd)


def snapshot(bins, work: Path, rounds: int, procs: Procs) -> None:
    print("\n== snapshot (dump --leave-running) of 1 GiB rewritten in a tight loop ==")
    frozen, ratios, copies = [], [], []
    for r in range(rounds):
        log = work / f"rewriter-{r}.log"
        pid = procs.start([bins["rewriter"], log, 1024, 20])
        wait_line(log, rf"ready {pid}")
        time.sleep(1.5)
        images = fresh(work / "snap")
        run(criu_py("dump", "-t", pid, "-D", images, "--leave-running", "-o", "dump.log", "-v4"))
        time.sleep(0.3)
        text = (images / "dump.log").read_text()
        m = re.search(r"snapshot: (\d+) MiB copied in ([\d.]+) ms .*monotonic ([\d.]+)-([\d.]+)", text)
        if m is None:
            raise RuntimeError("the dump took no snapshot")
        c0, c1 = float(m.group(3)), float(m.group(4))
        samples = [(int(x.group(2)) / 1e9, int(x.group(1))) for x in
                   (re.fullmatch(r"rate (\d+) (\d+)", ln) for ln in log.read_text().split("\n")) if x]
        before = [rate for t, rate in samples if t < c0 - 0.5]
        during = [rate for t, rate in samples if c0 + 0.02 <= t <= c1]
        frozen.append(stats(images).frozen_time / 1e3)
        copies.append(float(m.group(2)))
        if before and during:
            ratios.append(statistics.mean(during) / statistics.median(before))
        gen, index = check_rewriter_images(images, pid)
        print(f"  round {r}: frozen {frozen[-1]:.1f} ms, {m.group(1)} MiB copied in "
              f"{float(m.group(2)):.0f} ms, the task's rate meanwhile "
              f"{100 * ratios[-1]:.0f}% of before ({len(during)} samples); images hold gen "
              f"{gen} up to page {index}")
        procs.kill(pid)
    f = statistics.median(frozen)
    rate = statistics.median(ratios) if ratios else 0
    target("snapshot of 1 GiB: frozen", f"{f:.1f} ms (<= 20 ms)", f <= 20)
    target("snapshot of 1 GiB: the task's rate during the copy", f"{100 * rate:.0f}% (>= 50%)",
           rate >= 0.5)


# ---------------------------------------------------------------- irmap
def irmap(bins, work: Path, rounds: int, procs: Procs) -> None:
    print("\n== irmap: a watch deep in a tree of 100,000 files ==")
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    for i in range(100):
        sub = tree / f"d{i}"
        sub.mkdir(parents=True)
        for j in range(1000):
            os.close(os.open(sub / f"file{j}", os.O_CREAT | os.O_WRONLY, 0o644))
    deep = tree / "d37" / "e5" / "f"
    deep.mkdir(parents=True)
    (deep / "deep").write_text("")
    watched = fresh(work / "watched")
    scan = ["--force-irmap", "--irmap-scan-path", work]
    cold, warm, cold_frozen, warm_frozen = [], [], [], []
    for r in range(rounds):
        log = work / f"notifier-{r}.log"
        pid = procs.start([bins["notifier"], log, watched, "-", deep / "deep"])
        wait_line(log, rf"ready {pid}")
        d = fresh(work / "cold")
        run(criu_py("dump", "-t", pid, "-D", d, "--leave-running", "-o", "dump.log", "-v4", *scan))
        cold.append(stats(d).irmap_resolve / 1e3)
        cold_frozen.append(stats(d).frozen_time / 1e3)
        pre, d = fresh(work / "irpre"), fresh(work / "warm")
        run(criu_py("pre-dump", "-t", pid, "-D", pre, "-o", "pre.log", "-v4", *scan))
        run(criu_py("dump", "-t", pid, "-D", d, "--leave-running", "--track-mem",
                    "--prev-images-dir", "../irpre", "-o", "dump.log", "-v4", *scan))
        if "(from the cache)" not in (d / "dump.log").read_text():
            raise RuntimeError("the warm dump did not use the cache")
        warm.append(stats(d).irmap_resolve / 1e3)
        warm_frozen.append(stats(d).frozen_time / 1e3)
        procs.kill(pid)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"  irmap time: no cache {c:.1f} ms, warm cache {w:.2f} ms ({c / max(w, 1e-3):.0f}x)")
    print(f"  frozen time: no cache {statistics.median(cold_frozen):.1f} ms, warm cache "
          f"{statistics.median(warm_frozen):.1f} ms")
    target("irmap with a warm cache", f"{c / max(w, 1e-3):.0f}x faster (>= 10x)", c >= 10 * w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default=None, help="work dir (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-upstream", action="store_true")
    ap.add_argument("--only", default="incremental,snapshot,irmap")
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(args.dir or tempfile.mkdtemp(prefix="criu-py-bench-inc-"))
    work.mkdir(parents=True, exist_ok=True)
    bins = build_workloads(work / "bin" if (work / "bin").mkdir(exist_ok=True) is None else work,
                           ["dirtier", "rewriter", "notifier"])
    use_upstream = not args.no_upstream and UPSTREAM.exists() and \
        subprocess.run(upstream("--version"), capture_output=True).returncode == 0
    if not use_upstream:
        print("(upstream CRIU 4.2 not used)")
    procs = Procs()
    try:
        only = args.only.split(",")
        if "incremental" in only:
            incremental(bins, work, args.rounds, procs, use_upstream)
        if "snapshot" in only:
            snapshot(bins, work, args.rounds, procs)
        if "irmap" in only:
            irmap(bins, work, args.rounds, procs)
    finally:
        procs.kill_all()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print("\nTargets:")
    print("\n".join(SUMMARY))


if __name__ == "__main__":
    main()
