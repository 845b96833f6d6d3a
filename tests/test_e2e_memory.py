# End-to-end: memory contents come back exactly - 256 MiB of patterned anonymous
# memory with pipe data, a heap string and signal state; shared anonymous and memfd
# mappings and copy-on-write pages of a private file mapping; a whole CPython
# interpreter. Each workload verifies itself on SIGUSR1 and logs the verdict; a
# restore that re-executed the program could not answer with the dumped state.
import re
import signal

import pytest

from conftest import proc_is_running, fd_table, layout_diff, maps_layout, proc_status, signal_state, task_identity

SEED = 0x5EED1234


def ask(task, verdict=r"(OK|BAD) \d+.*", timeout=60):
    """Send SIGUSR1 and return the verdict line it produces."""
    before = len(task.log.matches(verdict))
    task.signal(signal.SIGUSR1)
    return task.log.wait(verdict, timeout=timeout, count=before + 1).group(0)


def test_memhog_256mib_pipe_heap_and_handler_survive(h):
    task = h.start("memhog", 256, SEED, ready=r"ready \d+", )
    assert ask(task) == f"OK {task.pid}", "the workload's self-check fails before any dump"
    fds, layout, signals = fd_table(task.pid), maps_layout(task.pid), signal_state(task.pid)
    who = task_identity(task.pid)
    restored = h.checkpoint_restore(task)
    assert restored.pid == task.pid
    assert fd_table(task.pid) == fds
    assert signal_state(task.pid) == signals
    assert task_identity(task.pid) == who
    now = maps_layout(task.pid)
    assert now == layout, layout_diff(layout, now)
    assert ask(restored) == f"OK {task.pid}"
    # the handler is still the one installed (the default action would kill the task)
    assert ask(restored) == f"OK {task.pid}"
    assert restored.running()


def test_shared_anonymous_memfd_and_private_file_pages_survive(h):
    task = h.start("shmem", h.path("mapped.data"), SEED)
    assert ask(task) == f"OK {task.pid}"
    restored = h.checkpoint_restore(task)
    assert ask(restored) == f"OK {task.pid}"
    maps = open(f"/proc/{restored.pid}/maps").read().splitlines()
    shared = [m for m in maps if m.endswith("/dev/zero (deleted)")]
    memfd = [m for m in maps if "/memfd:wl-memfd (deleted)" in m]
    private = [m for m in maps if m.endswith("/mapped.data")]
    assert shared and all(m.split()[1] == "rw-s" for m in shared), shared
    assert memfd and all(m.split()[1] == "rw-s" for m in memfd), memfd
    assert private and all(m.split()[1] == "rw-p" for m in private), private
    # the file itself was not changed by the private writes
    data = h.path("mapped.data").read_bytes()
    assert len(data) == 1 << 20


@pytest.mark.parametrize("python", [True, "/usr/bin/python3"], ids=["venv-python", "debian-python3"])
def test_python_interpreter_state_digest_unchanged(h, python):
    task = h.start("pyworker", 200000, python=python, ready=r"ready \d+ [0-9a-f]{32}")
    digest = task.log.matches(r"ready \d+ ([0-9a-f]{32})")[0].group(1)
    pattern = r"state \d+ [0-9a-f]{32} ticks \d+"
    before = len(task.log.matches(pattern))
    task.signal(signal.SIGUSR1)
    line = task.log.wait(pattern, count=before + 1).group(0)
    assert line.startswith(f"state {task.pid} {digest} "), line
    ticks_at_dump = int(line.rsplit(" ", 1)[1])
    looks = (fd_table(task.pid), maps_layout(task.pid), signal_state(task.pid), task_identity(task.pid))

    restored = h.checkpoint_restore(task)
    now = (fd_table(task.pid), maps_layout(task.pid), signal_state(task.pid), task_identity(task.pid))
    assert now[1] == looks[1], layout_diff(looks[1], now[1])
    assert now[3] == looks[3], {k: (looks[3][k], now[3][k]) for k in now[3] if now[3][k] != looks[3][k]}
    assert now == looks
    restored.signal(signal.SIGUSR1)
    line = task.log.wait(pattern, count=before + 2).group(0)
    m = re.fullmatch(r"state (\d+) ([0-9a-f]{32}) ticks (\d+)", line)
    assert int(m.group(1)) == task.pid and m.group(2) == digest, line
    assert int(m.group(3)) >= ticks_at_dump
    assert proc_status(restored.pid)["Name"].startswith("python")


@pytest.mark.needs_tool
def test_memhog_detects_a_corrupted_page(h):
    # Sensitivity of the check above: one byte changed in pages-N.img is caught by the
    # checksums before anything is created; restored anyway (--no-verify), the task
    # itself must report BAD, not OK.
    task = h.start("memhog", 64, SEED, ready=r"ready \d+")
    images = h.dump(task)
    pages = max(images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    size = pages.stat().st_size
    assert size >= 64 << 20
    with open(pages, "r+b") as f:
        f.seek(size // 2 + 123)
        byte = f.read(1)
        f.seek(size // 2 + 123)
        f.write(bytes([byte[0] ^ 0x40]))
    res = h.cli("restore", "-D", images, "-d")
    assert res.returncode == 1 and f"{pages.name}: damaged page run" in res.stderr, res.stderr
    assert not proc_is_running(task.pid)
    restored = h.restore(images, "--no-verify", task=task)
    assert ask(restored).startswith(f"BAD {task.pid} memory word ")


def test_full_pipe_keeps_all_its_data(h):
    # 64 KiB, a default pipe filled to the brim, refilled by the restore
    task = h.start("memhog", 8, SEED, 65536, ready=r"ready \d+")
    assert ask(task) == f"OK {task.pid}"
    restored = h.checkpoint_restore(task)
    assert ask(restored) == f"OK {task.pid}"


def vm_flags(pid: int) -> dict:
    """{(start, end): VmFlags} of every VMA but the restore-independent special ones."""
    out, cur = {}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                s, e = (int(x, 16) for x in head.split("-"))
                cur = (s, e)
            elif line.startswith("VmFlags:"):
                out[cur] = " ".join(sorted(line.split()[1:]))
    return out


def test_madvise_and_vma_flags_survive(h):
    task = h.start("vmflags", ready=r"ready \d+")
    before = vm_flags(task.pid)
    wanted = {"dc", "dd", "hg", "nh", "mg", "wf", "sr", "rr", "lo", "nr", "dp"}
    seen = {f for flags in before.values() for f in flags.split()}
    assert wanted <= seen, f"the workload lacks {wanted - seen}"
    restored = h.checkpoint_restore(task)
    after = vm_flags(task.pid)
    diff = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
            if before.get(k) != after.get(k)}
    assert not diff, diff
    restored.signal(signal.SIGUSR1)
    line = task.log.wait(r"(OK|BAD) .*").group(0)
    assert line == f"OK {task.pid}", line
