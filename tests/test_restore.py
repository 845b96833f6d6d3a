# The restore half through the real CLI, checked from outside: the restored task has
# the dumped address space exactly (no restorer region left behind), the same signal
# state, comm, cwd and umask; and every failure (PID in use, corrupt or missing images,
# a file that cannot be reopened in the child) is one line, a non-zero exit, and no
# process left behind.
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Task, proc_is_running, proc_status, wait_for


def maps_of(pid: int) -> list[tuple]:
    """(start, end, permissions, name) of every mapping. Neighbours with the same
    permissions and name are joined: the kernel may merge VMAs that were separate before
    the dump (e.g. a library's RELRO part and its read-only part) when they are re-created,
    which changes nothing the task can see."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            s, e = (int(x, 16) for x in parts[0].split("-"))
            name = " ".join(parts[5:])
            if out and out[-1][1] == s and out[-1][2:] == (parts[1], name):
                out[-1] = (out[-1][0], e, parts[1], name)
            else:
                out.append((s, e, parts[1], name))
    return out


def mm_fields(pid: int) -> list[int]:
    """start/end code, start stack, start/end data, start brk, arg and env bounds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): field n is fields[n - 3]
    return [int(fields[n - 3]) for n in (26, 27, 28, 45, 46, 47, 48, 49, 50, 51)]


def rseq_of(pid: int) -> dict | None:
    """The rseq registration (PTRACE_GET_RSEQ_CONFIGURATION, the task stopped briefly)."""
    from criu_py.ptrace import seized
    with seized(pid) as tracee:
        return tracee.get_rseq()


def outside_view(pid: int) -> dict:
    st = proc_status(pid)
    with open(f"/proc/{pid}/auxv", "rb") as f:
        auxv = f.read()
    return {k: st[k] for k in ("Name", "Umask", "SigBlk", "SigIgn", "SigCgt", "NSpgid", "NSsid")} | {
        "cwd": os.readlink(f"/proc/{pid}/cwd"), "exe": os.readlink(f"/proc/{pid}/exe"),
        "mm": mm_fields(pid), "auxv": auxv,
        "fds": sorted(os.listdir(f"/proc/{pid}/fd")), "rseq": rseq_of(pid),
        "limits": Path(f"/proc/{pid}/limits").read_text()}


def last_count(task) -> int:
    return int(task.log.lines()[-1].split()[1])


@pytest.mark.needs_tool
def test_restored_task_has_the_dumped_layout_and_no_restorer_region(h):
    task = h.start("counter", ready=r"\d+ 5")
    before_maps, before = maps_of(task.pid), outside_view(task.pid)
    assert before["rseq"], "glibc registers rseq in every process"
    images = h.dump(task)
    dumped = last_count(task)
    restored = h.restore(images, task=task)
    task.log.wait(rf"{task.pid} {dumped + 3}")
    assert maps_of(task.pid) == before_maps
    assert outside_view(task.pid) == before
    assert restored.running()


@pytest.mark.needs_tool
def test_restored_task_keeps_its_signal_handler(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task)
    restored = h.restore(images, task=task)
    task.log.wait(rf"{task.pid} \d+", count=len(task.log) + 2)
    os.kill(task.pid, 15)                       # the counter's SIGTERM handler logs "exit"
    task.log.wait(rf"{task.pid} exit")
    assert restored.reap() == 5


@pytest.mark.needs_tool
def test_pid_in_use_is_one_line_and_leaves_nothing(h):
    task = h.start("counter", ready=r"\d+ 3")
    images = h.dump(task, leave_running=True)
    res = h.cli("restore", "-D", images, "-d")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {task.pid} is in use" in lines[0], res.stderr
    assert task.running()
    n = len(task.log)
    task.log.wait(rf"{task.pid} \d+", count=n + 2)          # the original runs on, alone
    assert {line.split()[0] for line in task.log.lines()} == {str(task.pid)}


@pytest.mark.needs_tool
def test_restore_right_after_the_dump_waits_for_the_pid_to_be_reaped(h):
    """`dump && restore`: the killed task's zombie holds its PID until its parent reaps
    it (an orphan's waits for init, about a second here). The restore waits for that;
    a zombie nobody reaps is named after PID_RELEASE_WAIT (5 s) and nothing is made."""
    task = h.start("counter", ready=r"\d+ 3")
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images)
    assert res.returncode == 0, res.stderr
    dumped = last_count(task)
    assert proc_status(task.pid)["State"].startswith("Z"), "our zombie until we reap it"
    res = h.cli("restore", "-D", images, "-d")
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert f"pid {task.pid} is in use by a dead process (counter) its parent {os.getpid()} " \
           f"has not reaped (for over 5 s)" in lines[0]
    assert proc_status(task.pid)["State"].startswith("Z"), "nothing restored"

    restore = h.cli_background("restore", "-D", images, "-d", "-v3", "-o", "restore.log")
    wait_for(lambda: "waiting up to 5 s" in (images / "restore.log").read_text()
             if (images / "restore.log").exists() else False, timeout=30)
    assert restore.poll() is None
    task.reap()
    _, err = restore.communicate(timeout=60)
    assert restore.returncode == 0, err
    restored = Task(task.pid, task.marker, task.log)
    h.tasks.append(restored)
    task.log.wait(rf"{task.pid} {dumped + 3}")
    assert restored.running()


def _corrupt_cases(images):
    pid = next(p.name.split("-")[1].split(".")[0] for p in images.glob("core-*.img"))

    def truncate_pages():
        p = images / "pages-1.img"
        os.truncate(p, p.stat().st_size - 4096)
        return "pages-1.img"

    def garbage_core():
        (images / f"core-{pid}.img").write_bytes(b"\x19\x43\x56\x54garbage!" * 8)
        return f"core-{pid}.img"

    def missing_mm():
        (images / f"mm-{pid}.img").unlink()
        return f"mm-{pid}.img"

    def bad_magic_pagemap():
        p = images / f"pagemap-{pid}.img"
        data = bytearray(p.read_bytes())
        data[4:8] = b"\x00\x00\x00\x00"
        p.write_bytes(bytes(data))
        return f"pagemap-{pid}.img"

    return [truncate_pages, garbage_core, missing_mm, bad_magic_pagemap]


@pytest.mark.needs_tool
@pytest.mark.parametrize("case", range(4))
def test_corrupt_images_fail_before_any_fork(h, case):
    task = h.start("counter", ready=r"\d+ 3")
    images = h.dump(task)
    name = _corrupt_cases(images)[case]()
    res = h.cli("restore", "-D", images, "-d")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and name in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not proc_is_running(task.pid)
    n = len(task.log)
    time.sleep(0.05)
    assert len(task.log) == n


@pytest.mark.needs_tool
def test_failure_in_the_child_names_the_stage_and_kills_it(h):
    task = h.start("counter", ready=r"\d+ 3")
    images = h.dump(task)
    log_path = task.log.path
    # immutable: the task's log (write-only, append) passes every check made before the
    # fork, but reopening it for writing fails in the forked task
    subprocess.run(["chattr", "+i", str(log_path)], check=True)
    try:
        res = h.cli("restore", "-D", images, "-d")
    finally:
        subprocess.run(["chattr", "-i", str(log_path)], check=True)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(rf"pid {task.pid}: files: .*not permitted", lines[0]), res.stderr
    time.sleep(0.05)
    assert not proc_is_running(task.pid), "the half-restored task was left behind"


@pytest.mark.needs_tool
def test_pidfile_and_restore_again_from_the_same_images(h):
    task = h.start("counter", ready=r"\d+ 3")
    images = h.dump(task)
    dumped = last_count(task)
    restored = h.restore(images, task=task)
    task.log.wait(rf"{task.pid} {dumped + 2}")
    restored.kill()
    restored = h.restore(images, task=task)         # images are not consumed by a restore
    task.log.wait(rf"{task.pid} {dumped + 1}", count=2)
    assert restored.running()


@pytest.mark.needs_tool
def test_a_restored_task_can_be_dumped_and_restored_again(h):
    task = h.start("counter", ready=r"\d+ 3")
    maps = maps_of(task.pid)
    for round_ in range(3):
        images = h.dump(task, h.images_dir(f"round{round_}"))
        dumped = last_count(task)
        task = h.restore(images, task=task)
        task.log.wait(rf"{task.pid} {dumped + 2}")
    assert maps_of(task.pid) == maps
    rows = [int(line.split()[1]) for line in task.log.lines()]
    assert rows == list(range(1, len(rows) + 1))


def test_status_pipe_records_and_messages_are_split():
    # Many tasks write to one status pipe: restorer records (fixed size, with the pid)
    # and one-line messages; a partial record waits for the rest.
    import struct as st
    from criu_py.native import lib
    from criu_py.restore.fork import describe_record, parse_status
    rec = st.pack("<IiqQi4x", lib.PIE_STATUS_MAGIC, lib.PIE_STAGE_MAP_VMA, -12, 0x7000, 4321)
    done = st.pack("<IiqQi4x", lib.PIE_STATUS_MAGIC, lib.PIE_STAGE_DONE, 8192, 0x9000, 4322)
    msg = b"Tpid 4323: files: boom"
    data = rec + st.pack("<I", len(msg)) + msg + done + rec[:10]
    records, messages, rest = parse_status(data)
    assert [(r.stage, r.ret, r.arg, r.pid) for r in records] == \
        [(lib.PIE_STAGE_MAP_VMA, -12, 0x7000, 4321), (lib.PIE_STAGE_DONE, 8192, 0x9000, 4322)]
    assert messages == ["pid 4323: files: boom"] and rest == rec[:10]
    assert describe_record(records[0]) == \
        "restorer of pid 4321: map vma failed at 0x7000: ENOMEM Cannot allocate memory"


def test_clone_with_pid_gives_the_pid_and_a_sane_child():
    # The child of the raw clone3 has the asked PID, and glibc in it knows its own tid
    # (raise() reaches the child, not the parent), like after a real fork().
    import signal as sig
    from criu_py.errors import RestoreError
    from criu_py.restore.fork import clone_with_pid
    want = next(p for p in range(31000, 32700) if not os.path.exists(f"/proc/{p}"))
    r, w = os.pipe()
    pid = clone_with_pid(want)
    if pid == 0:
        try:
            sig.signal(sig.SIGUSR1, lambda *a: os.write(w, str(os.getpid()).encode()))
            sig.raise_signal(sig.SIGUSR1)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert pid == want
        assert os.read(r, 32) == str(want).encode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    with pytest.raises(RestoreError, match=rf"pid {os.getpid()} is in use"):
        clone_with_pid(os.getpid())


def test_a_task_reports_a_name_that_is_not_utf8():
    """A failure naming a file whose name is not UTF-8 goes through the status pipe as
    its bytes (it must not raise inside the failing task)."""
    from criu_py.restore.fork import parse_status
    from criu_py.restore.task import report
    name = os.fsdecode(b"/tmp/caf\xe9")
    r, w = os.pipe()
    try:
        report(w, f"cannot open {name}")
        _, messages, rest = parse_status(os.read(r, 4096))
    finally:
        os.close(r)
        os.close(w)
    assert messages == [f"cannot open {name}"] and rest == b""
    assert os.fsencode(messages[0]).endswith(b"caf\xe9")
