# End-to-end: --display-stats and the stats images. dump and restore print CRIU's summary
# on stdout (upstream's lines, in its order), with the numbers of the stats-dump and
# stats-restore images they write as CRIU does; the restore's count of copy-on-write
# pages compared and kept shared is that of a real tree. stats-restore lands in the
# images dir (the default work dir) and is no damage: the same images restore again.
import re

import pytest

from conftest import Task, wait_for

DUMP_LINES = ["Displaying dump stats:", r"Freezing time: (\d+) us", r"Frozen time: (\d+) us",
              r"Memory dump time: (\d+) us", r"Memory write time: (\d+) us",
              r"IRMAP resolve time: (\d+) us", r"Memory pages scanned: (\d+) \(0x[0-9a-f]+\)",
              r"Memory pages skipped from parent: (\d+) \(0x[0-9a-f]+\)",
              r"Memory pages written: (\d+) \(0x[0-9a-f]+\)",
              r"Lazy memory pages: (\d+) \(0x[0-9a-f]+\)"]
RESTORE_LINES = ["Displaying restore stats:", r"Pages compared: (\d+) \(0x[0-9a-f]+\)",
                 r"Pages skipped COW: (\d+) \(0x[0-9a-f]+\)",
                 r"Pages restored: (\d+) \(0x[0-9a-f]+\)", r"Restore time: (\d+) us",
                 r"Forking time: (\d+) us"]


def summary(stdout: str, patterns: list[str]) -> list[int]:
    """The numbers of the summary, which must be exactly these lines."""
    lines = stdout.splitlines()
    assert len(lines) == len(patterns), lines
    numbers = []
    for line, pattern in zip(lines, patterns):
        m = re.fullmatch(pattern, line)
        assert m, (line, pattern)
        if m.groups():
            numbers.append(int(m.group(1)))
            hexa = re.search(r"\(0x([0-9a-f]+)\)", line)
            assert hexa is None or int(hexa.group(1), 16) == numbers[-1], line
    return numbers


def read_stats(path):
    from criu_py.images import ImageDir
    with ImageDir(path.parent) as d:
        return d.read_one(path.name)


def restore(h, images, task, *extra):
    restored = Task(task.pid, task.marker, task.log)
    h.tasks.append(restored)
    res = h.cli("restore", "-D", images, "-d", "--display-stats", *extra)
    assert res.returncode == 0, res.stderr
    assert restored.running()
    return res, restored


def test_dump_and_restore_display_stats(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--display-stats")
    assert res.returncode == 0, res.stderr
    task.reap()
    numbers = summary(res.stdout, DUMP_LINES)
    d = read_stats(images / "stats-dump").dump
    assert numbers == [d.freezing_time, d.frozen_time, d.memdump_time, d.memwrite_time,
                       d.irmap_resolve, d.pages_scanned, d.pages_skipped_parent,
                       d.pages_written, d.pages_lazy]
    assert d.frozen_time > 0 and d.pages_written > 0
    res, restored = restore(h, images, task)
    numbers = summary(res.stdout, RESTORE_LINES)
    r = read_stats(images / "stats-restore").restore
    assert numbers == [r.pages_compared, r.pages_skipped_cow, r.pages_restored,
                       r.restore_time, r.forking_time]
    # every page written comes back, but the vdso's (the live vdso replaces them)
    assert 0 < d.pages_written - r.pages_restored <= 4, (d.pages_written, r.pages_restored)
    assert 0 < r.forking_time < r.restore_time
    last = int(task.log.lines()[-1].split()[1])
    task.log.wait(rf"{task.pid} {last + 2}")
    # the same images again, stats-restore beside them
    restored.kill()
    res, restored = restore(h, images, task)
    task.log.wait(rf"{task.pid} {last + 2}", count=2)


def test_restore_stats_count_shared_pages(h):
    """64 MiB shared copy-on-write with 2 children, each of which wrote 16 pages of its
    own: the restore compares each child's 16384 pages and keeps the rest shared."""
    task = h.start("cow", 64, 2, ready=r"family .*", log_name="cow.log")
    images = h.dump(task)
    res, _ = restore(h, images, task)
    compared, kept, restored = summary(res.stdout, RESTORE_LINES)[:3]
    pages = 64 * 256
    assert 2 * pages <= compared < 2 * pages + 256, compared     # (and their stacks, heaps)
    assert 2 * (pages - 16) - 64 <= kept <= compared - 2 * 16, (compared, kept)
    assert restored >= 3 * pages


@pytest.mark.parametrize("command", ["pre-dump", "dump --leave-running"])
def test_pre_dump_and_leave_running_display_stats(h, command):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.images_dir()
    res = h.cli(*command.split(), "-t", task.pid, "-D", images, "--display-stats")
    assert res.returncode == 0, res.stderr
    summary(res.stdout, DUMP_LINES)
    wait_for(task.running, timeout=2, what="the task to run on")
