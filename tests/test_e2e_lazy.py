# End-to-end lazy restore (criu_py/lazy/): `crit make-lazy` images restored with
# `restore --lazy-pages` while `lazy-pages -D` serves the memory the task touches and
# pushes the rest; the workloads check their own memory, so zeros or stale pages where
# data belongs show as BAD. Also: what happens when the daemon dies mid-way.
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import assert_one_line_error, proc_is_running, wait_for

SEED = 0x5EED1234


def ask(task, verdict=r"(OK|BAD) \d+.*", timeout=60):
    before = len(task.log.matches(verdict))
    task.signal(signal.SIGUSR1)
    return task.log.wait(verdict, timeout=timeout, count=before + 1).group(0)


@pytest.fixture(autouse=True)
def no_guard_left():
    yield
    wait_for(lambda: not guards_of(), 10, "the lazy-pages guards to exit")


def start_daemon(h, images, *extra, env=None):
    """`lazy-pages -D images` in the background; returns once its socket listens."""
    args = h.cli_argv("lazy-pages", "-D", images, "-v4", "-o", "lazy.log", *extra)
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=h.dir, start_new_session=True,
                         env={**os.environ, **(env or {})})
    h.popens.append(p)
    sock = images / "lazy-pages.socket"
    wait_for(lambda: sock.exists() or p.poll() is not None, 30, "the lazy-pages socket")
    assert p.poll() is None, f"lazy-pages exited early: {p.stderr.read()}"
    return p


def lazy_images(h, task):
    full = h.dump(task, h.images_dir("full"))
    lazy = h.dir / "lazy"
    res = h.cli("crit", "make-lazy", full, lazy)
    assert res.returncode == 0, res.stderr
    return full, lazy


def test_memhog_256mib_make_lazy_restore(h):
    task = h.start("memhog", 256, SEED, ready=r"ready \d+")
    assert ask(task) == f"OK {task.pid}"
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy)
    restored = h.restore(lazy, "--lazy-pages", task=task)
    assert ask(restored) == f"OK {task.pid}"
    assert daemon.wait(60) == 0, daemon.stderr.read()
    assert not (lazy / "lazy-pages.socket").exists()
    assert ask(restored) == f"OK {task.pid}"


def test_fork_munmap_dontneed_mremap_while_pages_arrive(h):
    """The daemon pushes nothing for a while (a test hook): the task's fork, munmap,
    madvise(DONTNEED) and mremap all happen before its pages are in."""
    task = h.start("lazyevents", 64, SEED, ready=r"ready \d+")
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy, env={"CRIU_PY_TEST_LAZY_DELAY": "3"})
    restored = h.restore(lazy, "--lazy-pages", task=task)
    assert ask(restored) == f"OK {task.pid}"
    assert daemon.wait(60) == 0, daemon.stderr.read()
    log = (lazy / "lazy.log").read_text()
    for what in ("forked", "mremap", "remove", "unmap"):
        assert re.search(rf"lazy-pages: .*{what}", log), what


def test_daemon_killed_midway_kills_the_task(h):
    """SIGKILL to the daemon while most pages are missing: its guard SIGKILLs the task
    (and the child it forks) before the uffd closes - with the uffd gone the kernel
    would fill the missing pages with zeros and the task would run on wrong memory."""
    task = h.start("memhog", 64, SEED, ready=r"ready \d+")
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy, env={"CRIU_PY_TEST_LAZY_DELAY": "30"})
    restored = h.restore(lazy, "--lazy-pages", task=task)
    daemon.kill()
    daemon.wait(10)
    assert restored.reap(timeout=10) == -signal.SIGKILL
    assert not restored.log.matches(rf"BAD {task.pid}")
    wait_for(lambda: not guards_of(), 10, "the guard to exit")


def guards_of():
    """Live lazy-pages guards (comm criu-py-guard) reparented to us, the subreaper;
    the exited ones are reaped here."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
        fields = stat[stat.rindex(b")") + 2:].split()
        if comm != b"criu-py-guard" or int(fields[1]) != os.getpid():
            continue
        if fields[0] == b"Z":
            os.waitpid(int(name), 0)
        else:
            out.append(int(name))
    return out


def test_lazy_restore_errors(h):
    task = h.start("memhog", 16, SEED, ready=r"ready \d+")
    _, lazy = lazy_images(h, task)
    # no --lazy-pages: the lazy pages have no data here
    res = h.cli("restore", "-D", lazy, "-d")
    assert_one_line_error(res, "lazy pages")
    # --lazy-pages without a daemon
    res = h.cli("restore", "-D", lazy, "-d", "--lazy-pages")
    assert_one_line_error(res, "lazy-pages daemon")
    assert not proc_is_running(task.pid)
    # a daemon for images without their lazy source
    os.unlink(lazy / "lazy-source")
    res = h.cli("lazy-pages", "-D", lazy)
    assert_one_line_error(res, "lazy source")


def test_cpython_restored_lazily(h):
    task = h.start("pyworker", 200000, python=True, ready=r"ready \d+ [0-9a-f]{32}")
    digest = task.log.matches(r"ready \d+ ([0-9a-f]{32})")[0].group(1)
    pattern = r"state \d+ [0-9a-f]{32} ticks \d+"
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy, env={"CRIU_PY_TEST_LAZY_DELAY": "1"})
    restored = h.restore(lazy, "--lazy-pages", task=task)
    restored.signal(signal.SIGUSR1)
    line = task.log.wait(pattern, count=1).group(0)
    assert line.startswith(f"state {task.pid} {digest} "), line
    assert daemon.wait(60) == 0, daemon.stderr.read()
    assert re.search(r"lazy-pages: pid \d+ done: \d+ KiB on faults \([1-9]\d* faults\)",
                     (lazy / "lazy.log").read_text())
