# End-to-end: inotify and fanotify fds through dump and restore, and the irmap that finds
# the paths of watched files. A C watcher (tests/workloads/notifier.c) watches files and
# a directory with inotify (its watch numbers have a hole) and a tmpfs mount, a file and
# an ignored file with fanotify; `tail -f` follows a file. After restore, new changes to
# those files must show up as events on the same watch numbers. The irmap test watches a
# file deep in a tree of 100,000 files, pre-dumps (which caches its path), renames it and
# dumps: the log shows the cache in use and the renamed file found again by the scan.
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import Log, Task, assert_one_line_error, assert_running_untraced, wait_for

pytestmark = pytest.mark.needs_tool


@pytest.fixture
def tmpfs(h):
    mnt = h.path("mnt")
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "criu-py-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def notify_fds(pid):
    """{fd: sorted inotify/fanotify fdinfo lines} of a task (the marks as the kernel
    shows them, handles and inode numbers aside)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            lines = [line for line in f.read().splitlines() if line.startswith(("inotify", "fanotify"))]
        if lines:
            out[int(fd)] = sorted(re.sub(r" (ino|f_handle|mnt_id):\S+", "", line) for line in lines)
    return out


def fan_masks(task, first: int, path) -> int:
    """The fanotify event bits logged for path since log line `first`."""
    bits = 0
    for line in task.log.lines()[first:]:
        m = re.fullmatch(r"fanotify mask=0x([0-9a-f]+) path=(.*)", line)
        if m and m.group(2) == str(path):
            bits |= int(m.group(1), 16)
    return bits


def wds(task):
    m = task.log.wait(r"wds a=(\d+) b=(\d+) c=(\d+) dir=(\d+) extra=([\d,]*)")
    extra = [int(x) for x in m.group(5).split(",") if x]
    return dict(a=int(m.group(1)), b=int(m.group(2)), c=int(m.group(3)), dir=int(m.group(4)),
                extra=extra)


def test_inotify_and_fanotify_keep_their_watches(h, tmpfs):
    d = h.path("watched")
    d.mkdir()
    task = h.start("notifier", d, tmpfs, ready=r"ready \d+")
    w = wds(task)
    assert w["c"] == w["b"] + 2, w                  # the hole is part of the state
    before = notify_fds(task.pid)
    images = h.dump(task)
    res = subprocess.run(["/usr/bin/crit", "decode", "--pretty", "-i", str(images / "files.img")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and '"INOTIFY"' in res.stdout and '"FANOTIFY"' in res.stdout, \
        res.stderr
    restored = h.restore(images, task=task)
    assert notify_fds(task.pid) == before, (before, notify_fds(task.pid))
    n = len(task.log.lines())
    with open(d / "a", "a") as f:
        f.write("x")
    with open(d / "c", "a") as f:
        f.write("y")
    (d / "new").touch()
    with open(tmpfs / "quiet", "a") as f:
        f.write("q")
    with open(tmpfs / "loud", "a") as f:
        f.write("l")
    task.log.wait(rf"inotify wd={w['a']} mask=0x8 name=")
    task.log.wait(rf"inotify wd={w['c']} mask=0x8 name=")
    task.log.wait(rf"inotify wd={w['dir']} mask=0x100 name=new")
    task.log.wait(rf"fanotify mask=0x2 path={d}/a")
    task.log.wait(rf"fanotify mask=0x8 path={tmpfs}/quiet")
    wait_for(lambda: fan_masks(task, n, tmpfs / "loud") & 0x2, what="FAN_MODIFY of loud")
    # the ignored mask came back: no FAN_MODIFY for quiet
    assert not fan_masks(task, n, tmpfs / "quiet") & 0x2
    assert restored.running()


def test_tail_f_follows_its_file_after_restore(h):
    src, out = h.path("followed.txt"), h.path("tail.out")
    src.write_text("one\n")
    with open(out, "w") as o:
        p = subprocess.Popen(["tail", "-n", "+1", "-f", str(src)], stdin=subprocess.DEVNULL,
                             stdout=o, stderr=subprocess.DEVNULL, start_new_session=True)
    task = Task(p.pid, str(src), Log(out), p)
    h.tasks.append(task)
    task.log.wait("one")
    wait_for(lambda: any(os.readlink(f"/proc/{p.pid}/fd/{fd}") == "anon_inode:inotify"
                         for fd in os.listdir(f"/proc/{p.pid}/fd")), what="tail's inotify fd")
    with open(src, "a") as f:
        f.write("two\n")
    task.log.wait("two")
    restored = h.checkpoint_restore(task)
    with open(src, "a") as f:
        f.write("three\n")
    task.log.wait("three")
    assert task.log.lines() == ["one", "two", "three"]
    assert restored.running()


def test_irmap_cache_of_a_predump_and_a_renamed_file(h):
    tree = h.path("tree")
    deep = tree / "d37" / "e5" / "f"
    for i in range(100):
        sub = tree / f"d{i}"
        sub.mkdir(parents=True)
        for j in range(1000):
            os.close(os.open(sub / f"file{j}", os.O_CREAT | os.O_WRONLY, 0o644))
    deep.mkdir(parents=True)
    (deep / "deep").write_text("")
    d = h.path("watched")
    d.mkdir()
    task = h.start("notifier", d, "-", deep / "deep", ready=r"ready \d+")
    extra = wds(task)["extra"][0]
    scan = ["--force-irmap", "--irmap-scan-path", h.dir]
    pre = h.images_dir("pre")
    res = h.cli("pre-dump", "-t", task.pid, "-D", pre, "-v4", "-o", "pre.log", *scan)
    assert res.returncode == 0, res.stderr
    from criu_py.images import ImageDir
    with ImageDir(pre) as im:
        cached = {e.path for e in im.read_entries("irmap-cache.img")}
    assert str(deep / "deep") in cached and str(d / "a") in cached, cached
    # Debian's crit (CRIU 3.17) reads the cache
    res = subprocess.run(["/usr/bin/crit", "decode", "--pretty", "-i", str(pre / "irmap-cache.img")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and str(deep / "deep") in res.stdout, res.stderr
    os.rename(deep / "deep", deep / "renamed")
    images = h.dump(task, h.images_dir("dump"), "--track-mem", "--prev-images-dir", "../pre", *scan)
    log = (images / "dump.log").read_text()
    assert f"-> {d}/a (from the cache)" in log, log
    assert f"the cached path {deep}/deep" in log and "is stale: scanning" in log, log
    assert re.search(rf"-> {deep}/renamed \(scanned \d+ entries\)", log), log
    restored = h.restore(images, task=task)
    with open(deep / "renamed", "a") as f:
        f.write("x")
    task.log.wait(rf"inotify wd={extra} mask=0x8 name=")
    assert restored.running()


def test_a_watch_on_a_deleted_file_fails_the_dump_with_one_line(h):
    d = h.path("watched")
    d.mkdir()
    gone = h.path("gone")
    gone.write_text("")
    keep = os.open(gone, os.O_RDONLY)           # the inode lives on, with no name
    try:
        task = h.start("notifier", d, "-", gone, ready=r"ready \d+")
        extra = wds(task)["extra"][0]
        os.unlink(gone)
        images = h.images_dir()
        res = h.cli("dump", "-t", task.pid, "-D", images)
        line = assert_one_line_error(res, f"pid {task.pid}", f"inotify wd {extra}", "deleted")
        assert "fd" in line
        assert_running_untraced(task)
        assert not list(images.glob("*.img"))
    finally:
        os.close(keep)
