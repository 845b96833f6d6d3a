#!/usr/bin/env python3
# What cgroups cost a restore, in one run: the counter restored from its own cgroups (no
# cgroup.img) against the counter restored into test cgroups on memory, cpu, pids and
# cgroup2 with limits (the restore makes the cgroups, writes the limits and moves the
# task), rounds interleaved, medians and their ratio; the yard's own steps from the
# restore log; the cost of one move (one write per hierarchy); and the tree case:
# a 50-process tree (tests/workloads/spawner) spread over 10 memory+pids cgroups with
# limits against the same tree left where this runs, rounds interleaved (target: within
# 10%). Test cgroups live under where this runs and are removed afterwards.
#
#   .venv/bin/python bench/cgroups.py [--rounds 10] [--tree-size 50]
import argparse
import contextlib
import ctypes
import os
import re
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
sys.path.insert(0, str(REPO / "tests"))
from cgsandbox import Sandbox, yard_mounts  # noqa: E402
from wl_build import build_workloads  # noqa: E402

NAMES = ["memory", "cpu", "pids", ""]
LIMITS = {"memory": {"memory.limit_in_bytes": str(64 << 20)},
          "cpu": {"cpu.shares": "512"},     # no quota: it would throttle the restore itself
          "pids": {"pids.max": "17"}, "": {"cgroup.max.descendants": "5"}}


def cli(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "criu-py"), *map(str, args)]


def wait_line(log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            return
        time.sleep(0.005)
    raise RuntimeError(f"{log} stays empty")


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def one_round(bins, work: Path, box: Sandbox, with_cgroups: bool, i: int) -> tuple[float, dict]:
    log = work / f"counter-{i}.log"
    p = subprocess.Popen([bins["counter"], log], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    wait_line(log)
    if with_cgroups:
        for name in NAMES:
            d = box.make(name, "wl")
            for prop, value in LIMITS.get(name, {}).items():
                (d / prop).write_text(value)
            box.put(name, "wl", p.pid)
    images = work / f"images-{i}"
    subprocess.run(cli("dump", "-t", p.pid, "-D", images), check=True)
    p.wait()
    if with_cgroups:
        for name in NAMES:
            box.dir(name, "wl").rmdir()           # the restore makes them again
    t0 = time.perf_counter()
    subprocess.run(cli("restore", "-D", images, "-d", "-v3", "-o", "restore.log"), check=True)
    wall = time.perf_counter() - t0
    steps = {}
    for line in (images / "restore.log").read_text().splitlines():
        m = re.search(r"restore: (.+?)\s+([\d.]+) ms$", line)
        if m:
            steps[m.group(1).strip()] = float(m.group(2))
        m = re.search(r"cgroups: (\d+) properties written in ([\d.]+) ms", line)
        if m:
            steps["cgroup properties"] = float(m.group(2))
    kill(p.pid)
    shutil.rmtree(images)
    return wall, steps


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            with contextlib.suppress(OSError):
                kids = [int(x) for x in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
                out += kids
                todo += kids
    return out


def reap_all() -> None:
    while True:
        try:
            if os.waitpid(-1, 0)[0] == 0:
                return
        except ChildProcessError:
            return


def tree_round(bins, work: Path, box: Sandbox, n: int, with_cgroups: bool, i: int) -> float:
    """Restore wall time of an n-process tree, spread over 10 cgroups or not."""
    log = work / f"tree-{i}.log"
    p = subprocess.Popen([bins["spawner"], log, str(n), "1"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().startswith("ready")):
        if time.monotonic() > deadline:
            raise RuntimeError("the tree did not get ready")
        time.sleep(0.005)
    pids = [p.pid] + descendants(p.pid)
    if with_cgroups:
        for k, pid in enumerate(pids):
            for name in ("memory", "pids"):
                sub = f"tree/g{k % 10}"
                d = box.make(name, sub)
                if name == "memory":
                    (d / "memory.limit_in_bytes").write_text(str(256 << 20))
                else:
                    (d / "pids.max").write_text("50")
                box.put(name, sub, pid)
    images = work / f"tree-images-{i}"
    subprocess.run(cli("dump", "-t", p.pid, "-D", images), check=True)
    p.wait()
    reap_all()
    if with_cgroups:
        for name in ("memory", "pids"):
            for k in range(10):
                box.dir(name, f"tree/g{k}").rmdir()      # the restore makes them again
    t0 = time.perf_counter()
    subprocess.run(cli("restore", "-D", images, "-d"), check=True)
    wall = time.perf_counter() - t0
    got = 1 + len(descendants(p.pid))
    for pid in [p.pid] + descendants(p.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reap_all()
    if with_cgroups:
        for name in ("memory", "pids"):
            for k in range(10):
                with contextlib.suppress(OSError):
                    box.dir(name, f"tree/g{k}").rmdir()
    shutil.rmtree(images)
    if got != n:
        raise RuntimeError(f"restored {got} of {n} processes")
    return wall


def move_cost(images: Path, box: Sandbox, rounds: int = 300) -> tuple[float, int]:
    """Seconds per Yard.move of a sleeping process into the dumped set and back, and the
    number of hierarchies each move writes."""
    from criu_py.cgroup import ROOT_CG_SET
    from criu_py.cgroup.restore import Yard
    from criu_py.images import ImageDir
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with Yard({}, ImageDir(str(images))) as yard:
            sid = next(iter(yard.sets))
            writes = len(yard._plan(sid, ROOT_CG_SET, False))
            t0 = time.perf_counter()
            for _ in range(rounds):
                yard.move(child.pid, sid)
                yard.move(child.pid, ROOT_CG_SET, parent_set=sid)
            per = (time.perf_counter() - t0) / (2 * rounds)
            yard.move(child.pid, ROOT_CG_SET, parent_set=sid)
    finally:
        child.kill()
        child.wait()
    return per, writes


def first_move_cost(box: Sandbox, rounds: int = 5) -> float:
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    box.make("pids", "first")
    out = []
    try:
        for _ in range(rounds):
            time.sleep(0.3)
            t0 = time.perf_counter()
            box.put("pids", "first", child.pid)
            out.append(time.perf_counter() - t0)
            Path(box.mountpoint("pids") + box.own["pids"], "cgroup.procs").write_text(str(child.pid))
    finally:
        child.kill()
        child.wait()
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tree-size", type=int, default=50)
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)                    # restored tasks come back to us
    work = Path(tempfile.mkdtemp(prefix="criu-py-bench-cg-"))
    box = Sandbox()
    try:
        bins = build_workloads(work, ["counter", "spawner"])
        plain, cgs, steps, psteps = [], [], [], []
        for i in range(args.rounds):
            wall, st = one_round(bins, work, box, False, 2 * i)
            plain.append(wall)
            psteps.append(st)
            wall, st = one_round(bins, work, box, True, 2 * i + 1)
            cgs.append(wall)
            steps.append(st)
        med_p, med_c = statistics.median(plain), statistics.median(cgs)
        print(f"restore of the counter, {args.rounds} interleaved rounds (wall, incl. start-up):")
        print(f"  without cgroups            median {med_p * 1e3:7.1f} ms  (min {min(plain) * 1e3:.1f})")
        print(f"  into 4 new cgroups+limits  median {med_c * 1e3:7.1f} ms  (min {min(cgs) * 1e3:.1f})")
        print(f"  ratio                      {med_c / med_p:.3f}  ({(med_c - med_p) * 1e3:+.1f} ms)")
        for key in ("cgroup yard", "fork with pid", "wait for the restorer", "cgroup properties"):
            vals = [s[key] for s in steps if key in s]
            pvals = [s[key] for s in psteps if key in s]
            if vals:
                without = f"  (without: {statistics.median(pvals):6.2f} ms)" if pvals else ""
                print(f"  step {key:<24} median {statistics.median(vals):6.2f} ms{without}")
        # a dump whose cgroup.img the move benchmark can use
        log = work / "m.log"
        p = subprocess.Popen([bins["counter"], log], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        wait_line(log)
        for name in NAMES:
            box.make(name, "wl")
            box.put(name, "wl", p.pid)
        images = work / "move-images"
        subprocess.run(cli("dump", "-t", p.pid, "-D", images, "--leave-running"), check=True)
        kill(p.pid)
        per, writes = move_cost(images, box)
        print(f"one move (open+write+close of cgroup.procs on {writes} hierarchies): "
              f"{per * 1e6:.1f} us, {per / max(writes, 1) * 1e6:.1f} us per hierarchy")
        first = first_move_cost(box)
        print(f"first move after idle (the kernel waits for an RCU grace period on its "
              f"cgroup lock, once per burst of moves): median {first * 1e3:.1f} ms")
        n = args.tree_size
        plain_t, cg_t = [], []
        for i in range(args.rounds):
            plain_t.append(tree_round(bins, work, box, n, False, 2 * i))
            cg_t.append(tree_round(bins, work, box, n, True, 2 * i + 1))
        mp, mc = statistics.median(plain_t), statistics.median(cg_t)
        print(f"restore of a {n}-process tree, {args.rounds} interleaved rounds:")
        print(f"  in the caller's cgroups        median {mp * 1e3:7.1f} ms")
        print(f"  over 10 memory+pids cgroups    median {mc * 1e3:7.1f} ms")
        print(f"  ratio                          {mc / mp:.3f}  (target <= 1.10)")
    finally:
        left = box.cleanup()
        shutil.rmtree(work, ignore_errors=True)
        if left or yard_mounts():
            print(f"LEFT BEHIND: {left} {yard_mounts()}")


if __name__ == "__main__":
    main()
