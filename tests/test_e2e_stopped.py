# End-to-end: stopped tasks. A process in a group stop (kill -STOP, a shell job's
# Ctrl-Z, which is SIGTSTP) is dumped as stopped (task_state 3 and its stop signal in
# core-PID.img, as CRIU writes it) and comes back stopped: it runs none of its code until
# a SIGCONT, and then goes on from where it was. Also: dump --leave-running leaves a
# stopped task stopped, dump --leave-stopped and restore --leave-stopped leave running
# ones stopped, a failed dump leaves a stopped task stopped and untraced, and a pre-dump
# of a stopped task is the parent of its dump.
import os
import signal
import time

import pytest

from conftest import Task, wait_for
from test_e2e_tree import last_ticks, tree_of

TASK_ALIVE, TASK_STOPPED = 1, 3


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


def stop(pid: int, sig: int = signal.SIGSTOP) -> None:
    os.kill(pid, sig)
    wait_for(lambda: state(pid) == "T", timeout=5, what=f"pid {pid} to stop")


def task_core(images, pid: int):
    from criu_py.images import ImageDir
    with ImageDir(images) as d:
        return d.read_one(f"core-{pid}.img").tc


def count(task) -> int:
    return int(task.log.lines()[-1].split()[1])


def lines_of(pid: int, log) -> list[str]:
    return [line for line in log.lines() if str(pid) in line.split()]


def assert_stays_stopped(pid: int, log, seconds: float = 0.5) -> None:
    """Stopped and untraced, and it logs nothing meanwhile."""
    assert state(pid) == "T" and tracer(pid) == 0, (state(pid), tracer(pid))
    n = len(lines_of(pid, log))
    time.sleep(seconds)
    assert state(pid) == "T" and len(lines_of(pid, log)) == n


def assert_goes_on(task, last: int) -> None:
    """After a SIGCONT the count goes on from `last`, by one, from the same PID."""
    os.kill(task.pid, signal.SIGCONT)
    task.log.wait(rf"{task.pid} {last + 3}")
    rows = [int(line.split()[1]) for line in task.log.lines()]
    assert rows == list(range(1, len(rows) + 1))


def test_stopped_process_comes_back_stopped(h):
    task = h.start("counter", ready=r"\d+ 5")
    stop(task.pid)
    last = count(task)
    images = h.dump(task)
    tc = task_core(images, task.pid)
    assert (tc.task_state, tc.stop_signo) == (TASK_STOPPED, signal.SIGSTOP)
    restored = h.restore(images, task=task)
    assert_stays_stopped(task.pid, task.log)
    assert count(task) == last
    assert_goes_on(task, last)
    assert restored.running() and state(task.pid) != "T"


def test_stopped_threads_come_back_stopped(h):
    task = h.start("threads", ready=r"tids .*")
    tids = [int(x) for x in task.log.lines()[0].split()[2:]]
    task.log.wait(rf"tick {task.pid} .*", count=3)
    stop(task.pid)           # (a SIGTSTP would be discarded: its group is orphaned)
    images = h.dump(task)
    tc = task_core(images, task.pid)
    assert (tc.task_state, tc.stop_signo) == (TASK_STOPPED, signal.SIGSTOP)
    restored = h.restore(images, task=task)
    assert all(state(t) == "T" for t in [task.pid] + tids)
    assert_stays_stopped(task.pid, task.log)
    os.kill(task.pid, signal.SIGCONT)
    n = len(task.log.matches(rf"tick {task.pid} .*"))
    task.log.wait(rf"tick {task.pid} .*", count=n + 3)
    restored.signal(signal.SIGUSR1)
    assert task.log.wait(rf"(OK|BAD) {task.pid}.*", timeout=10).group(0) == f"OK {task.pid}"


def test_tree_with_stopped_members(h):
    """The forest with one member stopped by SIGTSTP (a job's Ctrl-Z, in a group that is
    not orphaned) and one by SIGSTOP in the second session: the others run on after the
    restore, those two stay stopped until a SIGCONT, each with its count kept."""
    task = h.start("forest", ready=r"ready \d+")
    before = tree_of(task.pid)
    h.tasks += [Task(p, task.marker, None) for p in before if p != task.pid]
    root_sid = before[task.pid][2]
    a2_child = min(p for p, (pp, pg, sid, st) in before.items()
                   if sid == root_sid and pg not in (task.pid, p) and pp == pg and st != "Z")
    a3_child = min(p for p, (pp, pg, sid, st) in before.items()
                   if sid != root_sid and pp == sid and pg == sid and p != sid)
    stop(a2_child, signal.SIGTSTP)
    stop(a3_child, signal.SIGSTOP)
    before = tree_of(task.pid)
    images = h.dump(task)
    for pid, sig in ((a2_child, signal.SIGTSTP), (a3_child, signal.SIGSTOP)):
        tc = task_core(images, pid)
        assert (tc.task_state, tc.stop_signo) == (TASK_STOPPED, sig)
    assert task_core(images, task.pid).task_state == TASK_ALIVE
    h.restore(images, task=task)
    after = tree_of(task.pid)
    before[task.pid] = (after[task.pid][0],) + before[task.pid][1:]
    assert after == before
    at_dump = last_ticks(task.log)
    stopped = {a2_child, a3_child}
    live = [p for p, v in before.items() if v[3] != "Z" and p not in stopped]
    wait_for(lambda: all(last_ticks(task.log).get(p, 0) > at_dump[p] + 1 for p in live),
             timeout=10, what="every running process to tick twice more")
    assert all(last_ticks(task.log)[p] == at_dump[p] and state(p) == "T" for p in stopped)
    for p in stopped:
        os.kill(p, signal.SIGCONT)
    wait_for(lambda: all(last_ticks(task.log)[p] > at_dump[p] + 1 for p in stopped),
             timeout=10, what="the stopped ones to tick again after SIGCONT")


def test_leave_running_keeps_a_stopped_task_stopped(h):
    """dump --leave-running of a stopped task, after a pre-dump of it: it stays stopped
    and untraced; the incremental images restore it stopped."""
    task = h.start("counter", ready=r"\d+ 5")
    stop(task.pid)
    last = count(task)
    pre = h.images_dir("pre")
    res = h.cli("pre-dump", "-t", task.pid, "-D", pre, "--track-mem", "-o", "pre.log", "-v4")
    assert res.returncode == 0, res.stderr
    assert_stays_stopped(task.pid, task.log, seconds=0.1)
    images = h.dump(task, None, "--track-mem", "--prev-images-dir", "../pre", leave_running=True)
    assert_stays_stopped(task.pid, task.log)
    task.kill()
    h.restore(images, task=task)
    assert_stays_stopped(task.pid, task.log)
    assert_goes_on(task, last)


def test_dump_leave_stopped(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--leave-stopped", "-o", "dump.log", "-v4")
    assert res.returncode == 0, res.stderr
    assert_stays_stopped(task.pid, task.log)
    assert task_core(images, task.pid).task_state == TASK_ALIVE
    last = count(task)
    assert_goes_on(task, last)


def test_restore_leave_stopped(h):
    """restore -s: the task is stopped before it runs any of its code."""
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task)
    last = count(task)
    h.restore(images, "-s", task=task)
    assert_stays_stopped(task.pid, task.log)
    assert count(task) == last
    assert_goes_on(task, last)


@pytest.mark.parametrize("kind", ["socket", "grandchild"])
def test_failed_dump_leaves_a_stopped_task_stopped(h, kind):
    task = h.start("unsupported", kind, ready=r"ready \d+ -?\d+.*")
    stop(task.pid)
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), "-o", "dump.log", "-v4")
    assert res.returncode != 0
    assert_stays_stopped(task.pid, task.log)
    os.kill(task.pid, signal.SIGCONT)
    task.log.wait(rf"beat {task.pid} \d+", count=len(lines_of(task.pid, task.log)) + 3)
