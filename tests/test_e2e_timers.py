# End-to-end: POSIX timers (tests/workloads/timers.c: ids from 1, a process-directed one
# with a sigev_value, one directed at a worker thread, two SIGEV_NONE one-shots on
# CLOCK_REALTIME and CLOCK_BOOTTIME) and the interval timers (REAL periodic, VIRTUAL and
# PROF far away). After restore the ids are the same, the periodic ones keep firing with
# their signal and value (to the same thread), and the one-shots and itimers have the
# time that was left at the dump (time spent dumped does not count, as in CRIU).
import re
import signal
import time

from conftest import wait_for

CHECK = r"check {pid} t3=(-?\d+) t4=(-?\d+) virt=(\d+) prof=(\d+) ids=(\S*)"


def check(task):
    n = len(task.log.matches(CHECK.format(pid=task.pid)))
    task.signal(signal.SIGUSR1)
    m = task.log.wait(CHECK.format(pid=task.pid), count=n + 1)
    return [int(x) for x in m.groups()[:4]] + [m.group(5)]


def timer_lines(pid):
    with open(f"/proc/{pid}/timers") as f:
        return sorted(f.read().strip().split("ID:")[1:])


def test_posix_timers_and_itimers(h):
    task = h.start("timers", ready=r"ready \d+ \d+")
    pid = task.pid
    wtid = int(task.log.matches(r"ready \d+ (\d+)")[0].group(1))
    task.log.wait(rf"rt {pid} \d+ abc", count=2)
    task.log.wait(rf"thread {wtid} \d+", count=2)
    task.log.wait(rf"alrm {pid} \d+", count=1)
    t3, t4, virt, prof, ids = check(task)
    assert ids == "1,2,3,4,", ids
    proc_timers = timer_lines(pid)
    images = h.dump(task)
    t_dump = time.monotonic()
    time.sleep(2)
    restored = h.restore(images, task=task)
    assert timer_lines(pid) == proc_timers, "ids, signals, values or targets changed"
    n_rt = len(task.log.matches(rf"rt {pid} .*"))
    n_th = len(task.log.matches(rf"thread {wtid} .*"))
    n_al = len(task.log.matches(rf"alrm {pid} .*"))
    task.log.wait(rf"rt {pid} \d+ abc", count=n_rt + 2)
    task.log.wait(rf"thread {wtid} \d+", count=n_th + 2)
    task.log.wait(rf"alrm {pid} \d+", count=n_al + 2)
    a3, a4, avirt, aprof, aids = check(task)
    assert aids == ids
    since = int((time.monotonic() - t_dump) * 1000)
    # time left: as at the dump, minus what ran since the restore (< since - 2000)
    for before, after in ((t3, a3), (t4, a4)):
        assert before - since - 1000 <= after <= before + 100, (before, after, since)
        assert after > before - since + 1500, "the time spent dumped was counted"
    # CPU-time itimers: whole seconds left, the same or one less; or one more when the
    # value was within a tick of a whole second, since the kernel adds one tick to every
    # setitimer() (the program's own included), and the restore sets it again
    assert avirt in (virt, virt - 1, virt + 1) and aprof in (prof, prof - 1, prof + 1), \
        (virt, prof, avirt, aprof)
    assert restored.running()
