# The PIE restorer on its own, without images: a forked child hands the restorer a
# hand-made layout (code, anonymous data, a private file mapping), page contents in a
# file, signal actions and a register state; the restorer unmaps the interpreter, builds
# that layout and rt_sigreturns into a few instructions that report registers and memory
# through a pipe. Also: the blob is freestanding (no reference outside its section).
import os
import re
import signal
import struct
import subprocess
import tempfile

import pytest

from criu_py.native import ffi, lib
from criu_py.restore import pie
from criu_py.restore.sigframe import TaskRegisters, local_xstate, restart_syscall

PAGE = 4096

# Stores ymm1 at rsi+0x40 and zmm16 at rsi+0x80, rt_sigprocmask(0, NULL, rsi+0x100),
# rt_sigaction(SIGUSR1, NULL, rsi+0x120), sigaltstack(NULL, rsi+0x140), r15 at
# rsi+0x110, then write(rdi, rsi, rdx) and exit_group(rbx). Assembled by GNU as from:
#   vmovdqu %ymm1,0x40(%rsi); vmovdqu64 %zmm16,0x80(%rsi); mov %rdi,%r12; mov %rsi,%r13
#   mov %rdx,%r14; mov $14,%eax; xor %edi,%edi; xor %esi,%esi; lea 0x100(%r13),%rdx
#   mov $8,%r10d; syscall; mov $13,%eax; mov $10,%edi; xor %esi,%esi; lea 0x120(%r13),%rdx
#   mov $8,%r10d; syscall; mov $131,%eax; xor %edi,%edi; lea 0x140(%r13),%rsi; syscall
#   mov %r15,0x110(%r13); mov %r12,%rdi; mov %r13,%rsi; mov %r14,%rdx; mov $1,%eax; syscall
#   mov %rbx,%rdi; mov $231,%eax; syscall
CODE = bytes.fromhex(
    "c5fe7f4e4062e1fe487f46024989fc4989f54989d6b80e00000031ff31f6498d950001000041ba08000000"
    "0f05b80d000000bf0a00000031f6498d952001000041ba080000000f05b88300000031ff498db540010000"
    "0f054d89bd100100004c89e74c89ee4c89f2b8010000000f054889dfb8e70000000f05")



def module_path() -> str:
    import criu_py._native as native
    return native.__file__


ZMM_STORE = bytes.fromhex("62e1fe487f4602")      # vmovdqu64 %zmm16,0x80(%rsi)


def has_avx512() -> bool:
    return bool(local_xstate()[0] & 0x80)


def code_for_this_cpu() -> bytes:
    """Without AVX-512 (not the project's machines) the zmm store becomes NOPs."""
    return CODE if has_avx512() else CODE.replace(ZMM_STORE, b"\x90" * len(ZMM_STORE))


def make_xsave(ymm1: bytes, zmm16: bytes) -> bytes:
    """An xsave area in this CPU's layout (offsets from CPUID, they vary between CPUs)."""
    xcr0, size, comps = local_xstate()
    AVX_OFF = comps[2][0]
    buf = bytearray(size)
    struct.pack_into("<H", buf, 0, 0x37f)              # fcw
    struct.pack_into("<II", buf, 24, 0x1f80, 0xffff)   # mxcsr, mxcsr_mask
    buf[160 + 16:160 + 32] = ymm1[:16]                 # xmm1
    buf[AVX_OFF + 16:AVX_OFF + 32] = ymm1[16:]         # upper half of ymm1
    if 7 in comps:
        buf[comps[7][0]:comps[7][0] + 64] = zmm16      # zmm16 (Hi16_ZMM component)
    struct.pack_into("<Q", buf, 464, xcr0)             # ptrace keeps XCR0 here
    struct.pack_into("<Q", buf, 512, (0x1 | 0x2 | 0x4 | 0x80) & xcr0)   # xstate_bv
    return bytes(buf)


def test_blob_is_freestanding():
    so = module_path()
    hdr = subprocess.run(["objdump", "-h", so], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\s\d+\s+criu_pie\s+([0-9a-f]+)\s+([0-9a-f]+)", hdr)
    assert m, "no criu_pie section in the native module"
    size, start = int(m.group(1), 16), int(m.group(2), 16)
    end = start + size
    dis = subprocess.run(["objdump", "-d", "--section=criu_pie", so],
                         capture_output=True, text=True, check=True).stdout
    bad = []
    for line in dis.splitlines():
        ins = line.split("\t")
        if len(ins) < 3:
            continue
        text = ins[2]
        if "@plt" in text or "@GOT" in text or "_GLOBAL_OFFSET_TABLE_" in text:
            bad.append(line)
        op = text.split()[0] if text.split() else ""
        if op.startswith(("call", "jmp", "j")) and "*" in text:
            bad.append(line)                           # indirect transfer
        elif op.startswith(("call", "jmp", "j")):
            t = re.match(r"\S+\s+([0-9a-f]+)\b", text)
            if t and not start <= int(t.group(1), 16) < end:
                bad.append(line)
        if "(%rip)" in text:
            t = re.search(r"#\s*([0-9a-f]+)", text)
            if not t or not start <= int(t.group(1), 16) < end:
                bad.append(line)
    assert not bad, "restorer leaves its section:\n" + "\n".join(bad)
    relocs = subprocess.run(["objdump", "-R", so], capture_output=True, text=True, check=True).stdout
    for line in relocs.splitlines():
        f = line.split()
        if f and re.fullmatch(r"[0-9a-f]{8,16}", f[0]) and start <= int(f[0], 16) < end:
            pytest.fail(f"dynamic relocation inside the restorer: {line}")


def test_blob_has_entry_inside():
    start, stop = lib.criu_py_pie_blob_start(), lib.criu_py_pie_blob_end()
    assert start < lib.criu_py_pie_entry() < stop


def test_restart_adjustment():
    gp = {"ax": (-516) & (2**64 - 1), "orig_ax": 230, "ip": 0x1002}
    assert restart_syscall(gp) == {"ax": 230, "orig_ax": 230, "ip": 0x1000}
    gp = {"ax": 5, "orig_ax": 0, "ip": 0x1002}
    assert restart_syscall(gp) == gp
    gp = {"ax": (-4) & (2**64 - 1), "orig_ax": 7, "ip": 0x1002}   # -EINTR stays
    assert restart_syscall(gp) == gp


def _run_restorer_child(base, pages_path, file_path, out_w, status_w, regs, sigactions,
                        break_file_fd=False):
    """In the forked child: describe the layout and jump. Never returns."""
    try:
        pages_fd = os.open(pages_path, os.O_RDONLY)
        file_fd = os.open(file_path, os.O_RDONLY)
        if break_file_fd:
            os.close(file_fd)
        vmas = [
            pie.PieVma(base, base + PAGE, 5, 0x02, lib.PIE_VMA_ANON, map_prot=7),     # code r-x
            pie.PieVma(base + PAGE, base + 3 * PAGE, 3, 0x02, lib.PIE_VMA_ANON),      # data rw-
            pie.PieVma(base + 3 * PAGE, base + 5 * PAGE, 1, 0x02, lib.PIE_VMA_FILE,   # file r--
                       fd=file_fd, pgoff=PAGE, map_prot=3),
        ]
        # pages file: code, data1, data2, file-page-2 overwrite; one iovec per run.
        iovs = [(base, 3 * PAGE), (base + 4 * PAGE, PAGE)]
        plan = pie.PiePlan(vmas=vmas, iovs=iovs, pages_fd=pages_fd, regs=regs,
                           status_fd=status_w, sigactions=sigactions,
                           close_fds=[pages_fd, file_fd])
        blob = lib.criu_py_pie_blob_end() - lib.criu_py_pie_blob_start()
        size = pie.region_size(plan, blob)
        busy = pie.current_layout() + [(base, base + 5 * PAGE)]
        region = pie.free_gap(size, busy)
        pie.map_region(region, size)
        entry, args, stack = pie.prepare(plan, region, size)
        pie.enter(entry, args, stack)
    except BaseException as exc:   # noqa: BLE001 - the child must never return to pytest
        os.write(status_w, f"child: {exc!r}".encode())
    os._exit(99)


def _run(break_file_fd=False):
    """Run the restorer in a forked child on the hand-made layout; returns what the
    status pipe, the output pipe and waitpid said, and the expected values."""
    base = 0x200000000
    exp = {
        "data1": bytes((i * 7) & 0xff for i in range(PAGE)),
        "data2": b"second-data-page" * (PAGE // 16),
        "file_pages": [bytes([0x41 + i]) * PAGE for i in range(3)],
        "overwrite": b"cow!" * (PAGE // 4),
        "ymm1": bytes(range(32)),
        "zmm16": bytes(range(100, 164)),
        "sigmask": (1 << (signal.SIGUSR2 - 1)) | (1 << (signal.SIGTERM - 1)),
        "handler": (0x7f0000001000, 0x04000000 | 0x10000000, 0x7f0000002000, 1 << 1),
        "altstack": (base + PAGE, 0, PAGE),
    }
    with tempfile.TemporaryDirectory() as d:
        pages_path, file_path = os.path.join(d, "pages"), os.path.join(d, "file")
        with open(pages_path, "wb") as f:
            f.write(code_for_this_cpu().ljust(PAGE, b"\xcc") + exp["data1"] + exp["data2"] + exp["overwrite"])
        with open(file_path, "wb") as f:
            f.write(b"".join(exp["file_pages"]))
        out_r, out_w = os.pipe()
        st_r, st_w = os.pipe()
        length = 4 * PAGE
        gp = {"ip": base, "ax": 1, "di": out_w, "si": base + PAGE, "dx": length, "bx": 42,
              "r15": 0x1122334455667788, "sp": base + 3 * PAGE - 256, "flags": 0x202,
              "cs": 0x33, "ss": 0x2b, "orig_ax": 2**64 - 1}
        regs = TaskRegisters(gp=gp, xsave=make_xsave(exp["ymm1"], exp["zmm16"]),
                             sigmask=exp["sigmask"], altstack=exp["altstack"])
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            os.close(st_r)
            _run_restorer_child(base, pages_path, file_path, out_w, st_w, regs,
                                {signal.SIGUSR1: exp["handler"]}, break_file_fd)
        os.close(out_w)
        os.close(st_w)
        status = b""
        while chunk := os.read(st_r, 4096):
            status += chunk
        out = b""
        while chunk := os.read(out_r, 65536):
            out += chunk
        _, wst = os.waitpid(pid, 0)
        os.close(out_r)
        os.close(st_r)
    return status, out, wst, exp, base


def test_restorer_builds_layout_and_registers():
    status, out, wst, exp, base = _run()
    assert len(status) == ffi.sizeof("struct pie_status"), status
    magic, stage, ret, arg = struct.unpack("<IiqQi4x", status)[:4]
    assert (magic, stage) == (lib.PIE_STATUS_MAGIC, lib.PIE_STAGE_DONE)
    assert ret > 0 and arg % 4096 == 0      # the region: length, start
    assert os.WIFEXITED(wst) and os.WEXITSTATUS(wst) == 42, wst
    assert len(out) == 4 * PAGE
    data1 = exp["data1"]
    assert out[:0x40] == data1[:0x40]
    assert out[0x40:0x60] == exp["ymm1"]
    if has_avx512():
        assert out[0x80:0xc0] == exp["zmm16"]
    assert struct.unpack_from("<Q", out, 0x100)[0] == exp["sigmask"]
    assert struct.unpack_from("<Q", out, 0x110)[0] == 0x1122334455667788
    assert struct.unpack_from("<4Q", out, 0x120) == exp["handler"]
    ss_sp, ss_flags, ss_size = struct.unpack_from("<Qi4xQ", out, 0x140)
    assert (ss_sp, ss_flags, ss_size) == exp["altstack"]
    assert out[0x158:PAGE] == data1[0x158:]
    assert out[PAGE:2 * PAGE] == exp["data2"]
    assert out[2 * PAGE:3 * PAGE] == exp["file_pages"][1]
    assert out[3 * PAGE:] == exp["overwrite"]


def test_restorer_failure_reports_stage_and_ends_the_task():
    status, out, wst, exp, base = _run(break_file_fd=True)
    assert len(status) == ffi.sizeof("struct pie_status"), status
    magic, stage, ret, arg = struct.unpack("<IiqQi4x", status)[:4]
    assert (magic, stage, ret, arg) == (lib.PIE_STATUS_MAGIC, lib.PIE_STAGE_MAP_VMA, -9, base + 3 * PAGE)
    assert os.WIFEXITED(wst) and os.WEXITSTATUS(wst) == 127
    assert out == b""


def test_free_gap_avoids_both_layouts():
    M = 1 << 20
    busy = [(0x10000000, 0x10000000 + M), (0x7fff00000000, pie.TASK_SIZE), (0x20000000, 0x30000000)]
    addr = pie.free_gap(4 * M, busy)
    assert addr % PAGE == 0
    assert all(addr + 4 * M + PAGE <= s or addr >= e + PAGE for s, e in busy)
    assert addr + 4 * M <= 0x7fff00000000 - PAGE            # the highest gap that fits
    with pytest.raises(MemoryError):
        pie.free_gap(1 << 47, busy)


def test_map_free_reads_the_layout_again_when_the_range_was_taken():
    """map_free() places by the layout as last known; something mapped since is found
    by MAP_FIXED_NOREPLACE, and the range is chosen again from a fresh read."""
    import mmap
    size = 4 * PAGE
    saved = pie._known_layout
    pie._known_layout = []                      # knows nothing: picks the very top
    top = pie.free_gap(size, [])
    blocker = pie.map_region(top, size)         # taken behind its back
    addr = 0
    try:
        addr = pie.map_free(size, [], mmap.PROT_READ | mmap.PROT_WRITE,
                            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        assert addr + size <= blocker or addr >= blocker + size
        assert (addr, addr + size) in pie._known_layout
        assert any(s <= blocker < e for s, e in pie._known_layout)   # read afresh
        ffi.cast("char *", addr)[0] = b"x"      # mapped, writable
    finally:
        lib.criu_py_restore_syscall(11, blocker, size, 0, 0, 0, 0)
        if addr:
            lib.criu_py_restore_syscall(11, addr, size, 0, 0, 0, 0)
        pie._known_layout = saved
