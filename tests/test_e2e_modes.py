# File modes as a user meets them through the CLI: `-D` with an existing directory keeps
# its mode (a missing one is made 0700 whatever the umask), images are 0600, and log
# files (-o) are created 0600 whatever the umask; an existing log target keeps its mode.
import os
import stat
import subprocess

import pytest

from conftest import file_mode, image_files

pytestmark = pytest.mark.needs_tool


def cli_with_umask(h, umask: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run(h.cli_argv(*args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120, cwd=h.dir, preexec_fn=lambda: os.umask(umask))


@pytest.mark.parametrize("mode", [0o755, 0o1777, 0o700])
def test_existing_images_dir_keeps_its_mode(h, mode):
    task = h.start("counter", ready=r"\d+ 3")
    images = h.path(f"ckpt-{mode:o}")
    images.mkdir()
    os.chmod(images, mode)
    res = cli_with_umask(h, 0, "dump", "-t", task.pid, "-D", images, "-R", "-v2", "-o", "d.log")
    assert res.returncode == 0, res.stderr
    assert file_mode(images) == mode, oct(file_mode(images))
    assert all(file_mode(p) == 0o600 for p in image_files(images)), \
        {p.name: oct(file_mode(p)) for p in image_files(images)}
    log = (images / "d.log").read_text()
    if mode & 0o044:
        assert "readable by others" in log, log
    else:
        assert "readable by others" not in log, log


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_missing_images_dir_and_log_are_private_whatever_the_umask(h, umask):
    task = h.start("counter", ready=r"\d+ 3")
    images = h.path(f"new-{umask:o}")
    res = cli_with_umask(h, umask, "dump", "-t", task.pid, "-D", images, "-R", "-o", "d.log")
    assert res.returncode == 0, res.stderr
    assert file_mode(images) == 0o700, oct(file_mode(images))
    assert file_mode(images / "d.log") == 0o600
    # restore's log too (the task is still running: the restore fails on its PID, the
    # log file is made all the same)
    res = cli_with_umask(h, umask, "restore", "-D", images, "-o", "r.log", "-d")
    assert res.returncode != 0
    assert file_mode(images / "r.log") == 0o600


def test_existing_log_target_keeps_its_mode(h, tmp_path):
    task = h.start("counter", ready=r"\d+ 3")
    images = h.images_dir()
    old = h.path("old.log")
    old.write_text("previous run\n" * 100)
    os.chmod(old, 0o640)
    null_mode = stat.S_IMODE(os.stat("/dev/null").st_mode)
    res = cli_with_umask(h, 0, "dump", "-t", task.pid, "-D", images, "-R", "-o", old, "-v4")
    assert res.returncode == 0, res.stderr
    assert file_mode(old) == 0o640 and "previous run" not in old.read_text()
    res = cli_with_umask(h, 0, "dump", "-t", task.pid, "-D", images, "-R", "-o", "/dev/null")
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(os.stat("/dev/null").st_mode) == null_mode


@pytest.mark.parametrize("name", ["pstree.img", "pages-1.img"])
def test_a_symlink_left_in_the_images_dir_is_not_followed(h, name):
    """An image name taken by a symlink to a file elsewhere: the dump writes nothing
    through it (that file stays as it was), fails in one line naming the image, and the
    task runs on untraced."""
    from conftest import assert_one_line_error, assert_running_untraced
    task = h.start("counter", ready=r"\d+ 3")
    images = h.images_dir()
    victim = h.path("victim.txt")
    victim.write_text("not an image\n")
    os.symlink(victim, images / name)
    res = h.cli("dump", "-t", task.pid, "-D", images)
    assert_one_line_error(res, name)
    assert_running_untraced(task)
    assert victim.read_text() == "not an image\n"
