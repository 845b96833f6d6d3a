# End-to-end: event fds as event loops hold them (tests/workloads/events.c): nested
# epolls whose targets are an eventfd added under an fd number since closed (reused by
# another file meanwhile), a pipe, a periodic timerfd and a signalfd; a semaphore
# eventfd; timerfds on CLOCK_BOOTTIME_ALARM and ABSTIME CLOCK_REALTIME; an eventfd
# inherited by a forked child and an epoll in a CLONE_FILES child. After restore the
# kernel shows the same state and the programs behave as before: every write to a
# target wakes the epoll with the dumped data, the timer ticks on schedule, the
# semaphore still counts 5, the fired timer's tick is still unread, the long timers have
# the time that was left (the time spent dumped does not count, as in CRIU).
# Also CPython's asyncio event loop, dumped while it sleeps, keeps its schedule.
import ctypes
import os
import signal
import struct
import sys
import time

from conftest import descendants, wait_for

LIBC = ctypes.CDLL(None, use_errno=True)


def steal_fd(pid: int, fd: int) -> int:
    """A duplicate of another process's fd (pidfd_getfd): anon inodes cannot be reopened
    through /proc."""
    pidfd = os.pidfd_open(pid)
    try:
        fd = LIBC.syscall(438, pidfd, fd, 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd {pid} {fd}")
        return fd
    finally:
        os.close(pidfd)


def poke(pid: int, fd: int, value: int) -> None:
    f = steal_fd(pid, fd)
    try:
        os.write(f, struct.pack("<Q", value))
    finally:
        os.close(f)


def fdinfo(pid: int, fd: int) -> dict:
    out = {"tfd": []}
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "tfd":
                # the tfd number, events and data; the pipe's inode is new after restore
                words = line.split()
                out["tfd"].append((int(words[1]), words[3], words[5]))
            elif key not in ("ino", "mnt_id", "pos", "eventfd-id"):
                out[key.strip()] = value.strip()
    out["tfd"].sort()
    return out


def ms_left(pid: int, fd: int) -> int:
    sec, nsec = (int(x) for x in fdinfo(pid, fd)["it_value"].strip("()").split(","))
    return sec * 1000 + nsec // 1_000_000


def ticks_after(task, since: int) -> list:
    return [int(m.group(2)) for m in task.log.matches(rf"tick {task.pid} (\d+) (\d+)")][since:]


def test_event_fds_come_back_and_work(h):
    task = h.start("events", ready=r"ready .*")
    fds = dict(kv.split("=") for kv in task.log.matches(r"ready .*")[0].group(0).split()[2:])
    fds = {k: int(v) for k, v in fds.items()}
    pid, child, cf = task.pid, fds["child"], fds["cf"]
    task.log.wait(rf"tick {pid} .*", count=3)
    names = ("sem", "efd", "tick", "fired", "alarm", "abs", "sfd", "inner", "outer")
    before = {n: fdinfo(pid, fds[n]) for n in names}
    assert before["inner"]["tfd"] == sorted([(fds["sfd"], "19", "5f"), (fds["tick"], "19", "71"),
                                             (fds["efdclosed"], "19", "e1"),
                                             (fds["pipe"] - 1, "19", "91")])
    assert fds["efdclosed"] == fds["outer"], "the closed target's number is reused"
    family = sorted([pid] + descendants(pid))
    images = h.dump(task)
    n_ticks = len(ticks_after(task, 0))
    time.sleep(1.5)                     # dumped for a while: the timers must not count it
    t_restore = time.monotonic()
    restored = h.restore(images, task=task)
    assert sorted([pid] + descendants(pid)) == family
    after = {n: fdinfo(pid, fds[n]) for n in names}
    for n in names:
        b, a = dict(before[n]), dict(after[n])
        for key in ("it_value", "ticks"):          # timers run on
            b.pop(key, None)
            a.pop(key, None)
        assert a == b, (n, before[n], after[n])
    # time left: what was left at the dump, counted from the restore
    elapsed = int((time.monotonic() - t_restore) * 1000)
    for n in ("alarm", "abs"):
        sec, nsec = (int(x) for x in before[n]["it_value"].strip("()").split(","))
        left_before, left = sec * 1000 + nsec // 1_000_000, ms_left(pid, fds[n])
        assert left_before - 3000 - elapsed <= left <= left_before + 1000, (n, left_before, left)
    # the periodic timerfd goes on every 200 ms
    task.log.wait(rf"tick {pid} .*", count=n_ticks + 6, timeout=20)
    stamps = ticks_after(task, n_ticks)[:6]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert 120 <= sum(gaps) / len(gaps) <= 600, gaps
    # every target wakes the epolls, with the dumped data
    os.write(os.open(f"/proc/{pid}/fd/{fds['pipe']}", os.O_WRONLY | os.O_NONBLOCK), b"hello")
    task.log.wait(rf"pipe {pid} 91 hello")
    poke(pid, fds["efd"], 7)
    task.log.wait(rf"efd {pid} e1 7")
    poke(child, fds["childefd"], 3)
    task.log.wait(rf"child {child} 3")
    poke(cf, fds["cfefd"], 4)
    task.log.wait(rf"cfchild {cf} cf 4")
    restored.signal(signal.SIGUSR2)
    m = task.log.wait(rf"check {pid} 5f sig=12 sem=(\S+) fired=(\d+) alarm=(\d+) abs=(\d+)")
    assert m.group(1) == "1,1,1,1,1,EAGAIN", "the semaphore eventfd lost its count"
    assert m.group(2) == "1", "the fired timer's unread expiration is lost"


ASYNCIO_SRC = r"""
import asyncio, os, sys, time

log = open(sys.argv[1], "a", buffering=1)


async def main():
    loop = asyncio.get_running_loop()
    start = loop.time()
    n = 0
    def ping():
        log.write(f"ping {os.getpid()}\n")
    loop.add_signal_handler(10, ping)       # SIGUSR1 through the self-pipe
    log.write(f"ready {os.getpid()}\n")
    while True:
        n += 1
        await asyncio.sleep(start + n * 0.5 - loop.time())   # a fixed schedule
        log.write(f"beat {os.getpid()} {n} {loop.time() - start:.3f}\n")

asyncio.run(main())      # a plain loop: epoll, and its self-pipe is a unix socketpair
"""


def test_asyncio_loop_keeps_its_schedule(h, tmp_path):
    script = tmp_path / "aloop.py"
    script.write_text(ASYNCIO_SRC)
    import subprocess
    from conftest import Log, Task
    log = Log(h.path("aloop.log"))
    p = subprocess.Popen([sys.executable, str(script), str(log.path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, cwd=h.dir)
    task = Task(p.pid, str(log.path), log, p)
    h.tasks.append(task)
    log.wait(r"ready \d+", timeout=30)
    log.wait(rf"beat {p.pid} .*", count=3)
    kinds = {os.readlink(f"/proc/{p.pid}/fd/{fd}").split(":")[0]
             for fd in os.listdir(f"/proc/{p.pid}/fd")}
    assert "anon_inode" in kinds and "socket" in kinds, kinds   # epoll + the self-pipe
    time.sleep(0.2)                         # mid-sleep
    images = h.dump(task)
    n = len(log.matches(rf"beat {p.pid} .*"))
    time.sleep(1.0)
    restored = h.restore(images, task=task)
    log.wait(rf"beat {p.pid} .*", count=n + 6, timeout=20)
    beats = [(int(m.group(1)), float(m.group(2)))
             for m in log.matches(rf"beat {p.pid} (\d+) (\S+)")]
    assert [b for b, _ in beats] == list(range(1, len(beats) + 1)), "a beat was lost or repeated"
    # the sleep the loop was in ends at once (its deadline passed while it was dumped),
    # the beats it missed meanwhile follow, then every beat is on its schedule again
    # (start + n * 0.5 s of the loop's monotonic clock)
    late = [(b, t) for b, t in beats[-3:]]
    assert all(abs(t - b * 0.5) < 0.25 for b, t in late), late
    restored.signal(signal.SIGUSR1)         # the self-pipe wakes the loop
    log.wait(rf"ping {p.pid}")
