# Multi-threaded processes through the real CLI: every thread comes back with its TID,
# its counter continuing from the dumped value, and its own state (name, TLS, signal
# mask, alternate stack, nice, robust list), whether it was spinning, waiting on a
# futex, blocked in read(2) or sleeping when the tree was frozen.
import os
import signal
import time

def ticks(task):
    return [tuple(int(x) for x in m.group(1).split()) for m in task.log.matches(rf"tick {task.pid} (.*)")]

def test_eight_threads_continue_with_their_tids_and_state(h):
    task = h.start("threads", ready=r"tids .*")
    tids = [int(x) for x in task.log.lines()[0].split()[2:]]
    assert len(set(tids)) == 8
    task.log.wait(rf"tick {task.pid} .*", count=3)
    # a signal pending on one thread only (thread 3 blocks SIGRTMIN+3): it must wait there
    rtmin = signal.SIGRTMIN
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(234, task.pid, tids[3], rtmin + 3) == 0      # tgkill
    pending = lambda tid: int(open(f"/proc/{task.pid}/task/{tid}/status").read()  # noqa: E731
                              .split("SigPnd:")[1].split()[0], 16)
    assert pending(tids[3]) == 1 << (rtmin + 3 - 1)
    restored = h.checkpoint_restore(task)
    assert pending(tids[3]) == 1 << (rtmin + 3 - 1) and pending(tids[2]) == 0
    before = ticks(task)[-1]
    assert sorted(int(t) for t in os.listdir(f"/proc/{task.pid}/task")) == sorted([task.pid] + tids)
    n = len(ticks(task))
    task.log.wait(rf"tick {task.pid} .*", count=n + 3)
    after = ticks(task)
    # memory continued: no counter went back; every thread runs again
    assert all(a >= b for a, b in zip(after[n], before)), (before, after[n])
    assert all(c > b for c, b in zip(after[-1], after[n])), (after[n], after[-1])
    restored.signal(signal.SIGUSR1)
    line = task.log.wait(rf"(OK|BAD) {task.pid}.*", timeout=10).group(0)
    assert line == f"OK {task.pid}", line


def test_cpython_threads_and_queue_keep_working(h):
    task = h.start("pythreads", 100000, python=True, ready=r"ready \d+ [0-9a-f]{32}")
    tids = [int(x) for x in task.log.matches(rf"tids {task.pid} (.*)")[0].group(1).split()]
    want = task.log.matches(rf"ready {task.pid} (\w+)")[0].group(1)
    task.log.wait(rf"tick {task.pid} .*", count=3)
    restored = h.checkpoint_restore(task)
    assert set(tids) <= {int(t) for t in os.listdir(f"/proc/{task.pid}/task")}
    before = [int(x) for x in task.log.matches(rf"tick {task.pid} (.*)")[-1].group(1).split()]
    n = len(task.log.matches(rf"tick {task.pid} .*"))
    task.log.wait(rf"tick {task.pid} .*", count=n + 4)
    after = [int(x) for x in task.log.matches(rf"tick {task.pid} (.*)")[-1].group(1).split()]
    assert after[0] > before[0] and all(a > b for a, b in zip(after[1:], before[1:])), (before, after)
    restored.signal(signal.SIGUSR1)
    assert task.log.wait(rf"state {task.pid} (\w+)").group(1) == want
