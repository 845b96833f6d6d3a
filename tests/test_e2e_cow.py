# Memory a tree shares copy-on-write stays shared after a restore: 16 children share
# 256 MiB with their parent; after the restore the tree's total Pss is what it was (not
# 17 copies), every process still holds exactly its own contents (checked by the
# processes themselves), and the pages a child wrote after the fork are its own again.
import signal

from conftest import wait_for


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError(f"no Pss for {pid}")


def test_cow_memory_stays_shared_across_the_tree(h):
    task = h.start("cow", 256, 16, ready=r"family .*", log_name="cow.log")
    family = [int(x) for x in task.log.matches(r"family (.*)")[0].group(1).split()]
    assert len(family) == 17
    before = sum(pss_kib(p) for p in family)
    assert before < 2 * 256 * 1024, f"the workload does not share its memory ({before} KiB)"
    h.checkpoint_restore(task)
    after = sum(pss_kib(p) for p in family)
    assert after <= 1.1 * before, f"Pss {before} KiB before, {after} KiB after the restore"
    for pid in family:
        signal_and_expect(task, pid)


def signal_and_expect(task, pid):
    import os
    n = len(task.log.matches(rf"(OK|BAD) {pid}.*"))
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: len(task.log.matches(rf"(OK|BAD) {pid}.*")) > n, timeout=30,
             what=f"{pid} to check its memory")
    line = task.log.matches(rf"(OK|BAD) {pid}.*")[-1].group(0)
    assert line == f"OK {pid}", line
