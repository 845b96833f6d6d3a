# End-to-end: bad input never crashes. Each case must give exactly one "Error:" line on
# stderr and a non-zero exit; a refused dump must leave the task running and untraced
# and write no image; a restore from damaged images must start nothing.
import os
import signal
import time
import struct
import subprocess

import pytest

from conftest import (Task, assert_one_line_error, assert_running_untraced, descendants,
                      proc_is_running, proc_status, wait_for)

pytestmark = pytest.mark.needs_tool


@pytest.fixture
def good_images(h):
    """A real dump of the counter (the task is gone and reaped); returns (task, images)."""
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task, log_file=None)
    return task, images


def assert_restore_fails_cleanly(h, task, images, *words, damaged=None):
    """With checksums, the damaged file is named first (`damaged`, or a word); with
    --no-verify the image checks themselves must still give one line with `words`."""
    res = h.cli("restore", "-D", images, "-d")
    if damaged:
        assert_one_line_error(res, damaged)
        assert "damaged" in res.stderr or "missing" in res.stderr, res.stderr
    else:
        assert_one_line_error(res, *words)
    assert not proc_is_running(task.pid), f"a failed restore left pid {task.pid} behind"
    res = h.cli("restore", "-D", images, "-d", "--no-verify")
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
    assert_restore_fails_cleanly(h, task, images, f"core-{task.pid}", damaged=core.name)


def test_restore_missing_pages(h, good_images):
    task, images = good_images
    pages = next(images.glob("pages-*.img"))
    data = pages.read_bytes()
    pages.write_bytes(data[: len(data) - 4096])
    assert_restore_fails_cleanly(h, task, images, damaged=pages.name)


def test_restore_flipped_bytes(h, good_images):
    # every byte of mm's first entry inverted (its length word kept): not a valid message
    task, images = good_images
    mm = images / f"mm-{task.pid}.img"
    data = bytearray(mm.read_bytes())
    (length,) = struct.unpack_from("<I", data, 8)
    for i in range(12, 12 + length):
        data[i] ^= 0xFF
    mm.write_bytes(bytes(data))
    assert_restore_fails_cleanly(h, task, images, damaged=mm.name)


def test_restore_entry_length_past_end(h, good_images):
    task, images = good_images
    pstree = images / "pstree.img"
    data = bytearray(pstree.read_bytes())
    struct.pack_into("<I", data, 8, 0x7FFFFFF0)
    pstree.write_bytes(bytes(data))
    assert_restore_fails_cleanly(h, task, images, "pstree", damaged="pstree.img")


def test_restore_wrong_magic(h, good_images):
    task, images = good_images
    core = images / f"core-{task.pid}.img"
    data = bytearray(core.read_bytes())
    struct.pack_into("<I", data, 4, 0x57492820)  # mm's magic in a core image
    core.write_bytes(bytes(data))
    assert_restore_fails_cleanly(h, task, images, "magic", damaged=core.name)


# ---------------------------------------------------------------- checksums (issue 8)

def test_damage_the_parser_cannot_see_is_named_by_the_checksums(h, good_images):
    """Silent damage: one flipped byte of page data, an fdinfo image cut at an entry
    boundary, an image added or removed: the restore names the file, starts nothing."""
    import shutil
    task, images = good_images
    cases = []
    pages = next(images.glob("pages-*.img"))
    fdinfo = next(images.glob("fdinfo-*.img"))

    def flip_page_byte(d):
        p = d / pages.name
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        return pages.name, "damaged page run"

    def cut_fdinfo(d):
        p = d / fdinfo.name
        data = p.read_bytes()
        (first,) = struct.unpack_from("<I", data, 8)
        p.write_bytes(data[:12 + first])           # keep header + one whole entry
        return fdinfo.name, "damaged"

    def add_pipes_data(d):
        (d / "pipes-data.img").write_bytes(struct.pack("<II", 0x54564319, 0x56453709))
        return "pipes-data.img", "added after the dump"

    def remove_fs(d):
        os.unlink(d / f"fs-{task.pid}.img")
        return f"fs-{task.pid}.img", "missing"

    for damage in (flip_page_byte, cut_fdinfo, add_pipes_data, remove_fs):
        d = h.path(f"copy-{damage.__name__}")
        shutil.copytree(images, d)
        name, words = damage(d)
        res = h.cli("restore", "-D", d, "-d")
        assert_one_line_error(res, name, words)
        assert not proc_is_running(task.pid)
        cases.append(name)
    assert len(cases) == 4


def test_images_without_checksums_restore_unverified(h, good_images):
    """An image set as upstream CRIU writes it (no checksum image) restores, and -v3 says
    it was not verified."""
    task, images = good_images
    os.unlink(images / "criu-py-checksums.img")
    restored = h.restore(images, task=task, verbosity=3)
    assert "without verification" in (images / "restore.log").read_text()
    restored.kill()


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


@pytest.mark.needs_tool
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_restore_leaves_nothing_half_restored(h, sig):
    """SIGINT/SIGTERM at several instants of a restore: it either finished (the task runs
    with its PID) or aborted in one line with nothing at the PID and no pidfile."""
    task = h.start("memhog", 64, 7, ready=r"ready \d+")
    images = h.dump(task)
    outcomes = {"restored": 0, "aborted": 0}
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
        pidfile = h.path("r.pid")
        restored = Task(task.pid, task.marker, task.log)
        h.tasks.append(restored)
        p = subprocess.Popen(h.cli_argv("restore", "-D", images, "-d", "--pidfile", pidfile),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=h.dir)
        wait_for_handlers(p.pid)
        time.sleep(delay)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        if p.returncode == 0:
            outcomes["restored"] += 1
            assert restored.running() and pidfile.read_text().strip() == str(task.pid)
            restored.kill()
        else:
            outcomes["aborted"] += 1
            assert_one_line_error(res_like(p, err), "interrupted")
            assert p.returncode == 128 + sig
            wait_for(lambda: not os.path.exists(f"/proc/{task.pid}") or
                     not proc_is_running(task.pid), 5, "no task at the PID")
            restored.kill()
            assert not pidfile.exists()
    print(f"signal {sig}: {outcomes}")


def res_like(p, err):
    return subprocess.CompletedProcess(p.args, p.returncode, "", err)


def wait_for_handlers(pid: int) -> None:
    """Until criu-py has installed its SIGTERM handler (before that, the interpreter is
    still starting and a signal has its default effect, which no code of ours can change)."""
    def caught():
        st = proc_status(pid)
        return st is None or int(st["SigCgt"], 16) >> (signal.SIGTERM - 1) & 1
    wait_for(caught, 30, f"pid {pid} to install its signal handlers", interval=0.001)
