# Shared fixtures of the end-to-end tests: build the workloads, start them the way a
# user would (own session, no terminal), run the real criu-py CLI on them, wait for
# what they log, and clean up every process, file and directory a test made - restored
# tasks included, which are not pytest's children until the kernel reparents them to
# us (pytest is made a child subreaper for that).
#
# `pytest --no-cr` (or CRIU_PY_TEST_NO_CR=1) runs every end-to-end test with dump and
# restore replaced by no-ops: the workloads and the checks then run against the
# original process, which validates the harness independently of the tool. Tests that
# can only mean something with the tool (error paths) are skipped in that mode only.
import ctypes
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workloads"))
from wl_build import HAS_AVX512, build_workloads  # noqa: E402,F401  (tests/workloads/wl_build.py; HAS_AVX512 re-exported)

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = REPO / "tests" / "workloads"
FIXTURES = REPO / "tests" / "fixtures" / "criu-4.2"       # copied from shared/fixtures
CRIT = "/usr/bin/crit"
PR_SET_CHILD_SUBREAPER = 36
CLI_TIMEOUT = 120


def pytest_addoption(parser):
    parser.addoption("--no-cr", action="store_true", default=False,
                     help="Replace dump/restore by no-ops to validate workloads and checks.")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_tool: meaningless without a real dump/restore "
                                       "(skipped under --no-cr only)")
    # Restored tasks (restore -d) are reparented to the nearest subreaper: make that us,
    # so they can be reaped and killed like our own children.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def no_cr_mode(config) -> bool:
    return config.getoption("--no-cr") or os.environ.get("CRIU_PY_TEST_NO_CR") == "1"


def pytest_collection_modifyitems(config, items):
    if not no_cr_mode(config):
        return
    skip = pytest.mark.skip(reason="needs the real dump/restore (--no-cr)")
    for item in items:
        if "needs_tool" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # Last resort: reap whatever child is left (restored tasks adopted by us that a
    # test did not wait for). Every Popen has been waited for by now.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break


# ---------------------------------------------------------------------------- waiting

@pytest.fixture
def sleeping_child():
    """`sleep 60` in its own session, once exec is done and it sleeps; killed after."""
    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    wait_for(lambda: (proc_status(p.pid) or {}).get("State", "").startswith("S")
             and Path(f"/proc/{p.pid}/comm").read_text().strip() == "sleep",
             timeout=5, what="sleep to sleep", interval=0.002)
    yield p
    p.kill()
    p.wait()


def wait_for(cond, timeout: float = 10.0, what: str = "condition", interval: float = 0.01):
    """Poll cond() until it returns something truthy; return that, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- /proc

def proc_status(pid: int) -> dict | None:
    """Fields of /proc/PID/status, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/status", errors="surrogateescape") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def proc_is_running(pid: int) -> bool:
    """Exists and is not a zombie (or dead)."""
    status = proc_status(pid)
    return status is not None and status.get("State", "")[:1] not in ("Z", "X")


def fd_table(pid: int) -> dict:
    """{fd: what it points to}, pipe/socket/anon inode numbers dropped (a restore makes
    new pipes), plus the position and flags from /proc/PID/fdinfo."""
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{name}")
        target = re.sub(r"^(pipe|socket|anon_inode):\[?\d*\]?.*", r"\1", target)
        with open(f"/proc/{pid}/fdinfo/{name}") as f:
            info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        flags = info["flags"].strip()
        pos = "append" if int(flags, 8) & os.O_APPEND else info["pos"].strip()  # moves as it logs
        table[int(name)] = (target, pos, flags)
    return table


def maps_layout(pid: int) -> list:
    """/proc/PID/maps as (start, end, perms, offset, path): what a restore must rebuild at
    the same addresses; device and inode are left out (shared memory gets new ones)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            offset = int(parts[2], 16)
            prev = out[-1] if out else None
            # the kernel keeps a file mapping split where pages were copied on write
            # (RELRO), and neighbouring anonymous areas of different origin apart;
            # mapped afresh they merge (under upstream CRIU too). Compare them merged.
            same_file = path.startswith("/") and prev and prev[3] + (prev[1] - prev[0]) == offset
            if (prev and prev[1] == start and prev[2] == parts[1] and prev[4] == path
                    and (same_file or path == "")):
                out[-1] = (prev[0], end, prev[2], prev[3], path)
                continue
            out.append((start, end, parts[1], offset, path))
    return [(f"{a:x}-{b:x}", perms, f"{off:x}", path) for a, b, perms, off, path in out]


def descendants(pid: int) -> list[int]:
    """Every process below pid (children of every thread, recursively)."""
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


def dumped_pids(images: Path) -> list[int]:
    """The processes pstree.img lists."""
    from criu_py.images import ImageDir
    with ImageDir(images) as d:
        return [e.pid for e in d.read_entries("pstree.img")]


def reap_gone(pids: list[int], timeout: float = 10.0) -> None:
    """After a dump killed a tree: its processes come to us (the subreaper) as zombies
    once their parents are gone; reap them so their PIDs are free for the restore."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    left.discard(pid)
                    continue
            except ChildProcessError:
                pass
            if not os.path.exists(f"/proc/{pid}"):
                left.discard(pid)
        if left and time.monotonic() > deadline:
            raise AssertionError(f"processes {sorted(left)} of the dumped tree did not go away")
        time.sleep(0.005)


def tracking_holders(under: Path) -> list[int]:
    """Live criu-py-track processes (memory tracking holders, criu_py/track/holder.py)
    keeping the state of an images dir below `under`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        cmd = proc_cmdline(int(name))
        if "criu_py.track.holder" in cmd and str(under) in cmd and proc_is_running(int(name)):
            out.append(int(name))
    return out


def stop_tracking_holders(under: Path) -> None:
    """End the holders a test started (they would end with their tasks anyway)."""
    pids = tracking_holders(under)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reap_gone(pids, timeout=5)


def layout_diff(before: list, after: list) -> str:
    return (f"lost: {[m for m in before if m not in after]}; "
            f"new: {[m for m in after if m not in before]}")


def signal_state(pid: int) -> dict:
    status = proc_status(pid)
    return {k: status[k] for k in ("SigBlk", "SigIgn", "SigCgt", "Umask")}


def task_identity(pid: int) -> dict:
    """What /proc shows of who a task is, beyond its PID: session, process group and
    terminal, nice, the mm fields of /proc/PID/stat (code, data, brk start, stack, args,
    env), auxv, comm, personality, exe, cwd, root, cmdline, environ, rlimits, ids. A
    restore must set every one of them back."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    stat = lambda n: int(fields[n - 3])  # noqa: E731 - field n (1-based) of proc(5)
    names = {5: "pgrp", 6: "session", 7: "tty_nr", 19: "nice", 26: "start_code", 27: "end_code",
             28: "start_stack", 45: "start_data", 46: "end_data", 47: "start_brk",
             48: "arg_start", 49: "arg_end", 50: "env_start", 51: "env_end"}
    out = {name: hex(stat(n)) for n, name in names.items()}
    for name in ("auxv", "comm", "personality", "cmdline", "environ", "limits"):
        with open(f"/proc/{pid}/{name}", "rb") as f:
            out[name] = f.read()
    for name in ("exe", "cwd", "root"):
        out[name] = os.readlink(f"/proc/{pid}/{name}")
    status = proc_status(pid)
    for name in ("Uid", "Gid", "Groups", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp"):
        out[name] = status.get(name)
    return out


def rseq_config(pid: int) -> tuple:
    """(rseq area address, size, signature, flags) of a running task, read with
    PTRACE_GET_RSEQ_CONFIGURATION from a short PTRACE_SEIZE + PTRACE_INTERRUPT."""
    PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, PTRACE_GET_RSEQ_CONFIGURATION = \
        0x4206, 0x4207, 17, 0x420F
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    conf = (ctypes.c_uint8 * 24)()
    if libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"PTRACE_SEIZE {pid}")
    try:
        if libc.ptrace(PTRACE_INTERRUPT, pid, None, None) != 0:
            raise OSError(ctypes.get_errno(), "PTRACE_INTERRUPT")
        os.waitpid(pid, 0x40000000)  # __WALL: the ptrace stop
        n = libc.ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, ctypes.c_void_p(24), ctypes.byref(conf))
        if n <= 0:
            raise OSError(ctypes.get_errno(), "PTRACE_GET_RSEQ_CONFIGURATION")
    finally:
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    return struct.unpack("<QIII", bytes(conf)[:20])


# ---------------------------------------------------------------------------- logs

class Log:
    """A workload's log file: lines, and waiting for a line matching a regex."""

    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        # a line is complete once its newline is there (workloads write whole lines)
        return text.split("\n")[:-1]

    def matches(self, pattern: str) -> list[re.Match]:
        rx = re.compile(pattern)
        return [m for m in (rx.fullmatch(line) for line in self.lines()) if m]

    def wait(self, pattern: str, timeout: float = 10.0, count: int = 1) -> re.Match:
        """Wait until `count` lines match; return the last matching line's match."""
        found = wait_for(lambda: (lambda ms: ms if len(ms) >= count else None)(self.matches(pattern)),
                         timeout, f"{count} line(s) matching {pattern!r} in {self.path.name}"
                                  f" (tail: {self.lines()[-3:]})")
        return found[count - 1]

    def __len__(self):
        return len(self.lines())


# ---------------------------------------------------------------------------- tasks

class Task:
    """A workload process: started by us (popen) or restored (adopted via subreaper).
    `marker` is a string of its command line, checked before any signal is sent, so a
    recycled PID is never killed by mistake."""

    def __init__(self, pid: int, marker: str, log: Log | None, popen=None):
        self.pid = pid
        self.marker = marker
        self.log = log
        self.popen = popen
        self.exit_status = None

    def is_ours(self) -> bool:
        return self.marker in proc_cmdline(self.pid)

    def running(self) -> bool:
        return proc_is_running(self.pid) and self.is_ours()

    def status(self) -> dict | None:
        return proc_status(self.pid)

    def signal(self, sig: int) -> None:
        assert self.running(), f"task {self.pid} is not running"
        os.kill(self.pid, sig)

    def reap(self, timeout: float = 10.0) -> int | None:
        """Wait for the task to end and collect its status (a child or an adopted one)."""
        if self.popen is not None and self.popen.returncode is None:
            self.exit_status = self.popen.wait(timeout)
            return self.exit_status
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not our child: wait for it to vanish
                if not proc_is_running(self.pid) or not self.is_ours():
                    return self.exit_status
                pid, status = 0, 0
            if pid:
                self.exit_status = os.waitstatus_to_exitcode(status)
                return self.exit_status
            if time.monotonic() > deadline:
                raise AssertionError(f"task {self.pid} did not end within {timeout} s")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL and reap, if still ours; never raises."""
        try:
            if self.running():
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            if self.popen is not None and self.popen.returncode is None:
                self.popen.kill()
            self.reap(timeout=10)
        except Exception:
            pass


# ---------------------------------------------------------------------------- harness

class Harness:
    """Everything one test needs: a private temp dir, workload start-up, the CLI."""

    def __init__(self, bins: dict, no_cr: bool, name: str):
        self.bins = bins
        self.no_cr = no_cr
        self.dir = Path(tempfile.mkdtemp(prefix=f"criu-py-{name[:40]}-"))
        self.tasks: list[Task] = []
        self.popens: list[subprocess.Popen] = []
        self._n = 0

    # -- workloads
    def start(self, workload: str, *args, log_name: str | None = None, ready: str | None = r"ready .*",
              python: bool | str = False, cwd: Path | None = None) -> Task:
        """Start a workload in its own session with stdio on /dev/null; its log path is
        its first argument. Waits for a line matching `ready` (None: do not wait).
        python=True runs tests/workloads/WORKLOAD.py with this venv's interpreter, a
        path runs it with that interpreter. cwd: its working directory (else the test's
        dir)."""
        self._n += 1
        log = Log(self.dir / (log_name or f"{workload}-{self._n}.log"))
        if python:
            interpreter = sys.executable if python is True else python
            argv = [interpreter, str(WORKLOADS / f"{workload}.py"), str(log.path), *map(str, args)]
        else:
            argv = [str(self.bins[workload]), str(log.path), *map(str, args)]
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True,
                                 close_fds=True, cwd=cwd or self.dir)
        task = Task(popen.pid, str(log.path), log, popen)
        self.tasks.append(task)
        if ready is not None:
            try:
                log.wait(ready, timeout=30)
            except AssertionError:
                popen.poll()
                raise AssertionError(f"{workload} did not get ready (exit {popen.returncode}); "
                                     f"log: {log.lines()[-5:]}")
        return task

    def path(self, name: str) -> Path:
        return self.dir / name

    def images_dir(self, name: str = "images", mode: int = 0o700) -> Path:
        """A fresh, empty images dir with `mode`. The tool leaves an existing dir's mode
        alone (it only makes a missing -D, 0700), warns once at -v2 when others may read
        it (so tests that count stderr lines use 0700), and writes every file in it 0600,
        the log file -o too. tests/test_e2e_modes.py covers 0755 and 1777 dirs."""
        path = self.dir / name
        path.mkdir(mode=mode, exist_ok=True)
        path.chmod(mode)
        return path

    # -- the CLI
    @staticmethod
    def cli_argv(*args) -> list[str]:
        script = Path(sys.executable).parent / "criu-py"
        base = [str(script)] if script.exists() else [sys.executable, "-m", "criu_py"]
        return base + [str(a) for a in args]

    def cli(self, *args, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """Run criu-py to completion (stdin /dev/null, output captured)."""
        return subprocess.run(self.cli_argv(*args), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, cwd=self.dir)

    def cli_background(self, *args) -> subprocess.Popen:
        p = subprocess.Popen(self.cli_argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=self.dir, start_new_session=True)
        self.popens.append(p)
        return p

    # -- checkpoint / restore through the real CLI
    def dump(self, task: Task, images: Path | None = None, *extra, leave_running: bool = False,
             log_file: str | None = "dump.log", verbosity: int = 4) -> Path:
        """`criu-py dump -t PID -D DIR`; asserts success, then reaps the killed task (its
        zombie holds the PID) unless --leave-running."""
        images = images or self.images_dir()
        if self.no_cr:
            return images
        args = ["dump", "-t", task.pid, "-D", images, f"-v{verbosity}", *extra]
        if log_file:
            args += ["-o", log_file]
        if leave_running:
            args.append("--leave-running")
        res = self.cli(*args)
        assert res.returncode == 0, (f"dump failed (exit {res.returncode}): {res.stderr.strip()}"
                                     f"{self._log_tail(images, log_file)}")
        if not leave_running:
            try:
                task.reap(timeout=10)
            except (AssertionError, subprocess.TimeoutExpired):
                raise AssertionError(f"dumped task {task.pid} still alive after dump: "
                                     f"{task.status()}")
            reap_gone(dumped_pids(images))
        return images

    def restore(self, images: Path, *extra, task: Task, log_file: str | None = "restore.log",
                verbosity: int = 4) -> Task:
        """`criu-py restore -D DIR -d --pidfile F`; asserts success and that the restored
        task has the original PID. Returns the restored Task (adopted by us)."""
        if self.no_cr:
            return task
        pidfile = images.parent / f"{images.name}.restored.pid"
        args = ["restore", "-D", images, "-d", "--pidfile", pidfile, f"-v{verbosity}", *extra]
        if log_file:
            args += ["-o", log_file]
        restored = Task(task.pid, task.marker, task.log)  # tracked before we know it worked
        self.tasks.append(restored)
        res = self.cli(*args)
        assert res.returncode == 0, (f"restore failed (exit {res.returncode}): {res.stderr.strip()}"
                                     f"{self._log_tail(images, log_file)}")
        assert pidfile.read_text().strip() == str(task.pid), "pidfile does not hold the original PID"
        assert restored.running(), f"restored task {task.pid} is not running: {restored.status()}"
        if log_file and verbosity >= 4:     # every task would import it for itself
            late = [x for x in (images / log_file).read_text(errors="replace").splitlines()
                    if "imported after the fork" in x]
            assert not late, late[0]
        return restored

    def checkpoint_restore(self, task: Task, images: Path | None = None, pause: float = 0.0) -> Task:
        """Dump (task gone), optionally wait, restore with the same PID."""
        images = self.dump(task, images)
        if not self.no_cr:
            assert not proc_is_running(task.pid), f"task {task.pid} still runs after dump"
        time.sleep(pause)
        return self.restore(images, task=task)

    @staticmethod
    def _log_tail(images: Path, log_file: str | None, n: int = 15) -> str:
        if not log_file:
            return ""
        try:
            lines = (images / log_file).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n--- " + log_file + " (tail) ---\n" + "\n".join(lines[-n:])

    # -- cleanup
    def cleanup(self) -> None:
        for task in reversed(self.tasks):
            ours = task.is_ours()
            if ours:            # stopped first: a parent that respawns its children (nginx's
                try:            # master) must not fork one between the two kills below
                    os.kill(task.pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            tree = descendants(task.pid) if ours else []
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            task.kill()
            try:
                reap_gone(tree, timeout=5)
            except AssertionError:
                pass
        stop_tracking_holders(self.dir)
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        left = self.kill_leftovers()
        shutil.rmtree(self.dir, ignore_errors=True)
        return left

    def kill_leftovers(self) -> list[str]:
        """Processes still alive whose command line names this test's dir (workloads
        get their log path there; restored ones keep it): killed, and returned so the
        test fails, since a test must clean up everything it started."""
        mark = os.fsencode(str(self.dir)) + b"/"
        left = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if mark in cmdline and proc_is_running(int(name)):
                try:
                    os.kill(int(name), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                shown = cmdline.replace(b"\0", b" ")[:120]
                left.append(f"{name} {shown!r}")
        try:
            reap_gone([int(x.split()[0]) for x in left], timeout=5)
        except AssertionError:
            pass            # not our children: gone once their parent reaps them
        return left


@pytest.fixture(scope="session")
def workload_bins():
    out = Path(tempfile.mkdtemp(prefix="criu-py-workloads-"))
    try:
        yield build_workloads(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def h(request, workload_bins):
    """The per-test harness (see Harness); cleans up even when the test fails."""
    harness = Harness(workload_bins, no_cr_mode(request.config), request.node.name)
    try:
        yield harness
    finally:
        left = harness.cleanup()
    assert not left, f"the test left processes behind (now killed): {left}"


def assert_one_line_error(res: subprocess.CompletedProcess, *must_contain: str) -> str:
    """The CLI's error contract: non-zero exit, exactly one stderr line "Error: ...", no
    traceback; the line contains each of `must_contain` (case-insensitive)."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0, f"expected failure, got exit 0 (stderr: {res.stderr!r})"
    assert "Traceback" not in res.stderr, f"traceback on stderr:\n{res.stderr}"
    assert len(lines) == 1 and lines[0].startswith("Error:"), \
        f"expected one 'Error:' line on stderr, got {lines!r}"
    for word in must_contain:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    return lines[0]


def assert_running_untraced(task: Task) -> None:
    """After a failed dump: alive, not stopped, not traced."""
    def settled():
        st = task.status()
        return st if st and st["TracerPid"] == "0" and st["State"][:1] not in "TtZX" else None
    try:
        wait_for(settled, timeout=2, what=f"task {task.pid} running untraced")
    except AssertionError:
        raise AssertionError(f"task {task.pid} after failed dump: {task.status()}")


def image_files(images: Path) -> list[Path]:
    return sorted(p for p in images.iterdir() if p.is_file())


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
