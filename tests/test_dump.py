# The dump half on real processes through the real CLI: the images decode with Debian's
# crit, say what the task had (registers, files, pipes, shared memory), pages match the
# task's memory, and every refusal or failure leaves the task running and untraced with
# no image written.
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CRIT, descendants, file_mode, image_files, proc_is_running, proc_status, wait_for
from criu_py.images import CRIU_PY_IMAGES

pytestmark = pytest.mark.needs_tool

RAW_IMAGE = re.compile(r"pages-\d+\.img$")


def crit_decode(path: Path) -> dict:
    res = subprocess.run([CRIT, "decode", "-i", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, f"crit cannot decode {path.name}: {res.stderr.strip()[-400:]}"
    return json.loads(res.stdout)


def entries(images: Path, name: str) -> list:
    return crit_decode(images / name)["entries"]


def assert_all_decode(images: Path) -> dict:
    decoded = {}
    for f in image_files(images):
        if RAW_IMAGE.match(f.name) or f.name.endswith(".log") or f.name in CRIU_PY_IMAGES:
            continue      # criu-py's own images: upstream tools do not know them
        decoded[f.name] = crit_decode(f)
    return decoded


def assert_untraced_running(pid: int) -> None:
    st = proc_status(pid)
    assert st is not None, f"task {pid} is gone"
    assert st["TracerPid"] == "0", f"task {pid} is still traced by {st['TracerPid']}"
    assert st["State"][0] not in "tTZX", f"task {pid} is in state {st['State']}"


def wait_in_syscall(pid: int, nrs) -> None:
    """Until the task blocks in one of the syscalls `nrs` (/proc/PID/syscall)."""
    def blocked():
        with open(f"/proc/{pid}/syscall") as f:
            first = f.read().split()[0]
        return first.isdigit() and int(first) in nrs
    wait_for(blocked, what=f"pid {pid} to block in syscall {nrs}")


def run_dump(h, pid: int, images: Path, *extra):
    return h.cli("dump", "-t", pid, "-D", images, "-v4", "-o", "dump.log", *extra)


def no_images(images: Path) -> bool:
    return not [p for p in images.iterdir() if p.name.endswith(".img") or p.name == "stats-dump"]


def pagemap_ranges(images: Path, pid: int):
    """[(vaddr, nr_pages)] of pagemap-PID.img (both count fields must agree)."""
    pm = entries(images, f"pagemap-{pid}.img")
    assert pm[0]["pages_id"] == 1
    return [(e["vaddr"], e["nr_pages"]) for e in pm[1:]]


# ---------------------------------------------------------------- the counter
def test_counter_dump_writes_crit_readable_images(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task)
    assert not proc_is_running(task.pid)
    assert file_mode(images) == 0o700          # as the test made it
    for f in image_files(images):
        if f.name != "dump.log":
            assert file_mode(f) == 0o600, f"{f.name} is {oct(file_mode(f))}"
    names = {f.name for f in image_files(images)}
    pid = task.pid
    for want in ("inventory.img", "pstree.img", f"core-{pid}.img", f"ids-{pid}.img", f"mm-{pid}.img",
                 f"pagemap-{pid}.img", "pages-1.img", "files.img", "fdinfo-2.img", f"fs-{pid}.img",
                 "stats-dump"):
        assert want in names, f"{want} missing"
    d = assert_all_decode(images)

    (tree,) = d["pstree.img"]["entries"]
    assert (tree["pid"], tree["pgid"], tree["sid"], tree["threads"]) == (pid, pid, pid, [pid])

    (core,) = d[f"core-{pid}.img"]["entries"]
    regs = core["thread_info"]["gpregs"]
    assert regs["cs"] == 0x33 and regs["ss"] == 0x2B and regs["fs_base"] != 0
    # the counter sleeps in nanosleep: stored to re-issue it (ax = nr, ip at `syscall`)
    if regs["orig_ax"] in (35, 230):
        assert regs["ax"] == regs["orig_ax"]
    assert core["tc"]["comm"] == "counter"
    sigactions = core["tc"]["sigactions"]
    assert len(sigactions) == 62          # 1..64 without SIGKILL and SIGSTOP, as upstream
    assert sigactions[signal.SIGTERM - 2]["sigaction"] not in (0, 1), "SIGTERM handler not seen"
    assert core["thread_core"]["rseq_entry"]["signature"] == 0x53053053
    assert core["thread_info"]["clear_tid_addr"] != 0
    assert core["thread_info"]["fpregs"]["mxcsr"] & 0x1F80

    (mm,) = d[f"mm-{pid}.img"]["entries"]
    files = {f["id"]: f for f in d["files.img"]["entries"]}
    assert files[mm["exe_file_id"]]["reg"]["name"] == str(h.bins["counter"])
    assert mm["mm_brk"] >= mm["mm_start_brk"]
    # without the AT_NULL pair, at most AT_VECTOR_SIZE words: what upstream accepts
    assert mm["mm_saved_auxv"][-2] != 0 and len(mm["mm_saved_auxv"]) <= 44
    vmas = mm["vmas"]
    assert [v["start"] for v in vmas] == sorted(v["start"] for v in vmas)
    vdso = [v for v in vmas if v["status"] & (1 << 3)]
    assert len(vdso) == 1

    ids = d[f"ids-{pid}.img"]["entries"][0]
    inventory = d["inventory.img"]["entries"][0]
    # the task's kernel-object ids differ from the dumping tool's own (root_ids)
    for kind in ("vm_id", "files_id", "fs_id", "sighand_id"):
        assert ids[kind] == 2 and inventory["root_ids"][kind] == 1
    fdinfo = {e["fd"]: e for e in d["fdinfo-2.img"]["entries"]}
    assert {0, 1, 2, 3} <= set(fdinfo)
    assert fdinfo[1]["id"] == fdinfo[2]["id"] or files[fdinfo[1]["id"]]["reg"]["name"] == "/dev/null"
    log_file = files[fdinfo[3]["id"]]["reg"]
    assert log_file["name"] == task.marker
    assert log_file["flags"] & os.O_APPEND
    assert log_file["pos"] == os.path.getsize(task.marker)
    assert files[fdinfo[0]["id"]]["reg"]["name"] == "/dev/null"

    (fs,) = d[f"fs-{pid}.img"]["entries"]
    assert files[fs["cwd_id"]]["reg"]["name"] == str(h.dir)
    assert files[fs["root_id"]]["reg"]["name"] == "/"

    stats = d["stats-dump"]["entries"][0]["dump"]
    assert stats["pages_written"] == sum(n for _, n in pagemap_ranges(images, pid))
    assert stats["pages_written"] * 4096 == (images / "pages-1.img").stat().st_size
    assert stats["frozen_time"] > 0 and stats["pages_scanned"] >= stats["pages_written"]


def test_leave_running_pages_match_memory_and_pipe_keeps_data(h):
    task = h.start("memhog", 8, 1234)
    images = h.dump(task, leave_running=True)
    assert_untraced_running(task.pid)

    # The big patterned area does not change: its dumped pages equal the live memory.
    pid = task.pid
    ranges = pagemap_ranges(images, pid)
    pages = (images / "pages-1.img").read_bytes()
    mm = entries(images, f"mm-{pid}.img")[0]
    big = max((v for v in mm["vmas"] if v["status"] & (1 << 9)), key=lambda v: v["end"] - v["start"])
    off, compared = 0, 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for vaddr, n in ranges:
            if big["start"] <= vaddr < big["end"]:
                mem.seek(vaddr)
                assert mem.read(n * 4096) == pages[off:off + n * 4096], f"pages at {vaddr:#x} differ"
                compared += n
            off += n * 4096
    assert off == len(pages)
    assert compared >= (8 << 20) // 4096

    # The pipe's unread bytes are in pipes-data.img and still in the task's pipe.
    (pd,) = crit_decode(images / "pipes-data.img")["entries"]
    assert pd["bytes"] == 3000
    task.signal(signal.SIGUSR1)
    task.log.wait(rf"(OK|BAD) {pid}")
    assert task.log.matches(rf"OK {pid}"), task.log.lines()[-3:]
    files = entries(images, "files.img")
    pipes = [f for f in files if f["type"] == "PIPE"]
    assert len(pipes) == 2 and len({p["pipe"]["pipe_id"] for p in pipes}) == 1
    assert pd["pipe_id"] == pipes[0]["pipe"]["pipe_id"]


def test_blocked_read_is_stored_as_a_restarting_syscall(h):
    task = h.start("blocker", "read")
    wait_in_syscall(task.pid, (0,))
    images = h.dump(task, leave_running=True)
    assert_untraced_running(task.pid)
    regs = entries(images, f"core-{task.pid}.img")[0]["thread_info"]["gpregs"]
    assert regs["orig_ax"] == 0                      # read
    assert regs["ax"] == regs["orig_ax"]             # -ERESTARTSYS undone: re-issue read
    with open(f"/proc/{task.pid}/mem", "rb", buffering=0) as mem:
        mem.seek(regs["ip"])
        assert mem.read(2) == b"\x0f\x05", "ip does not point at the syscall instruction"
    # the task itself, left running, restarted its read correctly after the injections
    wfd = int(task.log.wait(r"ready \d+ \d+ (\d+)").group(1))
    with open(f"/proc/{task.pid}/fd/{wfd}", "w") as pipe:
        pipe.write("hello\n")
    task.log.wait(rf"got {task.pid} hello")
    assert not task.log.matches("readerr.*")


def test_absolute_and_relative_sleeps_are_stored_to_be_reissued(h):
    abs_task = h.start("blocker", "sleep-abs", 1000)
    rel_task = h.start("blocker", "sleep-rel", 1000)
    wait_in_syscall(abs_task.pid, (230,))
    wait_in_syscall(rel_task.pid, (35, 230))
    for task, nr_ok in ((abs_task, (230,)), (rel_task, (35, 230))):
        images = h.dump(task, h.images_dir(f"img-{task.pid}"), leave_running=True)
        assert_untraced_running(task.pid)
        regs = entries(images, f"core-{task.pid}.img")[0]["thread_info"]["gpregs"]
        assert regs["orig_ax"] in nr_ok
        # TIMER_ABSTIME gives -ERESTARTNOHAND, relative -ERESTART_RESTARTBLOCK: both are
        # stored to re-issue the syscall as it was
        assert regs["ax"] == regs["orig_ax"]
        with open(f"/proc/{task.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(regs["ip"])
            assert mem.read(2) == b"\x0f\x05"
    # both go on ticking, on time, after the dumps
    for task in (abs_task, rel_task):
        task.log.wait(rf"tick {task.pid} 2 .*", timeout=5)


# ---------------------------------------------------------------- shared memory
SHM_SRC = r"""
#define _GNU_SOURCE
#include <sys/mman.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	char *a = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int fd = memfd_create("cpy-test", MFD_ALLOW_SEALING);
	char *m;
	FILE *f = fopen(argv[1], "w");
	strcpy(a, "shared anon page 0");
	strcpy(a + 5 * 4096, "shared anon page 5");
	if (ftruncate(fd, 3 * 4096))
		return 1;
	m = mmap(0, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	strcpy(m + 4096, "memfd page 1");
	fprintf(f, "ready %d\n", getpid());
	fclose(f);
	for (;;)
		pause();
}
"""


@pytest.fixture(scope="module")
def shm_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("shm")
    (d / "shm.c").write_text(SHM_SRC)
    subprocess.run(["gcc", "-O2", "-o", str(d / "shm"), str(d / "shm.c")], check=True)
    return d / "shm"


def test_shared_anon_and_memfd_contents(h, shm_bin):
    h.bins = dict(h.bins, shm=shm_bin)
    task = h.start("shm")
    images = h.dump(task, leave_running=True)
    assert_untraced_running(task.pid)
    d = assert_all_decode(images)
    mm = d[f"mm-{task.pid}.img"]["entries"][0]
    anon = [v for v in mm["vmas"] if v["status"] & (1 << 8)]
    memfd = [v for v in mm["vmas"] if v["status"] & (1 << 14)]
    assert len(anon) == 1 and len(memfd) == 1
    shmid = anon[0]["shmid"]
    pm = d[f"pagemap-shmem-{shmid}.img"]["entries"]
    data = (images / f"pages-{pm[0]['pages_id']}.img").read_bytes()
    assert [(e["vaddr"], e["nr_pages"]) for e in pm[1:]] == [(0, 1), (5 * 4096, 1)]
    assert data[:18] == b"shared anon page 0" and data[4096:4096 + 18] == b"shared anon page 5"

    (inode,) = d["memfd.img"]["entries"]
    assert inode["name"] == "cpy-test" and inode["size"] == 3 * 4096
    files = {f["id"]: f for f in d["files.img"]["entries"]}
    assert files[memfd[0]["shmid"]]["type"] == "MEMFD"
    pm = d[f"pagemap-shmem-{inode['shmid']}.img"]["entries"]
    data = (images / f"pages-{pm[0]['pages_id']}.img").read_bytes()
    assert [(e["vaddr"], e["nr_pages"]) for e in pm[1:]] == [(4096, 1)]
    assert data.startswith(b"memfd page 1")


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("what,kind", [("socket", "socket"), ("io_uring", "io_uring"),
                                       ("perf_event", "perf_event"), ("bpf-map", "bpf-map"),
                                       ("grandchild", "socket")])
def test_unsupported_is_refused_before_any_image(h, what, kind):
    task = h.start("unsupported", what)
    images = h.images_dir()
    family = [task.pid] + descendants(task.pid)
    res = run_dump(h, task.pid, images)
    assert res.returncode == 1, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("Error:"), err
    m = re.search(r"ready \d+ (\d+) ?(\d+)?", "\n".join(task.log.lines()))
    holder = int(m.group(2)) if m.group(2) else task.pid     # a grandchild for "grandchild"
    assert f"pid {holder} fd {m.group(1)}" in err and kind in err, err
    assert no_images(images)
    assert len(family) == (3 if what == "grandchild" else 1)
    for pid in family:                 # every task of the tree runs on, untraced
        assert_untraced_running(pid)
    n = len(task.log)
    wait_for(lambda: all(len(task.log.matches(rf"beat {p} .*")) > 2 for p in family)
             and len(task.log) > n + 2, what="every task to go on logging")


def test_bad_input_is_one_line(h):
    images = h.images_dir()
    # a PID that does not exist
    res = run_dump(h, 4194303, images)
    assert res.returncode != 0 and res.stderr.strip().startswith("Error:"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "no such process" in res.stderr.lower()
    # a PID that has just died (reaped)
    p = subprocess.Popen(["true"])
    p.wait()
    res = run_dump(h, p.pid, images)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    # a dead task not yet reaped (a zombie)
    z = subprocess.Popen(["true"])
    try:
        wait_for(lambda: (proc_status(z.pid) or {}).get("State", "").startswith("Z"), what="zombie")
        res = run_dump(h, z.pid, images)
        assert res.returncode != 0 and "zombie" in res.stderr, res.stderr
    finally:
        z.wait()
    # an images dir that cannot be created: the task is not touched
    task = h.start("counter", ready=r"\d+ 2")
    blocker = h.path("a-file")
    blocker.write_text("x")
    res = h.cli("dump", "-t", task.pid, "-D", blocker / "sub")
    assert res.returncode != 0, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Error" in res.stderr, res.stderr
    assert_untraced_running(task.pid)


# ---------------------------------------------------------------- failure cleanup
def test_failure_after_injection_leaves_task_as_it_was(h, monkeypatch):
    """A failure in the middle of the dump (after the task was frozen and code was run in
    it): the task runs on, untraced, with its code bytes and signal mask untouched."""
    import criu_py.dump as dump_mod
    from criu_py.errors import DumpError
    from criu_py import log as logmod

    task = h.start("counter", ready=r"\d+ 3")
    text = [line for line in open(f"/proc/{task.pid}/maps") if " r-xp " in line and "/" in line][0]
    site = int(text.split("-")[0], 16)
    with open(f"/proc/{task.pid}/mem", "rb", buffering=0) as mem:
        mem.seek(site)
        before = mem.read(16)
    blk_before = proc_status(task.pid)["SigBlk"]

    def boom(ctx):
        raise DumpError("injected failure for the test")
    monkeypatch.setattr(dump_mod, "write_memory", boom)
    logmod.setup(0)
    images = h.images_dir()
    with pytest.raises(DumpError):
        dump_mod.dump_tasks({"pid": task.pid, "images_dir": str(images), "leave_running": False})
    assert_untraced_running(task.pid)
    with open(f"/proc/{task.pid}/mem", "rb", buffering=0) as mem:
        mem.seek(site)
        assert mem.read(16) == before
    assert proc_status(task.pid)["SigBlk"] == blk_before
    assert no_images(images)
    n = len(task.log)
    wait_for(lambda: len(task.log) > n + 2, what="the task to go on counting")
    rows = [int(line.split()[1]) for line in task.log.lines() if not line.endswith("exit")]
    assert rows == list(range(1, len(rows) + 1)), "the count skipped or repeated"


def test_pending_signals_are_recorded(h):
    """memhog blocks SIGUSR2: one sent to the process and one to the thread stay pending
    and go to tc.signals_s / thread_core.signals_p as raw siginfo."""
    task = h.start("memhog", 1, 5)
    os.kill(task.pid, signal.SIGUSR2)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(234, task.pid, task.pid, signal.SIGUSR2) == 0     # tgkill
    wait_for(lambda: int(proc_status(task.pid)["ShdPnd"], 16) & (1 << 11), what="pending SIGUSR2")
    images = h.dump(task, leave_running=True)
    assert_untraced_running(task.pid)
    assert int(proc_status(task.pid)["ShdPnd"], 16) & (1 << 11), "the dump ate the signal"
    core = entries(images, f"core-{task.pid}.img")[0]
    import base64
    for queue in (core["tc"]["signals_s"]["signals"], core["thread_core"]["signals_p"]["signals"]):
        assert len(queue) == 1
        raw = base64.b64decode(queue[0]["siginfo"])
        signo, _errno, code = struct.unpack_from("<iii", raw)
        assert signo == signal.SIGUSR2 and len(raw) == 128


# ---------------------------------------------------------------- which pages
PAGES_SRC = r"""
#include <sys/mman.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	volatile char *anon = mmap(0, 64 * 4096, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd = open(argv[2], O_RDONLY);
	volatile char *file = mmap(0, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	FILE *f = fopen(argv[1], "w");
	long sum = 0;
	for (int i = 0; i < 64; i++)
		sum += anon[i * 4096];          /* read only: the shared zero page */
	for (int i = 0; i < 8; i++)
		sum += file[i * 4096];          /* read only: page cache */
	anon[10 * 4096] = 1;
	anon[11 * 4096 + 7] = 2;
	file[3 * 4096] = 'W';               /* copy-on-write: now anonymous */
	fprintf(f, "ready %p %p %ld\n", (void *)anon, (void *)file, sum);
	fclose(f);
	for (;;)
		pause();
}
"""


def test_only_written_pages_are_dumped(h, tmp_path):
    (tmp_path / "pages.c").write_text(PAGES_SRC)
    subprocess.run(["gcc", "-O2", "-o", str(tmp_path / "pages"), str(tmp_path / "pages.c")], check=True)
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 16 * 8)
    h.bins = dict(h.bins, pages=tmp_path / "pages")
    task = h.start("pages", data, ready=r"ready .*")
    anon, file = (int(x, 16) for x in task.log.lines()[0].split()[1:3])
    images = h.dump(task, leave_running=True)
    ranges = pagemap_ranges(images, task.pid)
    in_anon = [(v, n) for v, n in ranges if anon <= v < anon + 64 * 4096]
    in_file = [(v, n) for v, n in ranges if file <= v < file + 8 * 4096]
    assert in_anon == [(anon + 10 * 4096, 2)]
    assert in_file == [(file + 3 * 4096, 1)]
    # as upstream: private anonymous pages are PE_LAZY | PE_PRESENT, COW'ed file pages PE_PRESENT
    flags = {e["vaddr"]: e["flags"] for e in entries(images, f"pagemap-{task.pid}.img")[1:]}
    assert flags[anon + 10 * 4096] == 6 and flags[file + 3 * 4096] == 4
    # the pagemap fallback (no PAGEMAP_SCAN) sees the zero page and page cache the same way
    from criu_py import kerndat
    from criu_py.mem import dump as memdump
    zero_pfn = kerndat.load("none").zero_pfn
    with open(f"/proc/{task.pid}/pagemap", "rb", buffering=0) as f:
        assert memdump.scan_pages_by_pagemap(f.fileno(), anon, anon + 64 * 4096, zero_pfn) == \
            [(anon + 10 * 4096, anon + 12 * 4096)]
        assert memdump.scan_pages_by_pagemap(f.fileno(), file, file + 8 * 4096, zero_pfn) == \
            [(file + 3 * 4096, file + 4 * 4096)]
    off = 0
    pages = (images / "pages-1.img").read_bytes()
    for v, n in ranges:
        if v == file + 3 * 4096:
            page = pages[off:off + 4096]
            assert page[0:1] == b"W" and page[1:256] == bytes(range(1, 256))
        off += n * 4096
    mm = entries(images, f"mm-{task.pid}.img")[0]
    (fv,) = [v for v in mm["vmas"] if v["start"] == file]
    files = {f["id"]: f for f in entries(images, "files.img")}
    assert fv["status"] == (1 | 1 << 6) and files[fv["shmid"]]["reg"]["name"] == str(data)


PRCTL_SRC = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None)
libc.prctl(1, signal.SIGUSR1, 0, 0, 0)      # PR_SET_PDEATHSIG
libc.prctl(36, 1, 0, 0, 0)                  # PR_SET_CHILD_SUBREAPER
libc.prctl(4, 0, 0, 0, 0)                   # PR_SET_DUMPABLE 0
with open(sys.argv[1], "w") as f:
    f.write(f"ready {os.getpid()}\n")
while True:
    time.sleep(1)
"""


def test_prctl_state_is_recorded(h, tmp_path):
    script = tmp_path / "prctl.py"
    script.write_text(PRCTL_SRC)
    log = tmp_path / "prctl.log"
    p = subprocess.Popen([sys.executable, str(script), str(log)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    h.popens.append(p)
    wait_for(lambda: log.exists() and log.read_text().startswith("ready"), what="ready")
    images = h.images_dir()
    res = run_dump(h, p.pid, images, "--leave-running")
    assert res.returncode == 0, res.stderr
    assert_untraced_running(p.pid)
    core = entries(images, f"core-{p.pid}.img")[0]
    assert core["thread_core"]["pdeath_sig"] == signal.SIGUSR1
    assert core["tc"]["child_subreaper"] is True
    assert entries(images, f"mm-{p.pid}.img")[0]["dumpable"] == 0


HOLDER_SRC = r"""
import os, sys, time
what, log = sys.argv[1], sys.argv[2]
d = os.path.dirname(log)
if what == "fifo":
    os.mkfifo(os.path.join(d, "fifo"))
    fd = os.open(os.path.join(d, "fifo"), os.O_RDWR)
elif what == "deleted file":
    fd = os.open(os.path.join(d, "gone"), os.O_RDWR | os.O_CREAT)
    os.unlink(os.path.join(d, "gone"))
elif what == "character device":
    fd = os.open("/dev/kmsg", os.O_RDONLY)
elif what == "fanotify filesystem mark":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                   ctypes.c_char_p]
    fd = libc.fanotify_init(0, 0)
    # FAN_MARK_ADD | FAN_MARK_FILESYSTEM, FAN_MODIFY
    assert libc.fanotify_mark(fd, 0x1 | 0x100, 0x2, -100, b"/tmp") == 0
with open(log, "w") as f:
    f.write(f"ready {os.getpid()} {fd}\n")
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("what", ["character device", "fanotify filesystem mark"])
def test_other_unsupported_fds_are_refused(h, tmp_path, what):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER_SRC)
    log = tmp_path / "holder.log"
    p = subprocess.Popen([sys.executable, str(script), what, str(log)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    h.popens.append(p)
    wait_for(lambda: log.exists() and log.read_text().startswith("ready"), what="ready")
    fd = log.read_text().split()[2]
    images = h.images_dir()
    res = run_dump(h, p.pid, images)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and f"pid {p.pid} fd {fd}: {what}" in err, err
    assert no_images(images)
    assert_untraced_running(p.pid)


def test_pagemap_fallback_finds_the_same_pages(h):
    """Without PAGEMAP_SCAN (kernels < 6.7) the dump reads pagemap entries itself: on a
    live task both ways find the same ranges."""
    from criu_py import kerndat, proc
    from criu_py.mem import dump as memdump
    task = h.start("memhog", 4, 9)
    facts = kerndat.load("none")
    assert facts.pagemap_scan and facts.zero_pfn, "this machine has both"
    with open(f"/proc/{task.pid}/pagemap", "rb", buffering=0) as f:
        fd = f.fileno()
        for v in proc.read_maps(task.pid):
            if v.shared or v.path in ("[vsyscall]", "[vvar]", "[vvar_vclock]", "[vdso]"):
                continue
            assert memdump.scan_pages(fd, v.start, v.end) == \
                memdump.scan_pages_by_pagemap(fd, v.start, v.end, facts.zero_pfn), v


def test_task_in_another_namespace_is_refused(h):
    p = subprocess.Popen(["unshare", "--uts", "sleep", "60"], start_new_session=True,
                         stdin=subprocess.DEVNULL)
    h.popens.append(p)
    wait_for(lambda: os.readlink(f"/proc/{p.pid}/exe").endswith("sleep"), what="exec of sleep")
    images = h.images_dir()
    res = run_dump(h, p.pid, images)
    assert res.returncode == 1 and "uts namespace" in res.stderr, res.stderr
    assert no_images(images)
    assert_untraced_running(p.pid)


def test_vmsplice_blob_is_its_source(tmp_path):
    """parasite.VMSPLICE_BLOB is csrc/blobs/vmsplice.S assembled (then its ending)."""
    import shutil

    from criu_py.dump.parasite import VMSPLICE_BLOB
    from criu_py.ptrace import BLOB_END, SIGNAL_END
    if not shutil.which("gcc") or not shutil.which("objcopy"):
        pytest.skip("gcc and objcopy are needed to assemble the blob")
    src = Path(__file__).resolve().parent.parent / "csrc" / "blobs" / "vmsplice.S"
    subprocess.run(["gcc", "-c", src, "-o", tmp_path / "v.o"], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", tmp_path / "v.o",
                    tmp_path / "v.bin"], check=True)
    assert (tmp_path / "v.bin").read_bytes() + SIGNAL_END + BLOB_END == VMSPLICE_BLOB
