# Process trees through the real CLI: every process of the tree comes back with its PID,
# parent, process group and session (including a group and a session whose leaders had
# exited, and a second session), a zombie comes back as a zombie its parent can still
# reap with the same status, and every live process's memory goes on from where it was.
import os
import signal
import time

from conftest import wait_for


def tree_of(root: int) -> dict:
    """{pid: (ppid, pgid, sid, state)} for the root and every descendant."""
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[1]), int(fields[2]), int(fields[3]), fields[0].replace("S", "R"))
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
            except OSError:
                pass
    return out


def last_ticks(log) -> dict:
    out = {}
    for m in log.matches(r"tick (\d+) (\d+)"):
        out[int(m.group(1))] = int(m.group(2))
    return out


def test_forest_comes_back_with_groups_sessions_and_zombie(h):
    task = h.start("forest", ready=r"ready \d+")
    before = tree_of(task.pid)
    assert len(before) >= 20
    zombies = [p for p, v in before.items() if v[3] == "Z"]
    assert len(zombies) == 1
    sessions = {v[2] for v in before.values()}
    assert len(sessions) >= 3                      # R's, A3's and the orphaned one
    assert any(pgid not in before for _, pgid, _, _ in before.values()), "no leaderless group"
    time.sleep(0.25)
    restored = h.checkpoint_restore(task)
    ticks_at_dump = last_ticks(task.log)
    after = tree_of(task.pid)
    ppid_of_root = after[task.pid][0]
    before[task.pid] = (ppid_of_root,) + before[task.pid][1:]
    assert after == before
    # every live process keeps counting from its dumped count
    live = [p for p, v in before.items() if v[3] != "Z"]
    n = len(task.log)
    wait_for(lambda: all(last_ticks(task.log).get(p, 0) > ticks_at_dump[p] + 1 for p in live),
             timeout=10, what="every process to tick twice more")
    firsts = {}
    for line in task.log.lines()[n:]:
        parts = line.split()
        if parts[0] == "tick" and int(parts[1]) not in firsts:
            firsts[int(parts[1])] = int(parts[2])
    assert all(firsts[p] == ticks_at_dump[p] + 1 for p in live), (firsts, ticks_at_dump)
    # the zombie's parent can still reap it, with the dumped status
    zpid = zombies[0]
    os.kill(before[zpid][0], signal.SIGUSR2)
    assert task.log.wait(rf"reaped {zpid} (\d+)").group(1) == "7"
