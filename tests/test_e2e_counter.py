# End-to-end: the sample process (a C counter logging "<pid> <count>" every
# 10 ms) checkpointed and restored through the real CLI and checked from outside: the
# same PID goes on with the next count, exactly where the dump froze it.
import json
import signal
import subprocess
import time

import pytest

from conftest import (CRIT, Task, fd_table, file_mode, image_files, layout_diff, maps_layout,
                      proc_is_running, rseq_config, signal_state, task_identity)
from criu_py.images import CRIU_PY_IMAGES


def counter_lines(task):
    """[(pid, count)] of the counter's log, ignoring the final "exit" line."""
    out = []
    for line in task.log.lines():
        pid, _, value = line.partition(" ")
        if value != "exit":
            out.append((int(pid), int(value)))
    return out


def assert_continuous(task, expect_pid):
    rows = counter_lines(task)
    assert rows, "empty log"
    assert {pid for pid, _ in rows} == {expect_pid}, f"lines from other PIDs: {set(p for p, _ in rows)}"
    counts = [c for _, c in rows]
    gaps = [(a, b) for a, b in zip(counts, counts[1:]) if b != a + 1]
    assert counts[0] == 1 and not gaps, f"count is not continuous: jumps {gaps[:5]}"


def test_counter_continues_with_next_count_and_same_pid(h):
    task = h.start("counter", ready=r"\d+ 20")
    images = h.dump(task)
    dumped = counter_lines(task)[-1][1]
    if not h.no_cr:
        assert not proc_is_running(task.pid), "the dumped task still runs"
        time.sleep(0.1)
        assert counter_lines(task)[-1][1] == dumped, "the log grew while the task was gone"

    restored = h.restore(images, task=task)
    task.log.wait(rf"{task.pid} {dumped + 30}")
    rows = counter_lines(task)
    counts = [c for _, c in rows]
    assert rows[counts.index(dumped) + 1] == (task.pid, dumped + 1)
    assert_continuous(task, task.pid)
    assert restored.running()


def test_restored_counter_looks_the_same_from_outside(h):
    # fds (none of criu-py's own left behind), every mapping at the same address with
    # the same protection and file (and nothing of the restorer's left), signal state
    task = h.start("counter", ready=r"\d+ 20")
    fds, layout, signals = fd_table(task.pid), maps_layout(task.pid), signal_state(task.pid)
    who, rseq = task_identity(task.pid), rseq_config(task.pid)
    assert rseq[0] != 0 and rseq[2] == 0x53053053, "glibc registers rseq in every process"
    h.checkpoint_restore(task)
    assert fd_table(task.pid) == fds
    assert signal_state(task.pid) == signals
    now = maps_layout(task.pid)
    assert now == layout, layout_diff(layout, now)
    now = task_identity(task.pid)
    assert now == who, {k: (who[k], now[k]) for k in who if who[k] != now[k]}
    assert rseq_config(task.pid) == rseq, "rseq registration not restored"
    task.log.wait(r"\d+ \d+", count=len(task.log) + 3)  # and it still runs after being looked at


def test_restore_without_detach_exits_with_task_status(h):
    task = h.start("counter", ready=r"\d+ 10")
    images = h.dump(task)
    if h.no_cr:
        task.signal(signal.SIGTERM)
        assert task.reap() == 5
        return
    dumped = counter_lines(task)[-1][1]
    restore = h.cli_background("restore", "-D", images, "-o", "restore.log", "-v4")
    restored = Task(task.pid, task.marker, task.log)
    h.tasks.append(restored)  # cleaned up like any other task
    task.log.wait(rf"{task.pid} {dumped + 10}", timeout=30)
    time.sleep(0.05)
    assert restore.poll() is None, f"restore without -d returned early: {restore.communicate()}"
    restored.signal(signal.SIGTERM)  # the counter logs "exit" and exits with status 5
    rc = restore.wait(timeout=30)
    task.log.wait(rf"{task.pid} exit")
    assert rc == 5, f"criu-py restore exited {rc}, the task exited 5; stderr: {restore.stderr.read()}"
    assert_continuous(task, task.pid)


@pytest.mark.needs_tool
def test_restore_refuses_a_pid_in_use(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task, leave_running=True)
    res = h.cli("restore", "-D", images, "-d")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("Error:") and str(task.pid) in lines[0], lines
    assert task.running() and task.popen.poll() is None, "the original task must be untouched"


def test_leave_running_then_dump_again(h):
    task = h.start("counter", ready=r"\d+ 5")
    first = h.dump(task, h.images_dir("first"), leave_running=True)
    n = len(task.log)
    task.log.wait(rf"{task.pid} {n + 20}")  # it keeps counting
    st = task.status()
    assert st["TracerPid"] == "0" and st["State"][0] in "RS", st

    second = h.dump(task, h.images_dir("second"))
    dumped = counter_lines(task)[-1][1]
    assert dumped > n
    h.restore(second, task=task)
    task.log.wait(rf"{task.pid} {dumped + 5}")
    assert_continuous(task, task.pid)
    if not h.no_cr:
        assert (first / "inventory.img").exists()


@pytest.mark.needs_tool
def test_restore_from_an_earlier_leave_running_dump(h):
    # the first images are complete on their own: restoring them rewinds the count
    task = h.start("counter", ready=r"\d+ 5")
    before_dump = counter_lines(task)[-1][1]
    first = h.dump(task, h.images_dir("first"), leave_running=True)
    after_dump = counter_lines(task)[-1][1]  # it ran on: the freeze was in between
    task.log.wait(rf"{task.pid} {after_dump + 30}")
    task.kill()
    mark = len(task.log)
    h.restore(first, task=task)
    task.log.wait(r"\d+ \d+", count=mark + 10)
    resumed = counter_lines(task)[mark:]
    # the count rewinds to where the first dump froze it, then goes on one by one
    assert resumed[0][0] == task.pid and before_dump < resumed[0][1] <= after_dump + 1, resumed[:3]
    assert [c for _, c in resumed] == list(range(resumed[0][1], resumed[0][1] + len(resumed)))


@pytest.mark.needs_tool
def test_images_are_private(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task, log_file=None)
    assert file_mode(images) == 0o700, oct(file_mode(images))   # left as the test made it
    files = image_files(images)
    assert files
    bad = {p.name: oct(file_mode(p)) for p in files if file_mode(p) != 0o600}
    assert not bad, f"image files not 0600: {bad}"


def crit_decode(path):
    res = subprocess.run([CRIT, "decode", "-i", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"crit cannot decode {path.name}: {res.stderr.strip()[-500:]}"
    return json.loads(res.stdout)


@pytest.mark.needs_tool
def test_crit_decodes_every_image(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task, log_file=None)
    names = {p.name for p in image_files(images)}
    for required in ("inventory.img", "pstree.img", f"core-{task.pid}.img", f"ids-{task.pid}.img",
                     f"mm-{task.pid}.img", f"pagemap-{task.pid}.img", "files.img",
                     f"fs-{task.pid}.img", "stats-dump"):
        assert required in names, f"{required} missing from {sorted(names)}"
    decoded = {}
    for path in image_files(images):
        if path.name.startswith("pages-") or path.name in CRIU_PY_IMAGES:
            continue  # raw page data, no magic; criu-py's own images (crit-py reads them)
        decoded[path.name] = crit_decode(path)

    pstree = decoded["pstree.img"]["entries"]
    assert [(e["pid"], e["pgid"], e["sid"]) for e in pstree] == [(task.pid, task.pid, task.pid)]
    core = decoded[f"core-{task.pid}.img"]["entries"][0]
    assert core["tc"]["comm"] == "counter"
    assert core["thread_info"]["gpregs"]["ip"] != 0
    mm = decoded[f"mm-{task.pid}.img"]["entries"][0]
    assert mm["vmas"] and mm["mm_start_code"] < mm["mm_end_code"]
    pagemap = decoded[f"pagemap-{task.pid}.img"]["entries"]
    pages_id = pagemap[0]["pages_id"]
    pages = images / f"pages-{pages_id}.img"
    counted = sum(e.get("nr_pages", 0) for e in pagemap[1:] if e.get("flags", 4) & 4 or "flags" not in e)
    assert pages.stat().st_size == counted * 4096, "pagemap and pages file disagree"
    stats = decoded["stats-dump"]["entries"][0]["dump"]
    assert stats["pages_written"] == counted
    assert stats["frozen_time"] > 0 and stats["pages_scanned"] >= stats["pages_written"]
    reg = [e for e in decoded["files.img"]["entries"] if e.get("type") == "REG"]
    assert any(e["reg"]["name"] == str(task.log.path) for e in reg), "the log file is not in files.img"


@pytest.mark.needs_tool
def test_same_images_restore_twice(h):
    # a restore does not consume or change the images: a second one resumes at the same
    # count (each writes stats-restore beside them, as CRIU's does)
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task)
    dumped = counter_lines(task)[-1][1]

    def contents():
        return {p.name: p.read_bytes() for p in image_files(images)
                if not p.name.endswith(".log") and p.name != "stats-restore"}
    sums = contents()
    for _ in range(2):
        mark = len(task.log)
        restored = h.restore(images, task=task)
        task.log.wait(r"\d+ \d+", count=mark + 5)
        assert counter_lines(task)[mark] == (task.pid, dumped + 1)
        restored.kill()
    assert contents() == sums


@pytest.mark.needs_tool
def test_success_is_quiet_at_default_verbosity(h):
    # like criu: nothing on stdout/stderr when all goes well (-v2, no -o), in a private
    # images dir (one readable by others gets one -v2 warning: test_e2e_modes.py)
    task = h.start("counter", ready=r"\d+ 5")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    task.reap()
    h.tasks.append(Task(task.pid, task.marker, task.log))
    res = h.cli("restore", "-D", images, "-d")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    task.log.wait(r"\d+ \d+", count=len(task.log) + 3)
