# Process trees through the real CLI: every process of the tree comes back with its PID,
# parent, process group and session (including a group and a session whose leaders had
# exited, and a second session), a zombie comes back as a zombie its parent can still
# reap with the same status, and every live process's memory goes on from where it was.
import os
import signal
import subprocess
import time

import pytest

from conftest import Log, Task, descendants, dumped_pids, proc_status, reap_gone, wait_for


def tree_of(root: int) -> dict:
    """{pid: (ppid, pgid, sid, state)} for the root and every descendant."""
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat", errors="surrogateescape") as f:
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


def test_bash_loop_with_a_sleep_child(h):
    # A shell script as a user would checkpoint it: at dump time bash waits for its
    # `sleep` child; after restore both are back and the loop counts on in bash's memory.
    log = h.path("bash.log")
    script = f'i=0; while :; do i=$((i+1)); echo "tick $$ $i" >> {log}; sleep 0.1; done'
    p = subprocess.Popen(["bash", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=h.dir)
    task = Task(p.pid, script[:20], Log(log), p)
    h.tasks.append(task)
    task.log.wait(rf"tick {p.pid} 3")
    def sleeping_child():
        kids = descendants(p.pid)
        try:
            return kids if open(f"/proc/{kids[0]}/comm").read().strip() == "sleep" else None
        except (IndexError, OSError):
            return None
    kids = wait_for(sleeping_child, what="bash's sleep child")
    before = tree_of(p.pid)
    restored = h.checkpoint_restore(task)
    dumped = int(task.log.lines()[-1].split()[2])
    after = tree_of(p.pid)
    if kids[0] in after:           # the sleep child may have finished meanwhile
        assert after[kids[0]][:3] == before[kids[0]][:3]
    task.log.wait(rf"tick {p.pid} {dumped + 3}")
    ticks = [int(line.split()[2]) for line in task.log.lines()]
    assert ticks == list(range(1, len(ticks) + 1)), ticks
    assert restored.running()


def kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(312, pid1, pid2, kind, idx1, idx2)


KCMP_FILE, KCMP_FILES, KCMP_FS = 0, 2, 3


def fdinfo(pid: int, fd: int) -> dict:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in f if ":" in line))


def sharing_facts(r, c1, c2, c3, file_fd, prd, pwr, q, q2) -> dict:
    return {
        "file shared with C1": kcmp(r, c1, KCMP_FILE, file_fd, file_fd) == 0,
        "pipe ends shared with C1": (kcmp(r, c1, KCMP_FILE, prd, prd), kcmp(r, c1, KCMP_FILE, pwr, pwr)) == (0, 0),
        "one offset": fdinfo(r, file_fd)["pos"] == fdinfo(c1, file_fd)["pos"],
        "two descriptions of one pipe": kcmp(r, r, KCMP_FILE, q, q2) != 0
        and os.stat(f"/proc/{r}/fd/{q}").st_ino == os.stat(f"/proc/{r}/fd/{q2}").st_ino,
        "their flags": (int(fdinfo(r, q)["flags"], 8) & os.O_NONBLOCK,
                        int(fdinfo(r, q2)["flags"], 8) & os.O_NONBLOCK),
        "pipe read end nonblocking (set by C1)": int(fdinfo(r, prd)["flags"], 8) & os.O_NONBLOCK,
        "C2 shares the fd table": kcmp(r, c2, KCMP_FILES) == 0,
        "C1 has its own fd table": kcmp(r, c1, KCMP_FILES) != 0,
        "C3 shares the fs": kcmp(r, c3, KCMP_FS) == 0,
        "C1 has its own fs": kcmp(r, c1, KCMP_FS) != 0,
    }


def test_shared_fd_table_fs_descriptions_and_offsets(h):
    shared_file = h.path("shared.txt")
    task = h.start("sharing", shared_file, ready=r"ready .*")
    ids = [int(x) for x in task.log.matches(r"ready (.*)")[0].group(1).split()]
    r, c1, c2, c3 = ids[:4]
    before = sharing_facts(*ids)
    assert before["their flags"] == (0, os.O_NONBLOCK) and all(
        v for k, v in before.items() if k != "their flags"), before
    h.checkpoint_restore(task)
    after = sharing_facts(*ids)
    assert after == before
    assert after["their flags"] == (0, os.O_NONBLOCK) and all(
        v for k, v in after.items() if k != "their flags"), after
    # still one table, one fs: what C2 opens shows in R, where C3 goes R is
    n = len(task.log)
    os.kill(c2, signal.SIGUSR1)
    fd = int(task.log.wait(rf"opened {c2} (\d+)").group(1))
    assert os.readlink(f"/proc/{r}/fd/{fd}") == "/dev/zero"
    os.kill(c3, signal.SIGUSR1)
    task.log.wait(rf"chdir {c3} 0")
    assert os.readlink(f"/proc/{r}/cwd") == "/"
    wait_for(lambda: all(len(task.log.matches(rf"tick {p} .*")) > 2 for p in (r, c1, c2, c3))
             and len(task.log) > n + 12, what="all four to tick on")
    assert not task.log.matches(r"BAD .*"), task.log.matches(r"BAD .*")[0].group(0)
    lines = shared_file.read_text().splitlines()
    assert all(line.split()[0] in ("r", "c") for line in lines), "the shared offset was lost"
    for who in ("r", "c"):
        nums = [int(line.split()[1]) for line in lines if line.startswith(who)]
        assert nums == list(range(1, len(nums) + 1))


def creds_of(pid: int, tid: int | None = None) -> dict:
    st = proc_status(pid) if tid is None else \
        dict(line.split(":", 1) for line in open(f"/proc/{pid}/task/{tid}/status").read().splitlines())
    keys = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")
    return {k: " ".join(st[k].split()) for k in keys}


def test_each_task_and_thread_keeps_its_credentials(h):
    task = h.start("creds", ready=r"ready .*")
    r, u, c, t, tt = (int(x) for x in task.log.matches(r"ready (.*)")[0].group(1).split())
    who = {"root": (r, None), "unprivileged": (u, None), "capped": (c, None), "threaded": (t, None),
           "thread with uid 3000": (t, tt)}
    before = {name: creds_of(*ids) for name, ids in who.items()}
    assert before["unprivileged"]["Uid"] == "1000 1001 1002 1001"      # fsuid follows euid
    assert before["thread with uid 3000"]["Uid"] == "3000 3000 3000 3000" != before["threaded"]["Uid"]
    extra = lambda pid: (open(f"/proc/{pid}/personality").read(),   # noqa: E731
                         open(f"/proc/{pid}/status").read().count("\n"),
                         os.stat(f"/proc/{pid}").st_uid)            # non-dumpable: owned by root
    before_extra = {p: extra(p) for p in (r, u, c)}
    h.checkpoint_restore(task)
    assert {name: creds_of(*ids) for name, ids in who.items()} == before
    assert {p: extra(p) for p in (r, u, c)} == before_extra
    n = len(task.log)
    wait_for(lambda: all(len(task.log.matches(rf"tick {p} .*")) > 2 for p in (r, u, c, t))
             and len(task.log) > n + 8, what="every task to tick on")


def test_pid_taken_during_the_restore_kills_every_created_task(h):
    task = h.start("forest", ready=r"ready \d+")
    before = tree_of(task.pid)
    images = h.dump(task)
    deepest = max(before, key=lambda p: (len(list(_ancestors(before, p))), p))
    assert len(list(_ancestors(before, deepest))) >= 3
    env = dict(os.environ, CRIU_PY_TEST_TAKE_PID=str(deepest))
    res = subprocess.run(h.cli_argv("restore", "-D", images, "-d", "-o", "restore.log", "-v4"),
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {deepest} is in use" in lines[0], res.stderr
    # nothing of the tree is left, not even the process that took the PID
    wait_for(lambda: not [p for p in before if os.path.exists(f"/proc/{p}")], timeout=5,
             what="every task the restore created to be gone")
    # and the images still restore
    restored = h.restore(images, task=task)
    assert tree_of(task.pid).keys() == before.keys()
    assert restored.running()


def _ancestors(tree: dict, pid: int):
    while pid in tree and tree[pid][0] in tree:
        pid = tree[pid][0]
        yield pid


def test_vfork_child_runs_in_its_parents_memory_and_the_parent_waits(h):
    task = h.start("vfork", ready=r"ready .*")
    r, hp, v = (int(x) for x in task.log.matches(r"ready (.*)")[0].group(1).split())
    assert tree_of(task.pid)[hp][3] == "D"                   # asleep in vfork()
    assert kcmp(hp, v, 1) == 0                               # KCMP_VM: one mm
    task.log.wait(rf"tick {v} .*", count=3)
    h.checkpoint_restore(task)
    at_dump = last_ticks(task.log)[v]
    after = tree_of(task.pid)
    assert after[hp][3] == "D" and after[v][0] == hp and kcmp(hp, v, 1) == 0
    n = len(task.log)
    task.log.wait(rf"tick {v} .*", count=len(task.log.matches(rf"tick {v} .*")) + 2)
    firsts = [int(line.split()[2]) for line in task.log.lines()[n:] if line.startswith(f"tick {v} ")]
    assert firsts[0] == at_dump + 1, (at_dump, firsts)      # its count, in the shared memory
    os.kill(v, signal.SIGUSR1)
    assert task.log.wait(rf"back {hp} {v} (\d+)").group(1) == "3"    # the parent goes on


def test_clone_vm_sighand_child_runs_beside_its_parent(h):
    task = h.start("clonevm", ready=r"ready .*")
    r, p, k = (int(x) for x in task.log.matches(r"ready (.*)")[0].group(1).split())
    KCMP_VM, KCMP_SIGHAND = 1, 4
    assert kcmp(p, k, KCMP_VM) == 0 and kcmp(p, k, KCMP_SIGHAND) == 0
    h.checkpoint_restore(task)
    at_dump = last_ticks(task.log)
    assert tree_of(task.pid)[k][0] == p
    assert kcmp(p, k, KCMP_VM) == 0 and kcmp(p, k, KCMP_SIGHAND) == 0
    n = len(task.log)
    wait_for(lambda: all(last_ticks(task.log).get(x, 0) > at_dump[x] + 1 for x in (p, k)),
             what="both to count on")
    firsts = {}
    for line in task.log.lines()[n:]:
        parts = line.split()
        if parts[0] == "tick":
            firsts.setdefault(int(parts[1]), int(parts[2]))
    assert firsts == {p: at_dump[p] + 1, k: at_dump[k] + 1}, (at_dump, firsts)
    os.kill(k, signal.SIGUSR2)       # K installs a SIGURG handler: P has it too
    task.log.wait(rf"installed {k}")
    caught = int(proc_status(p)["SigCgt"], 16)
    assert caught >> (signal.SIGURG - 1) & 1


def test_leave_running_tree_runs_on_untraced_and_restores_later(h):
    task = h.start("forest", ready=r"ready \d+")
    before = tree_of(task.pid)
    images = h.dump(task, leave_running=True)
    assert tree_of(task.pid) == before
    for pid, (_, _, _, state) in before.items():
        if state != "Z":
            assert proc_status(pid)["TracerPid"] == "0"
    at_dump = last_ticks(task.log)
    live = [p for p, v in before.items() if v[3] != "Z"]
    wait_for(lambda: all(last_ticks(task.log).get(p, 0) > at_dump[p] + 1 for p in live),
             what="every process to run on")
    # now end the tree ourselves and bring the dumped one back
    for pid in [task.pid] + descendants(task.pid):
        os.kill(pid, signal.SIGKILL)
    task.reap()
    reap_gone(dumped_pids(images))
    h.restore(images, task=task)
    after = tree_of(task.pid)
    before[task.pid] = (after[task.pid][0],) + before[task.pid][1:]
    assert after == before


@pytest.mark.parametrize("stage", [2, 3])
def test_restore_killed_while_helpers_end_leaves_nothing(h, stage):
    """The children of a helper (M1, M2 of forest's exited session leader L) do not die
    with their parent while it exits on purpose: a restore command killed right then
    (test hook: after stage 2, joining process groups, or 3, ending helpers) still
    leaves none of them behind (they watch the command through a pidfd)."""
    task = h.start("forest", ready=r"ready \d+")
    pids = list(tree_of(task.pid))
    images = h.dump(task)
    res = subprocess.run(h.cli_argv("restore", "-D", images, "-d"), capture_output=True,
                         env={**os.environ, "CRIU_PY_TEST_KILL_AFTER_STAGE": str(stage)},
                         timeout=60)
    assert res.returncode == -signal.SIGKILL, res
    reap_gone(pids, timeout=10)         # every task of the killed restore, or it fails


def test_restore_killed_at_any_instant_leaves_no_half_restored_tree(h):
    task = h.start("forest", ready=r"ready \d+")
    pids = list(tree_of(task.pid))
    images = h.dump(task)
    outcomes = []
    for delay in (0.0, 0.05, 0.15, 0.25, 0.35, 0.45, 0.6, 0.8, 1.5):
        p = subprocess.Popen(h.cli_argv("restore", "-D", images, "-d"), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.kill()
        p.wait()

        def settled():
            # reap what comes back to us (we are the subreaper) meanwhile
            for x in pids:
                try:
                    os.waitpid(x, os.WNOHANG)
                except ChildProcessError:
                    pass
            if not any(os.path.exists(f"/proc/{x}") for x in pids):
                return "gone"
            now = tree_of(task.pid)
            if now.keys() == set(pids) and [v[3] for v in now.values()].count("Z") == 1 \
                    and "t" not in {v[3] for v in now.values()}:
                return "whole"
            return None
        outcomes.append(wait_for(settled, timeout=10, what="the tree to be gone or whole"))
        if outcomes[-1] == "whole":     # it was let go before the kill: a complete tree
            for x in [task.pid] + descendants(task.pid):
                os.kill(x, signal.SIGKILL)
        reap_gone(pids)
    assert "gone" in outcomes, outcomes
