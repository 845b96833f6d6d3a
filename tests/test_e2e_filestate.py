# End-to-end: files by path (tests/workloads/filestate.c): a fifo's unread bytes, a
# deleted file's contents (with a hole), offset and deletion, a deleted file mapped
# privately, a file renamed since it was opened, and file locks (flock, POSIX, OFD)
# that still keep another process out after restore. Refusals: a locked file without
# --file-locks, a deleted file over --ghost-limit; a file whose size or mode changed
# since the dump fails the restore in one line. A working directory removed with its
# parent comes back as the task's cwd, and a directory held open as its fd, deleted
# again.
import fcntl
import os
import signal
import struct

import pytest

from conftest import assert_one_line_error, assert_running_untraced, proc_is_running

pytestmark = pytest.mark.needs_tool

CHECK = r"check {pid} fifo=(\S*) ghost=(\S+)@(\d+) nlink=(\d+) map=(\w+) renamed=(\S+)"


def check(task):
    n = len(task.log.matches(CHECK.format(pid=task.pid)))
    task.signal(signal.SIGUSR1)
    return task.log.wait(CHECK.format(pid=task.pid), count=n + 1).groups()


def fd_links(pid):
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def locks_of(pid):
    with open("/proc/locks") as f:
        return sorted(" ".join(line.split()[1:4] + line.split()[6:]) for line in f
                      if line.split()[4] in (str(pid), "-1") and "->" not in line)


def conflicts(workdir):
    """What another process (this one) is refused on the locked files."""
    out = []
    with open(workdir / "lk1", "r+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out.append("lk1 free")
        except BlockingIOError:
            out.append("lk1 flock held")
    with open(workdir / "lk2", "r+b") as f:
        for start in (15, 40):
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, start)
                fcntl.lockf(f, fcntl.LOCK_UN, 5, start)
                out.append(f"lk2@{start} free")
            except OSError:
                out.append(f"lk2@{start} held")
    fd = os.open(workdir / "lk3", os.O_RDWR)
    try:
        fl = struct.pack("<hhxxxxqqixxxx", fcntl.F_WRLCK, 0, 200, 1, 0)
        try:
            fcntl.fcntl(fd, 37, fl)         # F_OFD_SETLK
            out.append("lk3 free")
        except OSError:
            out.append("lk3 held")
    finally:
        os.close(fd)
    return out


def test_fifo_ghost_renamed_and_locks(h):
    workdir = h.path("fs")
    workdir.mkdir()
    task = h.start("filestate", workdir)
    # without --file-locks: refused, the task runs on untouched
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir("refused"))
    assert_one_line_error(res, f"pid {task.pid}", "--file-locks")
    assert_running_untraced(task)
    links = fd_links(task.pid)
    locks = locks_of(task.pid)
    assert len(locks) == 3 and conflicts(workdir) == \
        ["lk1 flock held", "lk2@15 held", "lk2@40 free", "lk3 held"]
    images = h.dump(task, None, "--file-locks")
    assert not os.path.exists(workdir / "gone")
    assert conflicts(workdir) == ["lk1 free", "lk2@15 free", "lk2@40 free", "lk3 free"]
    restored = h.restore(images, task=task)
    assert fd_links(task.pid) == links, "fd targets changed (a ghost must be deleted again)"
    assert not os.path.exists(workdir / "gone") and not os.path.exists(workdir / "gonemap")
    assert locks_of(task.pid) == locks
    assert conflicts(workdir) == ["lk1 flock held", "lk2@15 held", "lk2@40 free", "lk3 held"]
    fifo, ghost, pos, nlink, mapped, renamed = check(restored)
    assert fifo == "queued-before-dump"
    assert (ghost, pos, nlink) == ("ghost", "7", "0"), "the deleted file lost data or offset"
    assert mapped == "ok"
    assert renamed == str(workdir / "renamed")


def test_ghost_limit_refuses_before_any_image(h):
    workdir = h.path("fs")
    workdir.mkdir()
    task = h.start("filestate", workdir, "nolocks")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--ghost-limit", "4K")
    assert_one_line_error(res, f"pid {task.pid}", "--ghost-limit", "gone")
    assert not [p for p in images.iterdir() if p.name.endswith(".img")]
    assert_running_untraced(task)


@pytest.mark.parametrize("change", ["size", "mode"])
def test_file_changed_since_the_dump_is_refused(h, change):
    workdir = h.path("fs")
    workdir.mkdir()
    task = h.start("filestate", workdir, "nolocks")
    images = h.dump(task)
    target = workdir / "renamed"
    if change == "size":
        target.write_bytes(b"grown")
    else:
        target.chmod(0o600)
    res = h.cli("restore", "-D", images, "-d")
    assert_one_line_error(res, str(target), change)
    assert not proc_is_running(task.pid)
    assert not [p for p in workdir.iterdir() if "ghost" in p.name or p.name.startswith("gone")]


def test_deleted_file_whose_name_was_taken_again(h):
    # the deleted file's old name holds another file by restore time: the ghost is made
    # beside it, opened, removed; the new file is left alone
    workdir = h.path("fs")
    workdir.mkdir()
    task = h.start("filestate", workdir, "nolocks")
    images = h.dump(task)
    (workdir / "gone").write_bytes(b"a new file with the old name")
    restored = h.restore(images, task=task)
    assert (workdir / "gone").read_bytes() == b"a new file with the old name"
    assert not [p for p in workdir.iterdir() if "ghost" in p.name]
    fifo, ghost, pos, nlink, mapped, renamed = check(restored)
    assert (ghost, pos, nlink, mapped) == ("ghost", "7", "0", "ok")
    links = [os.readlink(f"/proc/{task.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{task.pid}/fd")]
    assert [link for link in links if link.startswith(str(workdir / "gone.cr."))
            and link.endswith(".ghost (deleted)")], links


def test_deleted_cwd_comes_back_deleted(h):
    """A process whose working directory was removed, with the directory above it, after
    it went there (a shell left in a build dir that `rm -rf` took): its cwd is a ghost
    directory. The restore makes both directories again, the task gets a new one as its
    cwd, with the mode the old one had, and both are removed again."""
    base = h.path("build")
    cwd = base / "sub"
    cwd.mkdir(parents=True)
    cwd.chmod(0o750)
    task = h.start("counter", ready=r"\d+ 3", cwd=cwd)
    before = os.stat(f"/proc/{task.pid}/cwd")
    cwd.rmdir()
    base.rmdir()
    assert os.readlink(f"/proc/{task.pid}/cwd") == f"{cwd} (deleted)"
    images = h.dump(task)
    restored = h.restore(images, task=task)
    assert os.readlink(f"/proc/{task.pid}/cwd") == f"{cwd} (deleted)"
    after = os.stat(f"/proc/{task.pid}/cwd")
    assert after.st_mode == before.st_mode and after.st_nlink == 0
    assert not base.exists(), "the recreated directories must go again"
    task.log.wait(rf"{task.pid} \d+", count=len(task.log) + 2)
    assert restored.running()


def test_deleted_directory_held_open(h):
    """An fd on a directory removed since it was opened: a ghost directory too; the
    restored fd names a deleted directory with the old one's mode."""
    held = h.path("held")
    held.mkdir(mode=0o710)
    held.chmod(0o710)
    task = h.start("dirholder", held, python=True)
    held.rmdir()
    pattern = rf"tick {task.pid} (\d+) (.*) (\d+) (\d+)"
    task.log.wait(pattern, count=len(task.log.matches(pattern)) + 1)
    images = h.dump(task)
    n = int(task.log.matches(pattern)[-1].group(1))
    restored = h.restore(images, task=task)
    m = task.log.wait(pattern, count=len(task.log.matches(pattern)) + 2)
    assert int(m.group(1)) > n
    assert m.group(2, 3, 4) == (f"{held} (deleted)", "40710", "0"), m.group(0)
    assert not held.exists()
    assert restored.running()


def test_bad_ghost_limit_is_one_line(h):
    task = h.start("counter", ready=r"\d+ 2")
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), "--ghost-limit", "lots")
    assert_one_line_error(res, "--ghost-limit")
    assert_running_untraced(task)
