#!/usr/bin/env python3
# Dump and restore of process trees and threaded processes, criu-py side by side with
# upstream CRIU 4.2 (../shared/reference/criu-4.2) on the same workload in the same run,
# rounds interleaved so machine noise hits both alike. Workload: tests/workloads/spawner
# (N processes with T threads each, all sleeping in 10 ms steps). Nothing is asserted;
# it prints medians, the ratio criu-py / upstream and the time per task as the tree grows.
#
#   .venv/bin/python bench/tree.py [--rounds 5] [--no-upstream] [--sizes 10,50,100,200]
#
# Targets (issue 7): the 50-process tree with 2 threads each at most 1.0x upstream's time;
# the time per task flat as the tree grows from 10 to 200 tasks.
import argparse
import ctypes
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
            if os.waitpid(-1, 0)[0] == 0:
                return
        except ChildProcessError:
            return


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def start(binary: Path, work: Path, n: int, t: int) -> int:
    log = work / "spawner.log"
    log.unlink(missing_ok=True)
    p = subprocess.Popen([str(binary), str(log), str(n), str(t)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().startswith("ready"):
            time.sleep(0.1)
            return p.pid
        time.sleep(0.005)
    raise RuntimeError("spawner did not get ready")


def kill_tree(root: int) -> None:
    for pid in [root] + descendants(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reap_all()


def one_round(tool, binary: Path, work: Path, n: int, t: int) -> tuple[float, float]:
    """Dump (killing the tree) and restore -d with `tool`; (dump s, restore s)."""
    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    root = start(binary, work, n, t)
    t0 = time.perf_counter()
    res = subprocess.run(tool("dump", "-t", root, "-D", images, "-o", "dump.log"),
                         capture_output=True, text=True, timeout=600)
    t1 = time.perf_counter()
    if res.returncode != 0:
        kill_tree(root)
        raise RuntimeError(f"dump failed: {res.stderr.strip()[-500:]}")
    reap_all()
    t2 = time.perf_counter()
    res = subprocess.run(tool("restore", "-D", images, "-d", "-o", "restore.log"),
                         capture_output=True, text=True, timeout=600)
    t3 = time.perf_counter()
    if res.returncode != 0:
        raise RuntimeError(f"restore failed: {res.stderr.strip()[-500:]}")
    got = 1 + len(descendants(root))
    kill_tree(root)
    if got != n:
        raise RuntimeError(f"restored {got} processes of {n}")
    return t1 - t0, t3 - t2


def measure(tools: dict, binary: Path, work: Path, n: int, t: int, rounds: int) -> dict:
    times = {name: ([], []) for name in tools}
    for _ in range(rounds):
        for name, tool in tools.items():
            d, r = one_round(tool, binary, work, n, t)
            times[name][0].append(d)
            times[name][1].append(r)
    return {name: (statistics.median(d), statistics.median(r)) for name, (d, r) in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-upstream", action="store_true")
    ap.add_argument("--sizes", default="10,50,100,200")
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(tempfile.mkdtemp(prefix="criu-py-bench-tree-"))
    try:
        binary = build_workloads(work, ["spawner"])["spawner"]
        tools = {"criu-py": criu_py}
        if not args.no_upstream:
            if upstream_usable():
                tools["upstream"] = upstream
            else:
                print(f"(upstream CRIU 4.2 not usable at {UPSTREAM}: criu-py alone)")
        configs = [("50 processes x 2 threads", 50, 2), ("1 process x 64 threads", 1, 64)]
        configs += [(f"{n} processes x 1 thread", n, 1) for n in map(int, args.sizes.split(","))]
        print(f"{'workload':28} {'tool':8} {'dump ms':>8} {'restore ms':>10} {'dump/task':>10} "
              f"{'restore/task':>12}")
        results = {}
        for label, n, t in configs:
            res = measure(tools, binary, work, n, t, args.rounds)
            results[label] = res
            for name, (d, r) in res.items():
                tasks = n * t
                print(f"{label:28} {name:8} {d * 1e3:8.1f} {r * 1e3:10.1f} {d / tasks * 1e3:9.2f}ms "
                      f"{r / tasks * 1e3:11.2f}ms")
            if "upstream" in res:
                (cd, cr), (ud, ur) = res["criu-py"], res["upstream"]
                print(f"{'':28} {'ratio':8} {cd / ud:8.2f}x {cr / ur:9.2f}x  (criu-py / upstream)")
        sizes = [label for label, n, t in configs if t == 1 and n > 1]
        if len(sizes) >= 2:
            per = [(results[s]["criu-py"][0] + results[s]["criu-py"][1]) /
                   int(s.split()[0]) * 1e3 for s in sizes]
            print("criu-py dump+restore per task: " +
                  ", ".join(f"{s.split()[0]}: {p:.2f} ms" for s, p in zip(sizes, per)) +
                  f"  (largest/smallest {max(per) / min(per):.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
