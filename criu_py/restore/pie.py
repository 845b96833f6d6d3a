# Hand-over from Python to the PIE restorer (csrc/pie_restorer.c). Everything the
# restorer needs is laid out in one anonymous "restorer region" at an address that is free
# both now and in the restored layout: the restorer's code (copied out of the cffi module's
# criu_pie section), the struct pie_args, the VMA and iovec arrays, sigactions, auxv, the
# rt_sigframe and a stack. The region is all that survives the restorer's big unmap.
import mmap
import struct
from dataclasses import dataclass, field

from criu_py.restore.sigframe import TaskRegisters, build_sigframe, frame_layout, fpstate_for_sigreturn

PAGE = 4096
STACK_SIZE = 64 * 1024
TASK_SIZE = 0x7FFFFFFFF000
MAP_FIXED_NOREPLACE = 0x100000


def page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass
class PieVma:
    """One VMA as the restorer maps it (struct pie_vma)."""
    start: int
    end: int
    prot: int
    flags: int
    kind: int           # lib.PIE_VMA_ANON / PIE_VMA_FILE
    fd: int = -1
    pgoff: int = 0
    madv: int = 0
    map_prot: int | None = None   # None: the final prot (no pages are read into it)


@dataclass
class PiePlan:
    """Everything the restorer does, in Python terms; prepare() lays it out in the region."""
    vmas: list[PieVma]
    iovs: list[tuple[int | None, int]]   # (address, length) in pages-file order; None: skip
    pages_fd: int
    regs: TaskRegisters
    status_fd: int = -1
    pages_off: int = 0
    vdso_vvar: int = 0
    sigactions: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # signo -> (handler, flags, restorer, mask)
    new_rseq: tuple[int, int, int] | None = None   # (address, size, signature)
    clear_child_tid: int = 0
    mm_map: dict | None = None           # pie_mm_map field -> value; "auxv" a list of u64
    exe_fd: int = -1
    close_fds: list[int] = field(default_factory=list)
    trap_before_sigreturn: bool = False
    frame_on_stack: bool = False         # sigframe on the task's stack (region can go)


def region_size(plan: PiePlan, blob_len: int) -> int:
    from criu_py.native import ffi
    fp_len = len(fpstate_for_sigreturn(plan.regs.xsave))
    frame_len, _ = frame_layout(fp_len)
    n = page_up(blob_len)
    n += ffi.sizeof("struct pie_args") + 64
    n += len(plan.vmas) * ffi.sizeof("struct pie_vma")
    n += len(plan.iovs) * 16 + page_up(skip_len(plan))
    n += 64 * ffi.sizeof("struct pie_sigaction")
    n += 8 * len((plan.mm_map or {}).get("auxv", [])) + 8
    n += 4 * (len(plan.close_fds) + 1)
    n += frame_len + 128
    return page_up(n + PAGE) + STACK_SIZE


def skip_len(plan: PiePlan) -> int:
    return max((n for b, n in plan.iovs if b is None), default=0)


def free_gap(size: int, busy: list[tuple[int, int]], low: int = 0x10000, high: int = TASK_SIZE) -> int:
    """Highest page-aligned address where [addr, addr+size) overlaps nothing in `busy`
    (ranges of the current and of the target layout), leaving a guard page each side."""
    spans = sorted((max(s - PAGE, 0), e + PAGE) for s, e in busy if s < high)
    top = high
    for s, e in reversed(spans):
        if e <= top and top - e >= size:
            return (top - size) & ~(PAGE - 1)
        top = min(top, s)
    if top - low >= size:
        return (top - size) & ~(PAGE - 1)
    raise MemoryError("no address range free in both the current and the restored layout")


def current_layout() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            s, e = line.split(None, 1)[0].split("-")
            out.append((int(s, 16), int(e, 16)))
    return out


class _Writer:
    """Bump allocator over the region while it is filled."""

    def __init__(self, ffi, base: int, end: int):
        self.ffi, self.pos, self.end = ffi, base, end

    def alloc(self, n: int, align: int = 16) -> int:
        self.pos = (self.pos + align - 1) & ~(align - 1)
        addr = self.pos
        self.pos += n
        if self.pos > self.end:
            raise MemoryError("restorer region overflow")
        return addr

    def put(self, data: bytes, align: int = 16) -> int:
        addr = self.alloc(len(data), align)
        self.ffi.memmove(self.ffi.cast("char *", addr), data, len(data))
        return addr


def map_region(addr: int, size: int) -> int:
    """Map the region RWX at exactly `addr` (it must be free)."""
    from criu_py.native import lib
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    r = lib.criu_py_restore_syscall(9, addr, size, prot,
                                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    if r != addr:
        raise OSError(-r if r < 0 else 17, f"cannot map the restorer region at {addr:#x}")
    return addr


def prepare(plan: PiePlan, base: int, size: int) -> tuple[int, int, int]:
    """Fill the (already mapped) region at `base`; return (entry, args, stack_top)."""
    from criu_py.native import ffi, lib
    start, stop = lib.criu_py_pie_blob_start(), lib.criu_py_pie_blob_end()
    blob_len = stop - start
    ffi.memmove(ffi.cast("char *", base), ffi.cast("char *", start), blob_len)
    entry = base + (lib.criu_py_pie_entry() - start)
    w = _Writer(ffi, base + page_up(blob_len), base + size - STACK_SIZE)

    args_addr = w.alloc(ffi.sizeof("struct pie_args"), 64)
    a = ffi.cast("struct pie_args *", args_addr)
    ffi.memmove(a, bytes(ffi.sizeof("struct pie_args")), ffi.sizeof("struct pie_args"))

    a.keep_start = base
    a.keep_end = base + size
    a.task_size = TASK_SIZE

    vma_sz = ffi.sizeof("struct pie_vma")
    vmas_addr = w.alloc(max(1, len(plan.vmas)) * vma_sz, 16)
    for i, v in enumerate(plan.vmas):
        p = ffi.cast("struct pie_vma *", vmas_addr + i * vma_sz)
        p.start, p.end, p.pgoff, p.madv = v.start, v.end, v.pgoff, v.madv
        p.prot, p.flags, p.fd, p.kind = v.prot, v.flags, v.fd, v.kind
        p.map_prot = v.prot if v.map_prot is None else v.map_prot
    a.vmas, a.nr_vmas = vmas_addr, len(plan.vmas)

    skip = skip_len(plan)
    scratch = w.alloc(skip, PAGE) if skip else 0      # bytes read only to be dropped
    iov_bytes = b"".join(struct.pack("<QQ", scratch if b is None else b, n) for b, n in plan.iovs)
    a.iovs = w.put(iov_bytes or bytes(16), 16)
    a.nr_iovs = len(plan.iovs)
    a.pages_fd, a.pages_off, a.status_fd = plan.pages_fd, plan.pages_off, plan.status_fd
    a.vdso_vvar = plan.vdso_vvar

    acts = bytearray(64 * 32)
    mask = 0
    for sig, (handler, flags, restorer, smask) in plan.sigactions.items():
        struct.pack_into("<QQQQ", acts, (sig - 1) * 32, handler, flags, restorer, smask)
        mask |= 1 << (sig - 1)
    a.sigactions, a.sigaction_mask = w.put(bytes(acts)), mask

    rseq_addr, rseq_size = lib.criu_py_glibc_rseq_addr(), lib.criu_py_glibc_rseq_size()
    if rseq_addr:
        # glibc registers the 32-byte original struct rseq even when __rseq_size says less.
        a.old_rseq, a.old_rseq_len, a.old_rseq_sig = rseq_addr, max(32, rseq_size), 0x53053053
    if plan.new_rseq:
        a.new_rseq, a.new_rseq_len, a.new_rseq_sig = plan.new_rseq
    a.clear_child_tid = plan.clear_child_tid

    if plan.mm_map is not None:
        mm = dict(plan.mm_map)
        auxv = mm.pop("auxv", [])
        for k, v in mm.items():
            setattr(a.mm_map, k, v)
        a.mm_map.auxv = w.put(struct.pack(f"<{len(auxv)}Q", *auxv) or bytes(8), 8)
        a.mm_map.auxv_size = 8 * len(auxv)
        a.mm_map.exe_fd = plan.exe_fd & 0xFFFFFFFF
        a.has_mm_map = 1

    fds = [fd for fd in plan.close_fds if fd != plan.status_fd]
    a.close_fds = w.put(struct.pack(f"<{len(fds)}i", *fds) or bytes(4), 4)
    a.nr_close_fds = len(fds)

    a.fs_base = plan.regs.gp.get("fs_base", 0)
    a.gs_base = plan.regs.gp.get("gs_base", 0)
    frame_len = frame_layout(len(fpstate_for_sigreturn(plan.regs.xsave)))[0]
    if plan.frame_on_stack:
        # Built for its final place below the task's red zone; the restorer copies it
        # there once the stack's contents are back.
        final = stack_frame_addr(plan.regs.gp["sp"], frame_len)
        frame = build_sigframe(final, plan.regs)
        a.sigframe_src, a.sigframe_len = w.put(frame, 64), len(frame)
        a.sigframe = final
    else:
        frame_addr = w.alloc(frame_len, 64)
        frame = build_sigframe(frame_addr, plan.regs)
        ffi.memmove(ffi.cast("char *", frame_addr), frame, len(frame))
        a.sigframe = frame_addr
    a.trap_before_sigreturn = 1 if plan.trap_before_sigreturn else 0
    return entry, args_addr, (base + size - 64) & ~15


def stack_frame_addr(sp: int, frame_len: int) -> int:
    """Where the kernel would put a signal frame: below the 128-byte red zone, aligned."""
    return (sp - 128 - frame_len) & ~63


def frame_bytes(regs: TaskRegisters) -> int:
    return frame_layout(len(fpstate_for_sigreturn(regs.xsave)))[0]


def enter(entry: int, args: int, stack_top: int):
    """Jump into the restorer. Never returns: the interpreter is gone after this."""
    from criu_py.native import lib
    lib.criu_py_enter_restorer(entry, args, stack_top)
    raise AssertionError("the restorer returned")
