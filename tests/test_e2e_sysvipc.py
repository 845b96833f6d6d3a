# End-to-end: SysV shared memory in our IPC namespace (tests/workloads/sysvshm.c): a
# segment removed while attached (it ends with the dumped tree and is made again from
# the images, removed again once attached) and a keyed one that outlives the tree (found
# again as it is), attached by a process and its child: after restore both processes
# see both at the same addresses with their contents, and still share them.
import os
import random
import signal
import subprocess

import pytest

pytestmark = pytest.mark.needs_tool


def segments() -> dict:
    with open("/proc/sysvipc/shm") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return {int(r[1]): (int(r[0]), int(r[2], 8), int(r[3])) for r in rows}


def maps_of(pid: int) -> list:
    with open(f"/proc/{pid}/maps") as f:
        return sorted(" ".join(line.split()[:2] + line.split()[5:]) for line in f if "/SYSV" in line)


def sysv_vmas(images, pid: int) -> set:
    """The segment ids of the SysV VMAs of mm-PID.img, each encoded as upstream encodes
    one (shared anonymous memory with the SYSVIPC bit, MAP_SHARED | MAP_ANONYMOUS)."""
    from criu_py import mem as M
    from criu_py.images import ImageDir
    with ImageDir(images) as d:
        vmas = [v for v in d.read_one(f"mm-{pid}.img").vmas if v.status & M.VMA_AREA_SYSVIPC]
    for v in vmas:
        assert v.status == M.VMA_AREA_REGULAR | M.VMA_ANON_SHARED | M.VMA_AREA_SYSVIPC
        assert v.flags == M.MAP_SHARED | M.MAP_ANONYMOUS
    return {v.shmid for v in vmas}


def test_sysv_shm_segments(h):
    key = random.randrange(0x10000000, 0x7FFFFFFF)
    task = h.start("sysvshm", hex(key), ready=r"ready .*")
    fields = task.log.matches(r"ready .*")[0].group(0).split()
    pid, child, ida, idb = (int(x) for x in fields[1:4] + fields[5:6])
    try:
        seg = segments()
        assert seg[ida][0] == 0 and seg[ida][1] & 0o1000 and seg[idb][0] == key
        maps = {p: maps_of(p) for p in (pid, child)}
        assert len(maps[pid]) == 2 and maps[pid] == maps[child]
        images = h.dump(task)
        if not h.no_cr:
            assert sysv_vmas(images, pid) == {ida, idb}
        seg = segments()
        assert ida not in seg and idb in seg, "A ends with the tree, B outlives it"
        restored = h.restore(images, task=task)
        assert {p: maps_of(p) for p in (pid, child)} == maps, "attach addresses changed"
        seg = segments()
        assert seg[ida][0] == 0 and seg[ida][1] & 0o1000, "A is not removed again"
        assert seg[idb][0] == key
        restored.signal(signal.SIGUSR1)
        task.log.wait(rf"check {pid} A=ok B=B before the dump")
        os.kill(child, signal.SIGUSR1)
        task.log.wait(rf"check {child} A=ok B=B written by {pid}")   # still shared
    finally:
        subprocess.run(["ipcrm", "-m", str(idb)], capture_output=True)


@pytest.mark.parametrize("gone", [True, False], ids=["removed-meanwhile", "still-there"])
def test_sysv_semaphores_and_queues(h, gone):
    semkey, msgkey = random.randrange(0x10000000, 0x7FFFFFFF), random.randrange(0x10000000, 0x7FFFFFFF)
    task = h.start("sysvobj", hex(semkey), hex(msgkey), ready=r"ready .*")
    pid, semid, msqid = (int(x) for x in task.log.matches(r"ready (\d+) (\d+) (\d+)")[0].groups())
    try:
        images = h.dump(task)
        if gone:      # as after a reboot: made again from the images, same ids and keys
            subprocess.run(["ipcrm", "-s", str(semid), "-q", str(msqid)], check=True)
        else:         # still there, used as it is now: one message was taken meanwhile
            subprocess.run(["python3", "-c", "import ctypes; l = ctypes.CDLL(None); "
                            f"b = ctypes.create_string_buffer(72); l.msgrcv({msqid}, b, 64, 1, 0o4000)"],
                           check=True)
        restored = h.restore(images, task=task)
        restored.signal(signal.SIGUSR1)
        m = task.log.wait(rf"check {pid} sem=(\S+) msg=(\S*)")
        assert m.group(1) == "1,5,9"
        assert m.group(2) == ("1:alpha,2:beta," if gone else "2:beta,")
        with open("/proc/sysvipc/sem") as f:
            assert any(line.split()[:2] == [str(semkey), str(semid)] for line in f)
    finally:
        subprocess.run(["ipcrm", "-s", str(semid), "-q", str(msqid)], capture_output=True)
