# End-to-end: CPU and kernel-side state of a task at the instant of the dump - vector
# registers (zmm0-31 and k1-7 on AVX-512 machines, ymm0-15 otherwise) and callee-saved
# GPRs held by an asm loop, a read(2) blocked on an empty pipe, and sleeps that must
# keep their schedule.
import os
import signal
import time

from conftest import HAS_AVX512, wait_for


def test_vector_registers_survive(h):
    task = h.start("vecregs", ready=r"ready \d+ [yz]mm")
    assert task.log.lines()[0].endswith("zmm" if HAS_AVX512 else "ymm")
    time.sleep(0.2)  # well inside the register-holding loop
    restored = h.checkpoint_restore(task)
    time.sleep(0.1)
    restored.signal(signal.SIGUSR1)
    line = task.log.wait(r"(OK|BAD) .*", timeout=20).group(0)
    assert line.startswith(f"OK {task.pid} iterations "), line
    assert restored.reap(timeout=20) in (0, None)


def test_vecregs_workload_self_check(h):
    # The workload alone (no dump): stopped at once, it must compare and report OK;
    # a BAD line here would mean the workload itself is broken, not the tool.
    task = h.start("vecregs", ready=r"ready \d+ [yz]mm")
    task.signal(signal.SIGUSR1)
    assert task.reap(timeout=10) == 0
    assert task.log.lines()[-1].startswith(f"OK {task.pid} iterations ")


def test_blocking_read_on_pipe_resumes(h):
    task = h.start("blocker", "read", ready=r"ready \d+ \d+ \d+")
    _, _, rfd, wfd = task.log.lines()[0].split()

    def send(text):
        # open the task's own write end through /proc: the same pipe, from outside
        fd = os.open(f"/proc/{task.pid}/fd/{wfd}", os.O_WRONLY)
        try:
            os.write(fd, text.encode() + b"\n")
        finally:
            os.close(fd)

    send("before-dump")
    task.log.wait(rf"got {task.pid} before-dump")
    blocked = lambda: task.status()["State"].startswith("S")  # noqa: E731 - sleeping in read
    wait_for(blocked, 5, "the task blocked in read again")
    restored = h.checkpoint_restore(task)
    time.sleep(0.1)
    wait_for(blocked, 5, "the restored task blocked in read")
    send("after-restore")
    task.log.wait(rf"got {task.pid} after-restore")
    send("second")
    task.log.wait(rf"got {task.pid} second")
    assert not task.log.matches(r"readerr .*"), task.log.lines()


def ticks(task):
    """[(pid, n, deadline_ns, woke_ns)] from the blocker's sleep modes."""
    return [tuple(int(x) for x in m.groups())
            for m in task.log.matches(r"tick (\d+) (\d+) (\d+) (\d+)")]


def test_absolute_clock_nanosleep_keeps_its_schedule(h):
    period_ms = 400
    task = h.start("blocker", "sleep-abs", period_ms)
    task.log.wait(r"tick \d+ 2 .*", timeout=10)
    time.sleep(0.15)  # dump in the middle of a sleep
    restored = h.checkpoint_restore(task)
    restored_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    n_before = len(ticks(task))
    task.log.wait(r"tick .*", count=n_before + 3, timeout=10)
    rows = ticks(task)
    assert {r[0] for r in rows} == {task.pid}
    assert [r[1] for r in rows] == list(range(1, len(rows) + 1)), "ticks are not consecutive"
    for pid, n, deadline, woke in rows:
        assert woke >= deadline, f"tick {n} woke {(deadline - woke) / 1e6:.1f} ms early"
    # on the grid: every tick whose deadline lies after the restore wakes close to it
    later = [r for r in rows if r[2] > restored_at + 50_000_000]
    assert later, rows
    for pid, n, deadline, woke in later:
        assert woke - deadline < 200_000_000, f"tick {n} is {(woke - deadline) / 1e6:.0f} ms late"
    assert restored.running()


def test_relative_nanosleep_continues(h):
    task = h.start("blocker", "sleep-rel", 100)
    task.log.wait(r"tick \d+ 3 .*", timeout=10)
    time.sleep(0.05)
    restored = h.checkpoint_restore(task)
    n_before = len(ticks(task))
    task.log.wait(r"tick .*", count=n_before + 3, timeout=10)
    rows = ticks(task)
    assert {r[0] for r in rows} == {task.pid}
    assert [r[1] for r in rows] == list(range(1, len(rows) + 1))
    assert restored.running()


def test_task_caught_in_user_code_resumes_mid_loop(h):
    task = h.start("spinner")
    task.log.wait(r"tick \d+ 20 ok")
    wait_for(lambda: task.status()["State"].startswith("R"), 5, "the spinner running user code")
    h.checkpoint_restore(task)
    n = len(task.log.matches(r"tick .*"))
    task.log.wait(r"tick .*", count=n + 20)
    lines = task.log.lines()[1:]
    assert not [ln for ln in lines if not ln.endswith(" ok")], [ln for ln in lines if "BAD" in ln][:3]
    ticks = [(int(p), int(k)) for p, k in (ln.split()[1:3] for ln in lines)]
    assert {p for p, _ in ticks} == {task.pid}
    assert [k for _, k in ticks] == list(range(1, len(ticks) + 1)), "the loop restarted or skipped"
