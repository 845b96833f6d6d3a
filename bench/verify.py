#!/usr/bin/env python3
# What checking the images costs a restore (issue 8's target: at most +10% on 1 GiB). One
# memhog process with SIZE MiB of patterned memory is dumped once; then, alternately in
# the same run, it is restored with and without --no-verify, the restored task asked to
# check its memory (SIGUSR1 -> "OK"/"BAD"), killed and reaped. Prints each kind's wall
# times, medians and the ratio; nothing is asserted.
#
#   .venv/bin/python bench/verify.py [--size-mib 1024] [--rounds 5] [--dir DIR]
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

PR_SET_CHILD_SUBREAPER = 36
TARGET = 1.10


def criu_py(*args) -> list[str]:
    script = Path(sys.executable).parent / "criu-py"
    return [str(script) if script.exists() else sys.executable, *([] if script.exists() else ["-m", "criu_py"]),
            *map(str, args)]


def wait_line(log: Path, prefix: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [x for x in log.read_text().split("\n")[:-1] if x.startswith(prefix)] \
            if log.exists() else []
        if len(lines) >= count:
            return
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for {prefix!r} in {log}")


def reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            got, _ = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        if got == pid:
            return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(tempfile.mkdtemp(prefix="criu-py-verify-", dir=a.dir))
    try:
        bins = build_workloads(work, ["memhog"])
        log = work / "memhog.log"
        proc = subprocess.Popen([bins["memhog"], log, str(a.size_mib), "4660"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        wait_line(log, "ready", 1)
        images = work / "images"
        t0 = time.perf_counter()
        res = subprocess.run(criu_py("dump", "-t", proc.pid, "-D", images), capture_output=True, text=True)
        dump_s = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(f"dump failed: {res.stderr}")
        proc.wait()
        print(f"dump of {a.size_mib} MiB: {dump_s:.3f} s (checksums included)")
        times = {"verify": [], "no-verify": []}
        oks = 0
        for r in range(a.rounds):
            for kind in ("no-verify", "verify") if r % 2 == 0 else ("verify", "no-verify"):
                extra = ["--no-verify"] if kind == "no-verify" else []
                t0 = time.perf_counter()
                res = subprocess.run(criu_py("restore", "-D", images, "-d", *extra),
                                     capture_output=True, text=True)
                times[kind].append(time.perf_counter() - t0)
                if res.returncode:
                    raise SystemExit(f"restore failed: {res.stderr}")
                n = sum(1 for x in log.read_text().split("\n") if x.startswith(("OK", "BAD")))
                os.kill(proc.pid, signal.SIGUSR1)
                wait_line_any(log, n + 1)
                oks += log.read_text().split("\n")[-2].startswith("OK")
                reap(proc.pid)
        for kind, ts in times.items():
            print(f"restore {kind:>9}: median {statistics.median(ts):.3f} s  "
                  f"({', '.join(f'{t:.3f}' for t in ts)})")
        ratio = statistics.median(times["verify"]) / statistics.median(times["no-verify"])
        print(f"ratio verify / no-verify: {ratio:.3f} (+{(ratio - 1) * 100:.1f}%; target <= "
              f"+{(TARGET - 1) * 100:.0f}%: {'met' if ratio <= TARGET else 'NOT met'}); "
              f"restored tasks reporting OK: {oks}/{2 * a.rounds}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wait_line_any(log: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for x in log.read_text().split("\n")[:-1] if x.startswith(("OK", "BAD"))) >= count:
            return
        time.sleep(0.005)
    raise SystemExit(f"timed out waiting for the memory check in {log}")


if __name__ == "__main__":
    main()
