# End-to-end: tasks a dump cannot stop or run. A task frozen by a v1 cgroup freezer
# sleeps in __refrigerator and never stops for PTRACE_INTERRUPT: the dump gives up after
# --timeout (CRIU's option, default 10 s). One frozen by cgroup2's cgroup.freeze stops,
# but would never run the code a dump injects: it is refused at once. A signal to the
# dump cuts a stuck freeze short as well. Each failure is one line naming the task and
# the cgroup, no image is written, and once thawed every task runs on, untraced.
import os
import signal
import time

import pytest

from conftest import Task, assert_one_line_error, assert_running_untraced, image_files, wait_for
from test_e2e_tree import last_ticks, tree_of

pytestmark = pytest.mark.needs_tool
V1 = "/sys/fs/cgroup/freezer"


def v2_root() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2" and left.split()[3] == "/":
                return left.split()[4]
    return None


def own_cgroup(pid: int, hierarchy: str) -> str:
    """The task's cgroup path on the v1 hierarchy named `hierarchy` ('' for cgroup2)."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if names == hierarchy or hierarchy in names.split(","):
                return path
    raise AssertionError(f"pid {pid} is on no {hierarchy or 'cgroup2'} hierarchy")


class Freezer:
    """A cgroup of our own that freezes the tasks put in it; gives them back thawed to
    the cgroups they came from and removes itself at the end of the test."""

    def __init__(self, kind: str, name: str):
        root = V1 if kind == "v1" else v2_root()
        if root is None or not os.path.isdir(root) or \
                (kind == "v1" and not os.path.exists(f"{V1}/freezer.state") and
                 not os.path.exists(f"{V1}/tasks")):
            pytest.skip(f"no {kind} freezer hierarchy mounted here")
        self.kind, self.root = kind, root
        self.path = f"{root}/{name}"
        os.mkdir(self.path)
        self.members = {}                   # pid -> its cgroup before

    def _write(self, name: str, value: str, where: str | None = None) -> None:
        with open(os.path.join(where or self.path, name), "w") as f:
            f.write(value)

    def freeze(self, *pids: int) -> None:
        procs = "tasks" if self.kind == "v1" else "cgroup.procs"
        for pid in pids:
            self.members[pid] = own_cgroup(pid, "freezer" if self.kind == "v1" else "")
            self._write(procs, str(pid))
        if self.kind == "v1":
            self._write("freezer.state", "FROZEN")
            wait_for(lambda: open(f"{self.path}/freezer.state").read().strip() == "FROZEN",
                     timeout=5, what="the v1 freezer to freeze")
        else:
            self._write("cgroup.freeze", "1")
            wait_for(lambda: "frozen 1" in open(f"{self.path}/cgroup.events").read(),
                     timeout=5, what="cgroup2 to freeze")

    def thaw(self) -> None:
        if self.kind == "v1":
            self._write("freezer.state", "THAWED")
        else:
            self._write("cgroup.freeze", "0")

    def close(self) -> None:
        self.thaw()
        procs = "tasks" if self.kind == "v1" else "cgroup.procs"
        for pid, path in self.members.items():
            try:
                self._write(procs, str(pid), where=self.root + path)
            except OSError:
                pass                          # gone already
        wait_for(lambda: _rmdir(self.path), timeout=5, what=f"{self.path} to go")


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def freezer(h):
    made = []

    def make(kind: str) -> Freezer:
        f = Freezer(kind, f"criu-py-test-{os.getpid()}-{len(made)}")
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def no_images(images) -> bool:
    return [p.name for p in image_files(images) if not p.name.endswith(".log")] == []


def assert_counts_on(task) -> None:
    last = int(task.log.lines()[-1].split()[1])
    task.log.wait(rf"{task.pid} {last + 3}")


def assert_left_as_it_was(task, freezer: Freezer, images) -> None:
    """No image was written; once thawed, the task runs untraced and counts on."""
    assert no_images(images)
    freezer.thaw()
    assert_running_untraced(task)
    assert_counts_on(task)


def test_v1_frozen_task_fails_after_the_timeout(h, freezer):
    task = h.start("counter", ready=r"\d+ 5")
    f = freezer("v1")
    f.freeze(task.pid)
    images = h.images_dir()
    started = time.monotonic()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--timeout", "1", "-o", "dump.log", "-v4")
    took = time.monotonic() - started
    assert_one_line_error(res, f"pid {task.pid} did not stop within 1 s", "freezer:/criu-py-test")
    assert took < 6, took
    assert_left_as_it_was(task, f, images)


def test_v1_frozen_member_of_a_tree(h, freezer):
    """Only one process of the forest is frozen: the others were stopped, and are let go."""
    task = h.start("forest", ready=r"ready \d+")
    before = tree_of(task.pid)
    member = max(p for p, v in before.items() if v[3] != "Z")
    f = freezer("v1")
    f.freeze(member)
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), "--timeout", "1")
    assert_one_line_error(res, f"pid {member} did not stop")
    f.thaw()
    live = [p for p, v in before.items() if v[3] != "Z"]
    for p in live:
        assert_running_untraced(Task(p, task.marker, None))
    at = last_ticks(task.log)
    wait_for(lambda: all(last_ticks(task.log).get(p, 0) > at.get(p, 0) + 1 for p in live),
             timeout=10, what="every process to tick on")


def test_cgroup2_frozen_task_is_refused_at_once(h, freezer):
    task = h.start("counter", ready=r"\d+ 5")
    f = freezer("v2")
    f.freeze(task.pid)
    images = h.images_dir()
    started = time.monotonic()
    res = h.cli("dump", "-t", task.pid, "-D", images, "-o", "dump.log", "-v4")
    assert_one_line_error(res, f"pid {task.pid} is in the frozen cgroup unified:/criu-py-test")
    assert time.monotonic() - started < 5
    assert_left_as_it_was(task, f, images)


def test_a_signal_cuts_a_stuck_freeze_short(h, freezer):
    """--timeout 0 waits for ever, as CRIU's: SIGTERM still ends the dump, in one line."""
    task = h.start("counter", ready=r"\d+ 5")
    f = freezer("v1")
    f.freeze(task.pid)
    images = h.images_dir()
    p = h.cli_background("dump", "-t", task.pid, "-D", images, "--timeout", "0", "-o",
                         "dump.log", "-v4")
    wait_for(lambda: "freeze the tree" in (images / "dump.log").read_text()
             if (images / "dump.log").exists() else False, timeout=10, what="the freeze")
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 128 + signal.SIGTERM
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted by SIGTERM"), lines
    assert_left_as_it_was(task, f, images)


def test_negative_timeout_is_refused(h):
    task = h.start("counter", ready=r"\d+ 5")
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), "--timeout", "-1")
    assert_one_line_error(res, "--timeout")
    assert_running_untraced(task)
