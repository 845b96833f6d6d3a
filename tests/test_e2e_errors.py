# End-to-end: bad input never crashes. Each case must give exactly one "Error:" line on
# stderr and a non-zero exit; a refused dump must leave the task running and untraced
# and write no image; a restore from damaged images must start nothing.
import os
import struct
import subprocess

import pytest

from conftest import assert_one_line_error, assert_running_untraced, descendants, proc_is_running, proc_status

pytestmark = pytest.mark.needs_tool


@pytest.fixture
def good_images(h):
    """A real dump of the counter (the task is gone and reaped); returns (task, images)."""
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task, log_file=None)
    return task, images


def assert_restore_fails_cleanly(h, task, images, *words):
    res = h.cli("restore", "-D", images, "-d")
    line = assert_one_line_error(res, *words)
    assert not proc_is_running(task.pid), f"a failed restore left pid {task.pid} behind"
    return line


def test_restore_missing_dir(h):
    res = h.cli("restore", "-D", h.path("does-not-exist"), "-d")
    assert_one_line_error(res)


def test_restore_empty_dir(h):
    empty = h.path("empty")
    empty.mkdir(mode=0o700)
    res = h.cli("restore", "-D", empty, "-d")
    assert_one_line_error(res)


def test_restore_truncated_image(h, good_images):
    task, images = good_images
    core = images / f"core-{task.pid}.img"
    data = core.read_bytes()
    core.write_bytes(data[: len(data) // 2])
    assert_restore_fails_cleanly(h, task, images, f"core-{task.pid}")


def test_restore_missing_pages(h, good_images):
    task, images = good_images
    pages = next(images.glob("pages-*.img"))
    data = pages.read_bytes()
    pages.write_bytes(data[: len(data) - 4096])
    assert_restore_fails_cleanly(h, task, images)


def test_restore_flipped_bytes(h, good_images):
    # every byte of mm's first entry inverted (its length word kept): not a valid message
    task, images = good_images
    mm = images / f"mm-{task.pid}.img"
    data = bytearray(mm.read_bytes())
    (length,) = struct.unpack_from("<I", data, 8)
    for i in range(12, 12 + length):
        data[i] ^= 0xFF
    mm.write_bytes(bytes(data))
    assert_restore_fails_cleanly(h, task, images)


def test_restore_entry_length_past_end(h, good_images):
    task, images = good_images
    pstree = images / "pstree.img"
    data = bytearray(pstree.read_bytes())
    struct.pack_into("<I", data, 8, 0x7FFFFFF0)
    pstree.write_bytes(bytes(data))
    assert_restore_fails_cleanly(h, task, images, "pstree")


def test_restore_wrong_magic(h, good_images):
    task, images = good_images
    core = images / f"core-{task.pid}.img"
    data = bytearray(core.read_bytes())
    struct.pack_into("<I", data, 4, 0x57492820)  # mm's magic in a core image
    core.write_bytes(bytes(data))
    assert_restore_fails_cleanly(h, task, images, "magic")


def test_dump_dead_pid(h):
    p = subprocess.Popen(["/bin/true"])
    p.wait()
    res = h.cli("dump", "-t", p.pid, "-D", h.images_dir())
    assert_one_line_error(res, str(p.pid))


def test_dump_pid_zero_and_nonsense(h):
    for pid in ("0", "-5", "abc", "99999999"):
        res = h.cli("dump", "-t", pid, "-D", h.images_dir())
        assert_one_line_error(res)


@pytest.mark.parametrize("kind, words", [("socket", ["socket"]), ("io_uring", ["io_uring"]),
                                         ("perf_event", ["perf_event"]), ("bpf-map", ["bpf-map"]),
                                         ("grandchild", ["socket"])])
def test_dump_refuses_unsupported_and_task_keeps_running(h, kind, words):
    task = h.start("unsupported", kind, ready=r"ready \d+ -?\d+.*")
    fields = task.log.matches(r"ready .*")[0].group(0).split()
    fd = int(fields[2])
    holder = int(fields[3]) if len(fields) > 3 else task.pid
    family = [task.pid] + descendants(task.pid)
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images)
    line = assert_one_line_error(res, str(holder), *words)
    if fd >= 0:
        assert str(fd) in line.split(str(holder), 1)[1], f"fd {fd} not named: {line}"
    assert_running_untraced(task)
    for pid in family:
        status = proc_status(pid)
        assert status["TracerPid"] == "0" and status["State"][0] in "SR", (pid, status)
    beats = len(task.log.matches(r"beat .*"))
    task.log.wait(r"beat .*", count=beats + 5)  # still running, and running freely
    written = [p.name for p in images.iterdir()] if images.exists() else []
    assert not [n for n in written if n.endswith(".img") or n == "stats-dump"], \
        f"images written by a refused dump: {written}"
    assert res.returncode == 1


def test_dump_refusal_leaves_no_tracer_even_after_dump_of_other_task(h):
    # a refused dump followed by a good one of another task: both tasks stay untouched
    bad = h.start("unsupported", "io_uring", ready=r"ready \d+ \d+")
    good = h.start("counter", ready=r"\d+ 5")
    assert h.cli("dump", "-t", bad.pid, "-D", h.images_dir("bad")).returncode == 1
    h.dump(good, h.images_dir("good"), leave_running=True)
    assert_running_untraced(bad)
    assert_running_untraced(good)
    os.kill(good.pid, 0)


def test_dump_into_a_file_instead_of_a_dir(h):
    task = h.start("counter", ready=r"\d+ 3")
    not_a_dir = h.path("plain-file")
    not_a_dir.write_text("x")
    res = h.cli("dump", "-t", task.pid, "-D", not_a_dir)
    assert_one_line_error(res)
    assert_running_untraced(task)
    assert not_a_dir.read_text() == "x"


def test_restore_fails_cleanly_when_a_mapped_file_is_gone(h):
    # the task maps a data file privately; without it the restore cannot rebuild the
    # mapping: one line naming the file, and nothing left at the PID
    task = h.start("shmem", h.path("mapped.data"), 7)
    images = h.dump(task, log_file=None)
    h.path("mapped.data").unlink()
    assert_restore_fails_cleanly(h, task, images, "mapped.data")


def test_restore_fails_cleanly_when_an_open_file_is_gone(h):
    workdir = h.path("fdir")
    workdir.mkdir()
    task = h.start("files", workdir)
    images = h.dump(task, log_file=None)
    (workdir / "records").unlink()
    assert_restore_fails_cleanly(h, task, images, "records")
