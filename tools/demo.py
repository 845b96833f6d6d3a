#!/usr/bin/env python3
# `make demo`: shows criu-py doing its job on a live process, through the real CLI. A C
# counter logs "<pid> <count>" every 100 ms; it is checkpointed (and disappears),
# then restored, and goes on with the next count under the same PID. Everything it
# starts and writes is removed at the end, whatever happens.
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "workloads"))
from wl_build import build_workloads  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36


def say(text=""):
    print(text, flush=True)


def criu_py(*args) -> list[str]:
    script = Path(sys.executable).parent / "criu-py"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "criu_py"]
    return base + [str(a) for a in args]


def run(*args) -> subprocess.CompletedProcess:
    argv = criu_py(*args)
    say("  $ criu-py " + " ".join(str(a) for a in args))
    t0 = time.perf_counter()
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"demo: criu-py failed (exit {res.returncode}): {res.stderr.strip()}")
    say(f"    ok in {took * 1e3:.0f} ms")
    return res


def tail(log: Path, n: int) -> list[str]:
    return log.read_text().split("\n")[:-1][-n:]


def count_lines(log: Path) -> int:
    try:
        return log.read_text().count("\n")
    except FileNotFoundError:
        return 0


def wait_lines(log: Path, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while count_lines(log) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: the counter stopped logging ({log})")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def is_our_counter(pid: int, work: Path) -> bool:
    try:
        return str(work) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return False


def main():
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # the restored task becomes our child
    work = Path(tempfile.mkdtemp(prefix="criu-py-demo-"))
    pid = None
    try:
        bins = build_workloads(work, ["counter"])
        log, images = work / "counter.log", work / "images"
        images.mkdir(mode=0o700)

        say("1. Start a sample process: a C counter that appends '<pid> <count>' to a log every 100 ms.")
        proc = subprocess.Popen([str(bins["counter"]), str(log), "100"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        pid = proc.pid
        wait_lines(log, 8)
        say(f"   pid {pid}, its log so far ends with:")
        for line in tail(log, 3):
            say(f"     {line}")

        say(f"\n2. Checkpoint it into {images}:")
        run("dump", "-t", pid, "-D", images)
        proc.wait(10)  # the dump killed it; collect the zombie so its PID is free again
        last = tail(log, 1)[0]
        say(f"   image files: {', '.join(sorted(p.name for p in images.iterdir()))}")
        time.sleep(1)
        now = tail(log, 1)[0]
        say(f"   one second later: process {pid} {'is STILL running (unexpected)' if alive(pid) else 'is gone'};"
            f" the log {'still ends' if now == last else 'GREW and now ends'} with '{now}'")

        say("\n3. Restore it from the images:")
        n = count_lines(log)
        run("restore", "-D", images, "-d")
        wait_lines(log, n + 5)
        say(f"   process {pid} {'is running again' if alive(pid) else 'is NOT running'}; the log goes on:")
        lines = log.read_text().split("\n")[:-1]
        for i in range(max(0, n - 3), n + 4):
            say(f"     {lines[i]}{'   <- first line after the restore' if i == n else ''}")
        before, after = lines[n - 1], lines[n]
        same_pid = before.split()[0] == after.split()[0] == str(pid)
        next_count = int(after.split()[1]) == int(before.split()[1]) + 1
        say(f"\n   same pid: {'yes' if same_pid else 'NO'}; "
            f"continues with the next count: {'yes' if next_count else 'NO'}")
        if not (same_pid and next_count):
            raise SystemExit(1)
    finally:
        say("\n4. Clean up: kill the counter and remove the demo's files.")
        if pid is not None and is_our_counter(pid, work):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
