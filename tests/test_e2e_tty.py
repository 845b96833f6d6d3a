# End-to-end: terminals. A pty pair inside the tree (tests/workloads/pty.c): the child's
# controlling terminal, its session and foreground group, echo off, the window size,
# packet mode on the master, a second pty left locked; after restore the child still
# gets its input and sees the same terminal. `script` running a bash loop in its pty
# goes on printing. --shell-job: a job of a shell on a terminal is restored onto the
# terminal of the restoring command, as CRIU does. A tmux server with a shell in its
# pane answers its clients after the restore, and the shell obeys keys.
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import Log, Task, assert_one_line_error, descendants, dumped_pids, wait_for

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
    # bash forks `date` and `sleep` in turn: the tree is whatever the dump froze, and
    # it is compared right after the restore, well before the 2 s sleep can end. script
    # runs its command with $SHELL -c (/bin/sh when unset, as under CI, and dash keeps
    # itself between script and bash); SHELL=/bin/bash execs the loop's bash in its place
    cmd = ["script", "-qfc", 'bash -c "while :; do date +%s; sleep 2; done"', "/dev/null"]
    with open(out, "ab") as f:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                             env=dict(os.environ, SHELL="/bin/bash"),
                             start_new_session=True, close_fds=True, cwd=h.dir)
    task = Task(p.pid, "script -qfc", Log(out), p)
    h.tasks.append(task)
    task.log.wait(r"\d+\r?", count=2)
    shell = descendants(p.pid)[0]
    ttys = {q: tty_of(q) for q in (p.pid, shell)}
    images = h.dump(task)
    family = sorted(dumped_pids(images)) if not h.no_cr else sorted([p.pid] + descendants(p.pid))
    assert {p.pid, shell} <= set(family) and len(family) == 3, family
    time.sleep(1)
    restored = h.restore(images, task=task)
    assert sorted([p.pid] + descendants(p.pid)) == family
    assert {q: tty_of(q) for q in family} == {q: ttys.get(q, ttys[shell]) for q in family}
    n = len(task.log.lines())
    task.log.wait(r"\d+\r?", count=n + 3, timeout=15)
    stamps = [int(line.strip()) for line in task.log.lines() if line.strip().isdigit()]
    assert stamps[-1] - stamps[n - 1] >= 2 and stamps == sorted(stamps)
    assert restored.running()


SHELL_SRC = r"""
# A stand-in for an interactive shell: session leader on a terminal (argv[1], a pty
# slave), runs the counter (argv[3]) as a background job in its own group, then runs
# the criu-py command lines it reads from a fifo (argv[4]) on that terminal, and reaps.
import os, subprocess, sys, time
os.setsid()
term = os.open(sys.argv[1], os.O_RDWR)              # our controlling terminal
for i in (0, 1, 2):
    os.dup2(term, i)
log = open(sys.argv[2], "a", buffering=1)
job = subprocess.Popen([sys.argv[3], sys.argv[2] + ".job"], process_group=0)
log.write(f"job {job.pid}\n")
cmds = os.open(sys.argv[4], os.O_RDWR)
buf = b""
while True:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        pass
    os.set_blocking(cmds, False)
    try:
        buf += os.read(cmds, 4096)
    except BlockingIOError:
        time.sleep(0.05)
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        res = subprocess.run(line.decode().split("\t"), capture_output=True, text=True)
        log.write(f"rc {res.returncode} {res.stderr.strip()!r}\n")
"""


def test_shell_job_on_the_callers_terminal(h, workload_bins):
    master, slave = os.openpty()
    slave_path = os.ttyname(slave)
    os.close(slave)
    try:
        script = h.path("shell.py")
        script.write_text(SHELL_SRC)
        fifo = h.path("cmds")
        os.mkfifo(fifo)
        log = Log(h.path("shell.log"))
        sh = subprocess.Popen([sys.executable, str(script), slave_path, str(log.path),
                               str(workload_bins["counter"]), str(fifo)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=h.dir)
        h.popens.append(sh)
        job_pid = int(log.wait(r"job (\d+)", timeout=30).group(1))
        job = Task(job_pid, "counter", Log(h.path("shell.log.job")))
        h.tasks.append(job)
        job.log.wait(rf"{job_pid} 5")
        before = tty_of(job_pid)
        assert before[1] == sh.pid and before[2] == os.stat(slave_path).st_rdev
        links = {fd: os.readlink(f"/proc/{job_pid}/fd/{fd}") for fd in (0, 1, 2)}
        # without --shell-job the terminal is refused
        res = h.cli("dump", "-t", job_pid, "-D", h.images_dir("refused"))
        assert_one_line_error(res, str(job_pid), "--shell-job")
        images = h.dump(job, None, "--shell-job")
        cli = h.cli_argv("restore", "-D", images, "-d", "--shell-job",
                         "--pidfile", h.path("job.pid"), "-v4", "-o", "restore.log")
        with open(fifo, "w") as f:
            f.write("\t".join(cli) + "\n")
        rc = log.wait(r"rc (\d+) (.*)", timeout=60)
        assert rc.group(1) == "0", rc.group(2)
        assert tty_of(job_pid)[:3] == before[:3]
        assert tty_of(job_pid)[3] == job_pid, "the restored job is the foreground job (as CRIU)"
        assert {fd: os.readlink(f"/proc/{job_pid}/fd/{fd}") for fd in (0, 1, 2)} == links
        n = int(job.log.lines()[-1].split()[1])
        job.log.wait(rf"{job_pid} {n + 3}")
    finally:
        os.close(master)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_tmux_server_with_a_shell(h):
    """A tmux server (a daemon: its own session, a unix socket its clients connect to, the
    master of a pty) with an interactive bash in its window, running a loop. After the
    restore the same server answers its clients, the loop goes on in the pane, and the
    shell still obeys keys: ^C ends the loop, and a command typed then runs."""
    env = dict(os.environ, TMUX_TMPDIR=str(h.path("tmux")))
    os.mkdir(env["TMUX_TMPDIR"])

    def tmux(*args, check=True):
        res = subprocess.run(["tmux", "-L", "criu-py-test", *args], env=env, capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert res.returncode == 0 or not check, res.stderr
        return res.stdout

    def ticks():
        return [int(line.split()[1]) for line in tmux("capture-pane", "-p", "-t", "s1").splitlines()
                if re.fullmatch(r"tick \d+", line)]
    tmux("new-session", "-d", "-s", "s1", "-x", "80", "-y", "24", "bash --norc --noprofile")
    server = int(tmux("display-message", "-p", "#{pid}").strip())
    task = Task(server, "tmux -L criu-py-test", None)
    h.tasks.append(task)
    try:
        tmux("send-keys", "-t", "s1", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done",
             "Enter")
        wait_for(lambda: len(ticks()) >= 5, timeout=10, what="ticks in the pane")
        before = ticks()[-1]
        images = h.dump(task)
        assert len(dumped_pids(images)) >= 2 or h.no_cr      # the server, bash (and sleep)
        h.restore(images, task=task)
        wait_for(lambda: ticks()[-1] >= before + 3, timeout=10, what="the loop to go on")
        seen = ticks()                       # the pane's lines, then the loop's new ones
        assert seen == list(range(seen[0], seen[0] + len(seen))), seen
        tmux("send-keys", "-t", "s1", "C-c")
        tmux("send-keys", "-t", "s1", "echo hello-$((6*7))", "Enter")
        wait_for(lambda: "hello-42" in tmux("capture-pane", "-p", "-t", "s1").split(),
                 timeout=10, what="the shell to run a command")
    finally:
        tmux("kill-server", check=False)
