#!/usr/bin/env python3
# Fuzzing `restore` and every `crit` command with damaged image sets (issue 8). A real
# dump of `sleep` (fds on /dev/null only, so a restore needs nothing writable) is damaged
# one way per case - a flipped byte, truncation, appended garbage, a zeroed or huge entry
# length prefix, two files swapped - and each case runs `restore -d` and crit decode,
# show, info and x ps/fds/mems/rss in a forked child of an interpreter that has criu-py
# loaded (20 s alarm each). Everything runs in a private mount namespace whose / is
# remounted read-only (only a tmpfs work dir is writable), so a bug cannot damage the
# machine. Counted: clean errors (one "Error:" line), detected damage (the checksum check
# named the file), crashes (a traceback, a signal, more than one line: must be 0), hangs
# (0), processes left at the PID (0), restores that succeeded from damaged images (0 with
# verification on). Exit status 1 when any of the last four is not 0.
#
#   .venv/bin/python tools/fuzz_images.py [--cases 2000] [--seed 8] [--no-verify]
import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

SANDBOX_ENV = "CRIU_PY_FUZZ_SANDBOX"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRIT_COMMANDS = [["decode", "-i", "{f}"], ["show", "{f}"], ["info", "{f}"],
                 ["x", "{d}", "ps"], ["x", "{d}", "fds"], ["x", "{d}", "mems"], ["x", "{d}", "rss"]]
DETECTED = ("damaged", "missing (listed", "added after the dump", "criu-py-checksums.img")


def enter_sandbox(argv: list[str]) -> None:
    """Re-run this script in a new mount namespace with a tmpfs work dir and / read-only."""
    work = tempfile.mkdtemp(prefix="criu-py-fuzz-")
    script = (f"set -e; mount --make-rprivate /; mount -t tmpfs -o size=512m tmpfs {work}; "
              f"mount -o remount,bind,ro /; exec \"$@\"")
    env = {**os.environ, SANDBOX_ENV: work, "CRIU_PY_KDAT": "none"}
    try:
        rc = subprocess.call(["unshare", "-m", "sh", "-c", script, "sh", sys.executable,
                              os.path.abspath(__file__), *argv], env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(rc)


def dump_sleep(work: str) -> tuple[int, str]:
    """A real dump of `sleep 1000` in its own session; returns (pid, images dir)."""
    images = os.path.join(work, "base")
    p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.2)
    res = subprocess.run([sys.executable, "-m", "criu_py", "dump", "-t", str(p.pid), "-D", images],
                         capture_output=True, text=True)
    p.wait()
    if res.returncode:
        raise SystemExit(f"fuzz: the baseline dump failed: {res.stderr}")
    return p.pid, images


def mutate(rng: random.Random, src: str, dst: str) -> str:
    """Copy src to dst with one damage; returns a description."""
    shutil.copytree(src, dst)
    names = sorted(os.listdir(dst))
    name = rng.choice(names)
    path = os.path.join(dst, name)
    data = bytearray(open(path, "rb").read())
    kind = rng.choice(["flip", "flip", "truncate", "append", "zero_len", "huge_len", "swap"])
    if kind == "flip" and data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate" and data:
        data = data[:rng.randrange(len(data))]
    elif kind == "append":
        data += os.urandom(rng.choice([1, 3, 4, 8, 100]))
    elif kind in ("zero_len", "huge_len") and len(data) >= 12:
        off = 8 if struct.unpack_from("<I", data, 0)[0] in (0x54564319, 0x55105940) else 4
        struct.pack_into("<I", data, off, 0 if kind == "zero_len" else rng.choice([0x7FFFFFFF, 0xFFFFFFFF, len(data)]))
    elif kind == "swap":
        other = rng.choice([n for n in names if n != name] or [name])
        a, b = path, os.path.join(dst, other)
        tmp = a + ".swap"
        os.rename(a, tmp)
        os.rename(b, a)
        os.rename(tmp, b)
        return f"swap {name} {other}"
    else:
        data += b"\0"
        kind = "append"
    if bytes(data) == open(path, "rb").read():      # e.g. zeroing a length that was 0
        data = bytearray(data) + b"\xff"
        kind += "+append"
    open(path, "wb").write(bytes(data))
    return f"{kind} {name}"


def run_forked(argv: list[str], timeout: int = 20) -> tuple[int, str]:
    """main(argv) of criu-py in a forked child: (exit status or -signal, stderr)."""
    from criu_py.main import main
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.alarm(timeout)
        os.dup2(w, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            main(argv)
        except SystemExit as e:
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        except BaseException as e:  # noqa: BLE001 - reported as a crash
            os.write(2, f"Traceback (fuzz runner): {e!r}\n".encode())
            os._exit(70)
        os._exit(0)
    os.close(w)
    err = b""
    while chunk := os.read(r, 65536):
        err += chunk
    os.close(r)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st), err.decode(errors="replace")


def classify(rc: int, err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    if rc == -signal.SIGALRM:
        return "hang"
    if "Traceback" in err or rc < 0 or (rc != 0 and (len(lines) != 1 or not lines[0].startswith("Error:"))):
        return "crash"
    if rc == 0:
        return "ok"
    return "detected" if any(w in lines[0] for w in DETECTED) else "clean_error"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def reap_all() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def fuzz(args) -> int:
    import ctypes
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)          # restored tasks come back to us
    sys.path.insert(0, REPO)
    work = os.environ[SANDBOX_ENV]
    pid, base = dump_sleep(work)
    rc, err = run_forked(["restore", "-D", base, "-d"])   # the baseline must restore
    if rc != 0 or not alive(pid):
        raise SystemExit(f"fuzz: the undamaged images do not restore: {err}")
    os.unlink(os.path.join(base, "stats-restore"))     # the restore's, not the dump's
    os.kill(pid, signal.SIGKILL)
    reap_all()
    rng = random.Random(args.seed)
    counts = {k: 0 for k in ("restore_clean_error", "restore_detected", "restore_ok",
                             "restore_ok_checksum_image_only", "crash",
                             "hang", "left_behind", "wrong_restore", "crit_json", "crit_error")}
    problems = []
    t0 = time.monotonic()
    for case in range(args.cases):
        d = os.path.join(work, "case")
        shutil.rmtree(d, ignore_errors=True)
        what = mutate(rng, base, d)
        extra = ["--no-verify"] if args.no_verify else []
        rc, err = run_forked(["restore", "-D", d, "-d", *extra])
        kind = classify(rc, err)
        if kind in ("crash", "hang"):
            counts[kind] += 1
            problems.append((case, what, "restore", kind, err[-300:]))
        elif kind == "ok":
            counts["restore_ok"] += 1
            only_checksums = what.split()[1:] == ["criu-py-checksums.img"]
            if only_checksums:
                # every image the restore reads is intact: the right state came back
                counts["restore_ok_checksum_image_only"] += 1
            elif not args.no_verify:
                counts["wrong_restore"] += 1
                problems.append((case, what, "restore", "restored damaged images", ""))
        else:
            counts[f"restore_{kind}"] += 1
        if alive(pid):
            if kind != "ok":
                counts["left_behind"] += 1
                problems.append((case, what, "restore", "left a process behind", err[-200:]))
            os.kill(pid, signal.SIGKILL)
        reap_all()
        name = what.split()[1]
        for cmd in CRIT_COMMANDS:
            argv = ["crit"] + [a.format(f=os.path.join(d, name), d=d) for a in cmd]
            rc, err = run_forked(argv)
            kind = classify(rc, err)
            if kind in ("crash", "hang"):
                counts[kind] += 1
                problems.append((case, what, " ".join(cmd[:2]), kind, err[-300:]))
            else:
                counts["crit_json" if kind == "ok" else "crit_error"] += 1
    counts["cases"] = args.cases
    counts["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps({"counts": counts, "problems": problems[:20]}, indent=1))
    bad = counts["crash"] + counts["hang"] + counts["left_behind"] + counts["wrong_restore"]
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--no-verify", action="store_true",
                    help="restore without the checksum check (to exercise the image checks)")
    args = ap.parse_args()
    if os.environ.get(SANDBOX_ENV) is None:
        enter_sandbox(sys.argv[1:])
    sys.exit(fuzz(args))


if __name__ == "__main__":
    main()
