# Unit tests of incremental images: chains of parent image dirs (mem/chain.py), the
# restore's page sources across them (mem/restore.plan_pages) and the tracking holder's
# protocol (track/holder.py), on synthesized images and small processes.
import os
import socket
import subprocess
import time

import pytest

from criu_py.errors import ImageError
from criu_py.images import PE_PARENT, PE_PRESENT, ImageDir, set_pagemap_nr_pages
from criu_py.images.pb import pagemap_pb2, vma_pb2
from criu_py.mem import chain
from criu_py.mem.restore import MemoryPlan, plan_pages

PAGE = os.sysconf("SC_PAGE_SIZE")
B = 0x7f0000000000


def write_level(path, pid, entries, pages_id=1, parent=None):
    """A dir with pagemap-PID.img of (first page, pages, flags) and the pages file
    (page k of address B + k*PAGE holds bytes of value (k, level) so reads can be told
    apart)."""
    path.mkdir(exist_ok=True)
    d = ImageDir(path)
    head = pagemap_pb2.pagemap_head()
    head.pages_id = pages_id
    msgs, data = [head], b""
    for first, n, flags in entries:
        pe = pagemap_pb2.pagemap_entry()
        pe.vaddr = B + first * PAGE
        set_pagemap_nr_pages(pe, n)
        pe.flags = flags
        msgs.append(pe)
        if flags & PE_PRESENT:
            for k in range(first, first + n):
                data += bytes([k % 251, len(path.name)]) * (PAGE // 2)
    d.write_entries(f"pagemap-{pid}.img", msgs)
    d.write_bytes(f"pages-{pages_id}.img", data)
    if parent:
        os.symlink(parent, path / "parent")
    return d


def test_chain_resolves_pages_through_three_levels(tmp_path):
    write_level(tmp_path / "a", 7, [(0, 8, PE_PRESENT)])
    write_level(tmp_path / "bb", 7, [(0, 2, PE_PARENT), (2, 2, PE_PRESENT), (4, 4, PE_PARENT)],
                parent="../a")
    top = write_level(tmp_path / "ccc", 7, [(0, 3, PE_PARENT), (3, 1, PE_PRESENT),
                                            (4, 4, PE_PARENT)], parent="../bb")
    dirs = chain.open_chain(top)
    try:
        assert [os.path.basename(d.dirpath) for d in dirs] == ["ccc", "bb", "a"]
        c = chain.Chain(dirs, "pagemap-7.img", PAGE)
        got = c.resolve(B, B + 8 * PAGE)
        # pages 0-1 from a, 2 from bb (its second page file position 0..), 4-7 from a
        assert [(lo - B) // PAGE for lo, _, _, _ in got] == [0, 2, 4]
        assert [d for _, _, d, _ in got] == [2, 1, 2]
        assert got[1][3] == 0 and got[2][3] == 4 * PAGE
        assert c.level(1).covered(B, B + 8 * PAGE)
        assert not c.level(1).covered(B, B + 9 * PAGE)
    finally:
        chain.close_chain(dirs)


def test_plan_pages_reads_parents_in_file_order(tmp_path):
    write_level(tmp_path / "a", 7, [(0, 8, PE_PRESENT)])
    top = write_level(tmp_path / "b", 7, [(0, 2, PE_PRESENT), (2, 6, PE_PARENT)], parent="../a")
    vma = vma_pb2.vma_entry(start=B, end=B + 8 * PAGE, pgoff=0, shmid=0, prot=3, flags=0x22,
                            status=(1 << 0) | (1 << 9), fd=-1)
    dirs = chain.open_chain(top)
    try:
        plan = MemoryPlan(vmas=[vma])
        plan_pages(top, 7, plan, dirs)
        assert plan.iovs == [(B, 2 * PAGE)]
        assert len(plan.sources) == 2
        parent = plan.sources[1]
        # the parent's file: skip its first two pages, then six pages into place
        assert parent.iovs == [(None, 2 * PAGE), (B + 2 * PAGE, 6 * PAGE)]
        assert sorted(plan.filled()) == [(B, 2 * PAGE), (B + 2 * PAGE, 6 * PAGE)]
    finally:
        chain.close_chain(dirs)


def test_missing_parent_pages_are_an_image_error(tmp_path):
    write_level(tmp_path / "a", 7, [(0, 2, PE_PRESENT)])
    top = write_level(tmp_path / "b", 7, [(0, 4, PE_PARENT)], parent="../a")
    vma = vma_pb2.vma_entry(start=B, end=B + 8 * PAGE, pgoff=0, shmid=0, prot=3, flags=0x22,
                            status=(1 << 0) | (1 << 9), fd=-1)
    dirs = chain.open_chain(top)
    try:
        with pytest.raises(ImageError, match="no pages for"):
            plan_pages(top, 7, MemoryPlan(vmas=[vma]), dirs)
    finally:
        chain.close_chain(dirs)
    lonely = write_level(tmp_path / "c", 7, [(0, 4, PE_PARENT)])
    with pytest.raises(ImageError, match="has no parent link"):
        plan_pages(lonely, 7, MemoryPlan(vmas=[vma]), [lonely])


def test_parent_loops_are_refused(tmp_path):
    write_level(tmp_path / "a", 7, [(0, 1, PE_PRESENT)], parent="../b")
    b = write_level(tmp_path / "b", 7, [(0, 1, PE_PARENT)], parent="../a")
    with pytest.raises(ImageError, match="loops"):
        chain.open_chain(b)


def test_a_short_parent_pages_file_is_an_image_error(tmp_path):
    a = write_level(tmp_path / "a", 7, [(0, 4, PE_PRESENT)])
    os.truncate(a.path("pages-1.img"), PAGE)
    top = write_level(tmp_path / "b", 7, [(0, 4, PE_PARENT)], parent="../a")
    dirs = chain.open_chain(top)
    try:
        with pytest.raises(ImageError, match="holds 4096 bytes"):
            chain.Chain(dirs, "pagemap-7.img", PAGE).resolve(B, B + PAGE)
    finally:
        chain.close_chain(dirs)


# ---------------------------------------------------------------- the tracking holder
def test_holder_serves_keeps_and_hands_over(tmp_path):
    from criu_py.track import TrackedMm
    from criu_py.track import client, holder
    task = subprocess.Popen(["sleep", "60"])
    spawned = None
    try:
        mm = TrackedMm(task.pid, 123, uffd=os.eventfd(0),
                       pagemap_fd=os.open(f"/proc/{task.pid}/pagemap", os.O_RDONLY),
                       pidfd=os.pidfd_open(task.pid))
        st = os.stat(tmp_path)
        state = {"dir": [st.st_dev, st.st_ino], "uptime": 42, "method": "uffd-wp",
                 "path": str(tmp_path)}
        spawned = client.start_holder(state, [mm])
        mm.close()
        lease = client.take(str(tmp_path))
        assert lease is not None and lease.state["uptime"] == 42
        assert set(lease.mms) == {task.pid} and lease.mms[task.pid].start == 123
        for m in lease.mms.values():
            m.close()
        lease.keep()                                    # it serves on
        lease = client.take(str(tmp_path))
        assert lease is not None
        for m in lease.mms.values():
            m.close()
        lease.release()                                 # and now it is done
        os.waitpid(spawned, 0)
        spawned = None
        assert client.take(str(tmp_path)) is None
    finally:
        task.kill()
        task.wait()
        if spawned:
            os.kill(spawned, 9)
            os.waitpid(spawned, 0)


def test_holder_ends_when_its_task_exits(tmp_path):
    from criu_py.track import TrackedMm
    from criu_py.track import client
    task = subprocess.Popen(["sleep", "60"])
    mm = TrackedMm(task.pid, 1, uffd=os.eventfd(0),
                   pagemap_fd=os.open(f"/proc/{task.pid}/pagemap", os.O_RDONLY),
                   pidfd=os.pidfd_open(task.pid))
    st = os.stat(tmp_path)
    pid = client.start_holder({"dir": [st.st_dev, st.st_ino], "uptime": 1, "method": "uffd-wp",
                               "path": str(tmp_path)}, [mm])
    mm.close()
    task.kill()
    task.wait()
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG)[0] != pid:
        assert time.monotonic() < deadline, "the holder outlived its task"
        time.sleep(0.02)


def test_holder_refuses_peers_of_other_users():
    from criu_py.track import holder
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert holder.peer_uid(a) == os.geteuid()
