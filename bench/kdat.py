# Benchmark of the kdat cache: a full kernel probe against a cached load, in-process (warm
# and first-in-process, imports included) and as whole `criu-py kdat` runs. Prints a table
# and whether the targets hold: cached load >= 20x faster than probing and under 2 ms, and
# a cached command never slower than a probing one. Uses a temporary cache path, never
# /run/criu-py.kdat.   Run: .venv/bin/python bench/kdat.py [-n RUNS]
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIRST_LOAD = """
import sys, time
t0 = time.perf_counter()
from criu_py import kerndat
f = kerndat.load(sys.argv[1])
t1 = time.perf_counter()
assert f.source == sys.argv[2], f.source
print(t1 - t0)
"""


def median_ms(samples):
    return statistics.median(samples) * 1e3


def time_calls(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def time_command(args, n, before=None):
    env = {k: v for k, v in os.environ.items() if k != "CRIU_PY_KDAT"}
    out = []
    for _ in range(n):
        if before:
            before()
        t0 = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20, help="runs per measurement")
    n = ap.parse_args().n
    from criu_py import kerndat
    from criu_py.kerndat import cache

    workdir = tempfile.mkdtemp(prefix="kdat-bench-")
    path = os.path.join(workdir, "criu.kdat")
    drop = lambda: cache.drop_cache(path)  # noqa: E731
    py = sys.executable
    cli = [py, "-m", "criu_py", "kdat", "--kdat-path"]
    try:
        kerndat.probe()                                            # warm imports
        probe = time_calls(lambda: kerndat.probe(), n)
        probe_save = time_calls(lambda: (drop(), kerndat.load(path)), n)
        kerndat.load(path)
        cached = time_calls(lambda: kerndat.load(path), max(n, 200))
        cached_caller = time_calls(lambda: kerndat.load(path).caller.as_dict(), max(n, 200))
        first_cached = []
        first_probe = []
        for _ in range(max(5, n // 4)):
            first_cached.append(float(subprocess.run([py, "-c", FIRST_LOAD, path, "cache"], check=True,
                                                     capture_output=True, text=True, cwd=REPO).stdout))
            first_probe.append(float(subprocess.run([py, "-c", FIRST_LOAD, "none", "probe"], check=True,
                                                    capture_output=True, text=True, cwd=REPO).stdout))
        kerndat.load(path)
        cmd_cached = time_command(cli + [path], n)
        cmd_probe = time_command(cli + ["none"], n)
        cmd_probe_save = time_command(cli + [path], n, before=drop)
    finally:
        cache.drop_cache(path)
        os.rmdir(workdir)

    rows = [
        ("in-process, warm: full probe", probe),
        ("in-process, warm: probe + save (no file)", probe_save),
        ("in-process, warm: cached load", cached),
        ("  same + every caller fact read (/proc/self)", cached_caller),
        ("first load in a process, probe (imports incl.)", first_probe),
        ("first load in a process, cached (imports incl.)", first_cached),
        ("`criu-py kdat`, cached", cmd_cached),
        ("`criu-py kdat --kdat-path none` (probe)", cmd_probe),
        ("`criu-py kdat`, no file (probe + save)", cmd_probe_save),
    ]
    print(f"{'measurement':<50} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, samples in rows:
        print(f"{name:<50} {median_ms(samples):>10.3f} {min(samples) * 1e3:>8.3f} {max(samples) * 1e3:>8.3f}")
    ratio = statistics.median(probe) / statistics.median(cached)
    print()
    print(f"probe / cached load (warm): {ratio:.0f}x  (target >= 20x): {'ok' if ratio >= 20 else 'MISSED'}")
    print(f"cached load {median_ms(cached):.3f} ms (target < 2 ms): "
          f"{'ok' if median_ms(cached) < 2 else 'MISSED'}")
    first_ok = statistics.median(first_cached) <= statistics.median(first_probe)
    cmd_ok = statistics.median(cmd_cached) <= min(statistics.median(cmd_probe), statistics.median(cmd_probe_save))
    print(f"first load in a process, cached <= probe: {'ok' if first_ok else 'MISSED'}")
    print(f"`criu-py kdat` cached <= probing: {'ok' if cmd_ok else 'MISSED'}")


if __name__ == "__main__":
    main()
