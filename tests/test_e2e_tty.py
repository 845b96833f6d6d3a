# End-to-end: terminals. A pty pair inside the tree (tests/workloads/pty.c): the child's
# controlling terminal, its session and foreground group, echo off, the window size,
# packet mode on the master, a second pty left locked; after restore the child still
# gets its input and sees the same terminal. `script` running a bash loop in its pty
# goes on printing. --shell-job: a job of a shell on a terminal is restored onto the
# terminal of the restoring command, as CRIU does.
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import Log, Task, assert_one_line_error, descendants, wait_for

GOT = r"got {pid} ping (\d+) rows=(\d+) cols=(\d+) echo=(\d) fg=(\d)"


def tty_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return tuple(int(fields[i]) for i in (2, 3, 4, 5))     # pgrp, session, tty_nr, tpgid


def test_program_in_a_pty(h):
    task = h.start("pty", ready=r"ready \d+ \d+ \d+")
    pid, child, index = (int(x) for x in task.log.matches(r"ready (\d+) (\d+) (\d+)")[0].groups())
    task.log.wait(GOT.format(pid=child), count=2)
    before = {p: tty_of(p) for p in (pid, child)}
    assert before[child][2] == os.makedev(136, index) and before[child][3] == child
    images = h.dump(task)
    restored = h.restore(images, task=task)
    assert {p: tty_of(p) for p in (pid, child)} == before
    n = len(task.log.matches(GOT.format(pid=child)))
    m = task.log.wait(GOT.format(pid=child), count=n + 3)
    assert m.groups()[1:] == ("33", "111", "0", "1"), m.group(0)
    restored.signal(signal.SIGUSR1)
    task.log.wait(rf"pcheck {pid} pkt=1 locked=1")


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1)")
def test_script_with_a_bash_loop(h):
    out = h.path("script.out")
    cmd = ["script", "-qfc", 'bash -c "while :; do date +%s; sleep 1; done"', "/dev/null"]
    with open(out, "ab") as f:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                             start_new_session=True, close_fds=True, cwd=h.dir)
    task = Task(p.pid, "script -qfc", Log(out), p)
    h.tasks.append(task)
    task.log.wait(r"\d+\r?", count=2)
    family = sorted([p.pid] + descendants(p.pid))
    ttys = {q: tty_of(q) for q in family}
    images = h.dump(task)
    time.sleep(1)
    restored = h.restore(images, task=task)
    assert sorted([p.pid] + descendants(p.pid)) == family
    assert {q: tty_of(q) for q in family} == ttys
    n = len(task.log.lines())
    task.log.wait(r"\d+\r?", count=n + 3, timeout=15)
    stamps = [int(line.strip()) for line in task.log.lines() if line.strip().isdigit()]
    assert stamps[-1] - stamps[n - 1] >= 2 and stamps == sorted(stamps)
    assert restored.running()
