# End-to-end: `dump --leave-running` of big processes takes a snapshot while they run:
# their memory is write-protected with a userfaultfd and copied before each first write
# (track/snapshot.py), so the tasks are stopped only while their state is collected.
# The workload rewrites all of its memory in a tight loop, writing a generation number
# into every page in order; the images must hold one moment of that loop (pages before
# the current one in the new generation, after it in the old one), and a restore must
# bring back a process whose own check of the same invariant passes.
import os
import re
import signal
import struct

import pytest

from conftest import dumped_pids, proc_status, reap_gone

pytestmark = pytest.mark.needs_tool
PAGE = 4096
MAGIC = 0x5245575249544552


def rewriter_image_state(images, pid):
    """Check the rewriter's memory in the images: (generation, index) of the moment
    they hold; fails naming the first page that does not belong to it."""
    from criu_py.images import PE_PRESENT, ImageDir, pagemap_nr_pages
    with ImageDir(images) as d:
        pm = d.read_entries(f"pagemap-{pid}.img")
        mm = d.read_one(f"mm-{pid}.img")
        fd = d.open_raw(f"pages-{pm[0].pages_id}.img")
    try:
        where, off = {}, 0
        for e in pm[1:]:
            n = pagemap_nr_pages(e)
            if e.flags & PE_PRESENT:
                for i in range(n):
                    where[e.vaddr + i * PAGE] = off + i * PAGE
                off += n * PAGE
        area = max(mm.vmas, key=lambda v: v.end - v.start)
        magic, state = struct.unpack("<QQ", os.pread(fd, 16, where[area.start]))
        assert magic == MAGIC
        gen, index = state >> 32, state & 0xFFFFFFFF
        pos, data = -1, b""
        for i in range(1, (area.end - area.start) // PAGE):
            at = where[area.start + i * PAGE]
            if not pos <= at < pos + len(data) - PAGE + 1:
                pos, data = at, os.pread(fd, 64 << 20, at)
            page = data[at - pos:at - pos + PAGE]
            new, old = struct.pack("<Q", gen << 32 | i), struct.pack("<Q", (gen - 1) << 32 | i)
            if i != index:
                ok = page == (new if i < index else old) * 512
            else:
                k = next((j for j in range(512) if page[8 * j:8 * j + 8] != new), 512)
                ok = page == new * k + old * (512 - k)
            assert ok, f"page {i}: {page[:8].hex()}..{page[-8:].hex()} is not of gen {gen} index {index}"
        return gen, index
    finally:
        os.close(fd)


def self_check(task, pid=None, timeout=60):
    pid = pid or task.pid
    pattern = rf"(OK|BAD) {pid} .*"
    before = len(task.log.matches(pattern))
    os.kill(pid, signal.SIGUSR1)
    return task.log.wait(pattern, timeout=timeout, count=before + 1).group(0)


def test_snapshot_of_a_512mib_rewriter_holds_the_freeze_point(h):
    task = h.start("rewriter", 512, 0, 2, ready=r"ready \d+")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--leave-running", "-v4", "-o", "dump.log")
    assert res.returncode == 0, res.stderr
    log = (images / "dump.log").read_text()
    assert re.search(r"snapshot: \d+ MiB copied in .* while the tree ran", log), log[-2000:]
    # the task ran on (and through the copy): still rewriting, its memory consistent
    assert proc_status(task.pid)["TracerPid"] == "0"
    assert self_check(task).startswith(f"OK {task.pid} ")
    gen, index = rewriter_image_state(images, task.pid)
    assert gen >= 1
    task.kill()
    reap_gone(dumped_pids(images))
    restored = h.restore(images, task=task)
    line = self_check(restored)
    assert line.startswith(f"OK {task.pid} "), line
    assert int(re.search(r"gen=(\d+)", line).group(1)) >= gen


def test_snapshot_of_a_tree_with_threads(h):
    # two rewriters (a parent and its child), each with one more thread writing
    task = h.start("rewriter", 48, 0, 1, 1, ready=None)
    task.log.wait(r"ready \d+", count=2)
    pids = sorted(int(m.group(1)) for m in task.log.matches(r"ready (\d+)"))
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--leave-running", "-v4", "-o", "dump.log")
    assert res.returncode == 0, res.stderr
    assert re.search(r"snapshot: 2 processes", (images / "dump.log").read_text())
    for pid in pids:
        rewriter_image_state(images, pid)
        assert self_check(task, pid).startswith(f"OK {pid} ")
    for pid in reversed(pids):
        os.kill(pid, signal.SIGKILL)
    task.reap()
    reap_gone(pids)
    h.restore(images, task=task)
    for pid in pids:
        assert self_check(task, pid).startswith(f"OK {pid} ")


def test_small_processes_are_copied_while_frozen(h):
    # below the snapshot threshold nothing changes: no userfaultfd, the copy is frozen
    task = h.start("rewriter", 4, 0, ready=r"ready \d+")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--leave-running", "-v4", "-o", "dump.log")
    assert res.returncode == 0, res.stderr
    assert "snapshot:" not in (images / "dump.log").read_text().replace("dump: snapshot:", "")
    rewriter_image_state(images, task.pid)


def test_a_dumper_killed_during_the_copy_leaves_the_task_running(h):
    task = h.start("rewriter", 512, 0, ready=r"ready \d+")
    images = h.images_dir()
    dumper = h.cli_background("dump", "-t", task.pid, "-D", images, "--leave-running", "-v4",
                              "-o", "dump.log")
    from conftest import wait_for
    log = images / "dump.log"
    wait_for(lambda: log.exists() and ("dump: snapshot: copy memory" in log.read_text()
                                       or dumper.poll() is not None),
             timeout=60, what="the snapshot copy to start")
    dumper.kill()
    dumper.wait()
    # its userfaultfd went with it: nothing waits, nothing is protected any more
    from conftest import wait_for
    wait_for(lambda: " uw" not in open(f"/proc/{task.pid}/smaps").read(), timeout=30,
             what="the write protection to go")
    assert proc_status(task.pid)["TracerPid"] == "0"
    assert self_check(task).startswith(f"OK {task.pid} ")


def test_a_refused_snapshot_leaves_the_task_untouched(h):
    # a big process with a netlink socket: refused once frozen, after its memory was already
    # write-protected for the snapshot; the protection goes with the refusal
    import subprocess
    import sys
    from conftest import Log, Task, assert_one_line_error, assert_running_untraced
    log = h.path("py.log")
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n"
            "buf = bytearray(64 << 20)\n"
            "open(sys.argv[1], 'w').write('ready\\n')\n"
            "i = 0\n"
            "while True:\n"
            "    buf[i % len(buf)] = 1\n"
            "    i += 4096\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(log)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    task = Task(p.pid, "socket.socket", Log(log), p)
    h.tasks.append(task)
    task.log.wait("ready")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images, "--leave-running", "-v4", "-o", "dump.log")
    assert_one_line_error(res, f"pid {task.pid}", "socket")
    assert "write-protected while running" in (images / "dump.log").read_text()
    assert_running_untraced(task)
    assert " uw" not in open(f"/proc/{task.pid}/smaps").read()
    assert not list(images.glob("*.img"))
