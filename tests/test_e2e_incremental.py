# End-to-end: pre-dump and incremental dumps through the real CLI. A process that keeps
# writing part of its memory is pre-dumped while it runs, then dumped with --track-mem
# --prev-images-dir: the last dump holds only the pages written in between (the rest are
# PE_PARENT entries of the parent images) and the restore follows the chain of parents.
# The workload checks every page of its memory against the version it wrote there, and
# the test reads the images to see how much was copied.
import os
import re
import signal
import time

import pytest

from conftest import (assert_one_line_error, assert_running_untraced, dumped_pids, fd_table,
                      proc_is_running, proc_status, reap_gone, tracking_holders)

pytestmark = pytest.mark.needs_tool
PAGE = os.sysconf("SC_PAGE_SIZE")
VERDICT = r"(OK|BAD) \d+.*"


def ask(task, timeout=120):
    """The workload's self-check: (verdict line, checksum or None, marker page version)."""
    before = len(task.log.matches(VERDICT))
    task.signal(signal.SIGUSR1)
    line = task.log.wait(VERDICT, timeout=timeout, count=before + 1).group(0)
    m = re.fullmatch(r"OK (\d+) ([0-9a-f]+) p7=(\d+)", line)
    assert m and int(m.group(1)) == task.pid, line
    return line, m.group(2), int(m.group(3))


def mark(task) -> int:
    """Have the workload write its marker page once more; the version it wrote."""
    before = len(task.log.matches(r"marked \d+"))
    task.signal(signal.SIGUSR2)
    return int(task.log.wait(r"marked (\d+)", count=before + 1).group(1))


def debian_crit(path):
    import json
    import subprocess
    from conftest import CRIT
    res = subprocess.run([CRIT, "decode", "--pretty", "-i", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, f"crit cannot decode {path}: {res.stderr[-500:]}"
    return json.loads(res.stdout)


def pre_dump(h, task, images, *extra):
    res = h.cli("pre-dump", "-t", task.pid, "-D", images, "-v4", "-o", "pre-dump.log", *extra)
    assert res.returncode == 0, (res.stderr, h._log_tail(images, "pre-dump.log"))
    return images


def pagemap_pages(images, pid):
    """(pages with data here, pages left in the parent) of pagemap-PID.img."""
    from criu_py.images import PE_PARENT, PE_PRESENT, ImageDir, pagemap_nr_pages
    with ImageDir(images) as d:
        entries = d.read_entries(f"pagemap-{pid}.img")[1:]
    present = sum(pagemap_nr_pages(e) for e in entries if e.flags & PE_PRESENT)
    parent = sum(pagemap_nr_pages(e) for e in entries if e.flags & PE_PARENT)
    return present, parent


def stats(images):
    from criu_py.images import ImageDir
    with ImageDir(images) as d:
        return d.read_one("stats-dump").dump


def test_predump_then_dump_of_1gib_writes_only_the_changed_pages(h):
    # 1 GiB, 1% of it rewritten per second
    task = h.start("dirtier", 1024, 10, ready=r"ready \d+")
    _, _, _ = ask(task)
    fds = fd_table(task.pid)
    d1 = pre_dump(h, task, h.images_dir("pre"))
    # the task runs on, untraced, with no fd of ours; its memory is tracked by a holder
    assert task.running() and proc_status(task.pid)["TracerPid"] == "0"
    assert fd_table(task.pid) == fds
    assert tracking_holders(h.dir), "no process keeps the tracking state"
    present, parent = pagemap_pages(d1, task.pid)
    assert present >= (1 << 30) // PAGE and parent == 0
    assert (d1 / "pages-1.img").stat().st_size == present * PAGE
    time.sleep(1)
    _, _, _ = ask(task)
    t0 = time.monotonic()
    d2 = h.dump(task, h.images_dir("dump"), "--track-mem", "--prev-images-dir", "../pre")
    elapsed = time.monotonic() - t0 + 3      # pre-dump copy, the sleep, the check: < 3 s
    assert os.readlink(d2 / "parent") == "../pre"
    present, parent = pagemap_pages(d2, task.pid)
    # about what the task wrote since the pre-dump froze it: 1%/s of 262144 pages
    assert 0 < present <= 2621 * elapsed + 512, present
    assert parent >= (1 << 30) // PAGE - present - 2621 * elapsed
    assert (d2 / "pages-1.img").stat().st_size == present * PAGE
    st = stats(d2)
    assert st.pages_written == present and st.pages_skipped_parent == parent
    restored = h.restore(d2, task=task)
    line, _, _ = ask(restored)
    assert line.startswith(f"OK {task.pid} ")


def test_chain_of_three_predumps_and_a_dump(h):
    task = h.start("dirtier", 64, 20, ready=r"ready \d+")
    dirs = [h.images_dir(f"c{i}") for i in range(1, 5)]
    versions = [mark(task)]
    pre_dump(h, task, dirs[0])
    for i in (1, 2):
        versions.append(mark(task))
        pre_dump(h, task, dirs[i], "--prev-images-dir", f"../c{i}")
    versions.append(mark(task))
    _, checksum, p7 = ask(task)
    assert p7 == versions[-1] == versions[0] + 3
    h.dump(task, dirs[3], "--track-mem", "--prev-images-dir", "../c3")
    for i, d in enumerate(dirs):
        present, parent = pagemap_pages(d, task.pid)
        assert present > 0 and (parent > present if i else parent == 0), (i, present, parent)
    # each tracking holder handed its state on and ended
    assert not tracking_holders(h.dir)
    # Debian's crit (CRIU 3.17) reads every image of the chain
    for d in dirs:
        for path in sorted(d.iterdir()):
            if path.name.startswith(("pages-", "criu-py-")):
                continue        # raw page data; our own checksum image (no upstream magic)
            if path.suffix == ".img" or path.name == "stats-dump":
                doc = debian_crit(path)
                if path.name.startswith("pagemap-") and d is not dirs[0]:
                    assert any(e.get("flags") == "PE_PARENT" for e in doc["entries"][1:]), path
    # crit follows the chain: every page is found, most of them in the parents
    res = h.cli("crit", "x", dirs[3], "mems")
    assert res.returncode == 0, res.stderr
    assert re.search(r"parent \d+ \(", res.stdout), res.stdout
    # make-lazy of the last dump: its pages in lazy VMAs go lazy wherever they live;
    # what stays in the parents keeps a parent link
    lazy = h.dir / "lazy"
    res = h.cli("crit", "make-lazy", dirs[3], lazy)
    assert res.returncode == 0, res.stderr
    assert (lazy / "parent").resolve() == dirs[2].resolve()
    res = h.cli("crit", "x", lazy, "rss")
    assert res.returncode == 0 and re.search(r"\d+ lazy", res.stdout), res.stdout
    restored = h.restore(dirs[3], task=task)
    line, _, p7 = ask(restored)
    assert p7 == versions[-1], line


def test_lost_tracking_state_falls_back_to_a_full_dump(h):
    task = h.start("dirtier", 64, 0, ready=r"ready \d+")
    pre_dump(h, task, h.images_dir("pre"))
    holders = tracking_holders(h.dir)
    assert len(holders) == 1
    os.kill(holders[0], signal.SIGKILL)          # the state is gone
    reap_gone(holders)
    images = h.images_dir("dump")
    res = h.cli("dump", "-t", task.pid, "-D", images, "--track-mem", "--prev-images-dir",
                "../pre", "-v2")
    assert res.returncode == 0, res.stderr
    assert "no memory tracking state" in res.stderr and "all pages" in res.stderr, res.stderr
    task.reap()
    reap_gone(dumped_pids(images))
    present, parent = pagemap_pages(images, task.pid)
    assert parent == 0 and present >= (64 << 20) // PAGE
    restored = h.restore(images, task=task)
    assert ask(restored)[0].startswith(f"OK {task.pid} ")


def test_a_task_that_execs_is_not_tracked_any_more(h):
    task = h.start("dirtier", 64, 0, ready=r"ready \d+")
    pre_dump(h, task, h.images_dir("pre"))
    task.signal(signal.SIGHUP)                   # execs itself: a new address space
    task.log.wait(r"ready \d+", count=2)
    images = h.images_dir("dump")
    res = h.cli("dump", "-t", task.pid, "-D", images, "--track-mem", "--prev-images-dir",
                "../pre", "-v2")
    assert res.returncode == 0, res.stderr
    assert f"pid {task.pid}: memory tracking lost" in res.stderr, res.stderr
    task.reap()
    reap_gone(dumped_pids(images))
    present, parent = pagemap_pages(images, task.pid)
    assert parent == 0 and present >= (64 << 20) // PAGE
    restored = h.restore(images, task=task)
    assert ask(restored)[0].startswith(f"OK {task.pid} ")


def test_predump_of_a_tree_with_threads(h):
    # a parent with children, one of them with threads: every process is pre-dumped
    task = h.start("spawner", 3, 3, ready=r"ready \d+")
    pids = [task.pid] + sorted(int(p) for p in _children(task.pid))
    d1 = pre_dump(h, task, h.images_dir("pre"))
    for pid in pids:
        assert (d1 / f"pagemap-{pid}.img").exists(), pid
    time.sleep(0.3)
    d2 = h.dump(task, h.images_dir("dump"), "--track-mem", "--prev-images-dir", "../pre")
    for pid in dumped_pids(d2):
        present, parent = pagemap_pages(d2, pid)
        assert parent > 0, pid
    h.restore(d2, task=task)
    for pid in pids:
        assert proc_status(pid) is not None, pid


def _children(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += f.read().split()
    return out


def test_dump_with_track_mem_then_an_incremental_dump(h):
    # CRIU's other way: a full dump that leaves the task running and starts tracking,
    # then dumps with that one as parent
    task = h.start("dirtier", 64, 20, ready=r"ready \d+")
    first = h.dump(task, h.images_dir("first"), "--track-mem", leave_running=True)
    assert task.running() and tracking_holders(h.dir)
    present, parent = pagemap_pages(first, task.pid)
    assert present >= (64 << 20) // PAGE and parent == 0
    version = mark(task)
    second = h.dump(task, h.images_dir("second"), "--track-mem", "--prev-images-dir", "../first")
    present, parent = pagemap_pages(second, task.pid)
    assert 0 < present < parent
    restored = h.restore(second, task=task)
    assert ask(restored)[2] == version


def test_shared_memory_is_dumped_whole_in_an_incremental_dump(h):
    # shared anonymous memory, a memfd and private file pages: the private pages are
    # incremental, the shared objects whole; the task checks all of it after restore
    task = h.start("shmem", h.path("mapped.data"), 0x5EED1234)
    pre_dump(h, task, h.images_dir("pre"))
    images = h.dump(task, h.images_dir("dump"), "--track-mem", "--prev-images-dir", "../pre")
    from criu_py.images import PE_PARENT, ImageDir
    with ImageDir(images) as d:
        shmem = [n for n in d.list() if n.startswith("pagemap-shmem-")]
        assert shmem
        for name in shmem:
            assert not any(e.flags & PE_PARENT for e in d.read_entries(name)[1:]), name
    assert pagemap_pages(images, task.pid)[1] > 0
    restored = h.restore(images, task=task)
    n = len(task.log.matches(r"(OK|BAD) .*"))
    restored.signal(signal.SIGUSR1)
    assert task.log.wait(r"(OK|BAD) .*", count=n + 1).group(0) == f"OK {task.pid}"


def test_a_damaged_parent_fails_the_restore_before_anything_starts(h):
    # pre-dumps are sealed like dumps; restore checks every dir of the chain first
    task = h.start("dirtier", 16, 0, ready=r"ready \d+")
    pre = pre_dump(h, task, h.images_dir("pre"))
    mark(task)
    top = h.dump(task, h.images_dir("dump"), "--track-mem", "--prev-images-dir", "../pre")
    pages = pre / "pages-1.img"
    with open(pages, "r+b") as f:
        f.seek(5 * PAGE)
        byte = f.read(1)
        f.seek(5 * PAGE)
        f.write(bytes([byte[0] ^ 0xff]))
    res = h.cli("restore", "-D", top, "-d")
    assert_one_line_error(res, "/pre/pages-1.img", "damaged page run")
    assert not proc_is_running(task.pid), "a failed restore left the task behind"


def test_bad_prev_images_dir_is_one_line_and_leaves_the_task_alone(h):
    task = h.start("dirtier", 8, 0, ready=r"ready \d+")
    images = h.images_dir("dump")
    res = h.cli("pre-dump", "-t", task.pid, "-D", images, "--prev-images-dir", "../nowhere")
    assert_one_line_error(res, "--prev-images-dir", "nowhere")
    assert_running_untraced(task)
    assert not list(images.glob("*.img"))


def test_check_names_the_tracking_method(h):
    res = h.cli("check", "--feature", "mem_dirty_track")
    assert res.returncode == 0, res.stderr
    assert re.search(r"mem_dirty_track is supported: (uffd-wp|soft-dirty)", res.stdout), res.stdout
