# Hand-over from Python to the PIE restorer (csrc/pie_restorer.c). Everything the
# restorer needs is laid out in one anonymous "restorer region" at an address that is free
# both now and in the restored layout: the restorer's code (copied out of the cffi module's
# criu_pie section), the struct pie_args, the VMA and iovec arrays, sigactions, auxv, one
# struct pie_thread per thread with its rt_sigframe, credentials and pending signals, and
# a stack per thread. The region is all that survives the restorer's big unmap (with the
# premapped VMAs and the shared sync page).
import mmap
import os
import struct

from criu_py.proc import Record
from criu_py.restore.sigframe import LEGACY_XSAVE_SIZE, TaskRegisters, build_sigframe, frame_layout

PAGE = 4096
STACK_SIZE = 64 * 1024
THREAD_STACK_SIZE = 16 * 1024
TASK_SIZE = 0x7FFFFFFFF000
MAP_FIXED_NOREPLACE = 0x100000
SIGINFO_SIZE = 128


def page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


class PieVma(Record):
    """One VMA as the restorer maps it (struct pie_vma)."""
    _fields = ("start", "end", "prot", "flags", "kind", "fd", "pgoff", "madv", "map_prot", "src")

    def __init__(self, start: int, end: int, prot: int, flags: int, kind: int, fd: int = -1,
                 pgoff: int = 0, madv: int = 0, map_prot: int | None = None, src: int = 0):
        self.start = start
        self.end = end
        self.prot = prot
        self.flags = flags
        self.kind = kind            # lib.PIE_VMA_ANON / PIE_VMA_FILE / PIE_VMA_PREMAPPED
        self.fd = fd
        self.pgoff = pgoff
        self.madv = madv
        self.map_prot = map_prot    # None: the final prot (no pages are read into it)
        self.src = src              # PREMAPPED: its address in the premap area


class PieCreds(Record):
    """struct pie_creds: ids (real, effective, saved, fs), capability sets as two u32
    words each, securebits, no_new_privs, supplementary groups."""
    _fields = ("uids", "gids", "cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb", "secbits",
               "no_new_privs", "groups", "cap_last_cap")

    def __init__(self, uids: tuple, gids: tuple, cap_inh: tuple, cap_prm: tuple, cap_eff: tuple,
                 cap_bnd: tuple, cap_amb: tuple, secbits: int = 0, no_new_privs: int = 0,
                 groups: tuple = (), cap_last_cap: int = 40):
        self.uids = uids
        self.gids = gids
        self.cap_inh = cap_inh
        self.cap_prm = cap_prm
        self.cap_eff = cap_eff
        self.cap_bnd = cap_bnd
        self.cap_amb = cap_amb
        self.secbits = secbits
        self.no_new_privs = no_new_privs
        self.groups = groups
        self.cap_last_cap = cap_last_cap


class PieThread(Record):
    """One thread as the restorer sets it up (struct pie_thread)."""
    _fields = ("tid", "regs", "frame_on_stack", "clear_child_tid", "rseq", "robust_list", "sched",
               "nice", "comm", "signals", "creds", "pdeath_sig")

    def __init__(self, tid: int, regs: TaskRegisters, frame_on_stack: bool = False,
                 clear_child_tid: int = 0, rseq: tuple[int, int, int] | None = None,
                 robust_list: tuple[int, int] = (0, 0), sched: tuple[int, int] | None = None,
                 nice: int | None = None, comm: bytes = b"", signals: list | None = None,
                 creds: PieCreds | None = None, pdeath_sig: int = 0):
        self.tid = tid
        self.regs = regs
        self.frame_on_stack = frame_on_stack     # sigframe below the thread's own sp
        self.clear_child_tid = clear_child_tid
        self.rseq = rseq                         # (address, size, signature)
        self.robust_list = robust_list
        self.sched = sched                       # (policy, priority)
        self.nice = nice
        self.comm = comm
        self.signals = [] if signals is None else signals   # 128-byte siginfos
        self.creds = creds                       # None: keep ours
        self.pdeath_sig = pdeath_sig


class PiePlan(Record):
    """Everything the restorer does, in Python terms; prepare() lays it out in the region."""
    _fields = ("vmas", "page_sources", "iovs", "pages_fd", "regs", "threads", "status_fd", "vdso_vvar",
               "sigactions", "new_rseq", "clear_child_tid", "mm_map", "exe_fd", "close_fds",
               "trap_before_sigreturn", "frame_on_stack", "signals", "dumpable", "tgid", "premap",
               "sync", "stage_ready", "stage_go", "vfork", "clone_flags", "fd_moves", "cwd_fd",
               "root_fd", "umask", "setsid", "pgid", "personality", "rlimits", "itimers",
               "arm_itimers", "posix_timers", "timerfds", "locks", "uffd", "lazy")

    def __init__(self, vmas: list[PieVma], page_sources: list[tuple[int, list]] | None = None,
                 iovs: list[tuple[int | None, int]] | None = None, pages_fd: int = -1,
                 regs: TaskRegisters | None = None, threads: list[PieThread] | None = None,
                 status_fd: int = -1, vdso_vvar: int = 0,
                 sigactions: dict[int, tuple[int, int, int, int]] | None = None,
                 new_rseq: tuple[int, int, int] | None = None, clear_child_tid: int = 0,
                 mm_map: dict | None = None, exe_fd: int = -1, close_fds: list[int] | None = None,
                 trap_before_sigreturn: bool = False, frame_on_stack: bool = False,
                 signals: list | None = None, dumpable: int = -1, tgid: int = 0,
                 premap: tuple[int, int] = (0, 0), sync: tuple[int, int] = (0, 0),
                 stage_ready: int = 0, stage_go: int = 0, vfork: "PiePlan | None" = None,
                 clone_flags: int = 0, fd_moves: list | None = None, cwd_fd: int = -1,
                 root_fd: int = -1, umask: int = -1, setsid: bool = False, pgid: int = 0,
                 personality: int = -1, rlimits: list | None = None, itimers: list | None = None,
                 arm_itimers: bool = False, posix_timers: list | None = None,
                 timerfds: list | None = None, locks: list | None = None, uffd: int = -1,
                 lazy: list | None = None):
        self.vmas = vmas
        # (pages fd, [(address, length) in that file's order; address None: skip]): the
        # dump's own pages file and its parents' (incremental dumps)
        self.page_sources = [] if page_sources is None else page_sources
        self.iovs = [] if iovs is None else iovs    # one-file short form
        self.pages_fd = pages_fd                    # of page_sources
        self.regs = regs                            # single-threaded short form of threads[0].regs
        self.threads = [] if threads is None else threads
        self.status_fd = status_fd
        self.vdso_vvar = vdso_vvar
        # signo -> (handler, flags, restorer, mask)
        self.sigactions = {} if sigactions is None else sigactions
        self.new_rseq = new_rseq                    # single-threaded short form
        self.clear_child_tid = clear_child_tid      # single-threaded short form
        self.mm_map = mm_map                        # pie_mm_map field -> value; "auxv" a list of u64
        self.exe_fd = exe_fd
        self.close_fds = [] if close_fds is None else close_fds
        self.trap_before_sigreturn = trap_before_sigreturn
        self.frame_on_stack = frame_on_stack        # single-threaded short form
        self.signals = [] if signals is None else signals   # process-wide pending siginfos
        self.dumpable = dumpable
        self.tgid = tgid
        self.premap = premap                        # [start, end) of the premap area
        self.sync = sync                            # (address, length) of the shared sync page
        self.stage_ready = stage_ready
        self.stage_go = stage_go
        self.vfork = vfork                          # a child sharing this memory, made once ready
        self.clone_flags = clone_flags              # how that child is made (CLONE_VM, CLONE_VFORK, ...)
        # What a process made by the restorer (a vfork child) sets up itself:
        self.fd_moves = [] if fd_moves is None else fd_moves   # (parked fd, fd number, cloexec)
        self.cwd_fd = cwd_fd
        self.root_fd = root_fd
        self.umask = umask
        self.setsid = setsid
        self.pgid = pgid
        self.personality = personality
        self.rlimits = [] if rlimits is None else rlimits   # (cur, max) in RLIMIT_* order
        self.itimers = itimers                      # 3 x (interval s, us, value s, us)
        self.arm_itimers = arm_itimers              # the leader sets itimers right before returning
        # (id, clockid, signo, notify, thread id, sival, (isec, insec, vsec, vnsec)), by id
        self.posix_timers = [] if posix_timers is None else posix_timers
        # (fd, settime flags, clockid, ticks, (isec, insec, vsec, vnsec))
        self.timerfds = [] if timerfds is None else timerfds
        self.locks = [] if locks is None else locks   # POSIX locks: (fd, type, start, len)
        # Lazy restore: the task's userfaultfd (parked; -1: none) and the (start, end) ranges
        # the restorer registers with it once the other pages are in (criu_py/lazy/).
        self.uffd = uffd
        self.lazy = [] if lazy is None else lazy
        if not self.page_sources and self.iovs:
            self.page_sources = [(self.pages_fd, self.iovs)]
        if not self.threads and self.regs is not None:
            self.threads = [PieThread(tid=self.tgid, regs=self.regs,
                                      frame_on_stack=self.frame_on_stack,
                                      clear_child_tid=self.clear_child_tid,
                                      rseq=self.new_rseq)]


def _frame_len(regs: TaskRegisters) -> int:
    """The size of the frame build_sigframe makes for regs: its xsave part is always this
    process's signal-frame size (frame_bytes_here), so the frame is not built for it."""
    if len(regs.xsave) < LEGACY_XSAVE_SIZE:
        raise ValueError(f"xsave area of {len(regs.xsave)} bytes is too short")
    return frame_bytes_here()


def region_size(plan: PiePlan, blob_len: int) -> int:
    n = page_up(blob_len) + _data_size(plan)
    if plan.vfork is not None:
        n += _data_size(plan.vfork)
    n = page_up(n + PAGE)
    nthreads = len(plan.threads) + (1 if plan.vfork is not None else 0)
    return n + STACK_SIZE + THREAD_STACK_SIZE * max(0, nthreads - 1)


def _data_size(plan: PiePlan) -> int:
    from criu_py.native import ffi
    n = ffi.sizeof("struct pie_args") + 64
    n += len(plan.vmas) * ffi.sizeof("struct pie_vma")
    n += sum(len(iovs) * 16 + 48 for _, iovs in plan.page_sources) + 16
    n += 64 * ffi.sizeof("struct pie_sigaction")
    n += 8 * len((plan.mm_map or {}).get("auxv", [])) + 8
    n += 4 * (len(plan.close_fds) + 1)
    n += SIGINFO_SIZE * len(plan.signals) + 16
    for t in plan.threads:
        n += ffi.sizeof("struct pie_thread") + 64
        n += _frame_len(t.regs) + 128
        n += SIGINFO_SIZE * len(t.signals) + 16
        n += 4 * len(t.creds.groups if t.creds else ()) + 16
    n += 16 * len(plan.fd_moves) + 16 * len(plan.rlimits) + 96 + 64
    n += 64 * len(plan.posix_timers) + 64 * len(plan.timerfds) + 32 * len(plan.locks) + 64
    n += 16 * len(plan.lazy) + 32
    return n


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
    """This process's mappings as [start, end) spans, adjacent ones merged (free_gap()
    sees the same free ranges: ~300 mappings of the restore command are ~30 spans, and
    every task looks for a free range in them twice)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            s, e = line.split(None, 1)[0].split("-")
            s, e = int(s, 16), int(e, 16)
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], e))
            else:
                out.append((s, e))
    return out


# This process's layout as last read, plus what map_free() mapped since: where to look
# for a free range without reading /proc/self/maps again in every task (a forked task
# inherits its parent's, with the parent's premap area). Only a hint: map_free() maps
# with MAP_FIXED_NOREPLACE, and reads the layout afresh when the range was taken.
_known_layout: list[tuple[int, int]] | None = None


def known_layout() -> list[tuple[int, int]]:
    global _known_layout
    if _known_layout is None:
        _known_layout = current_layout()
    return _known_layout


def map_free(size: int, avoid: list[tuple[int, int]], prot: int, flags: int) -> int:
    """mmap `size` bytes (MAP_FIXED_NOREPLACE, flags | prot) at the highest address free
    both in this process and in `avoid` (the task's restored layout), free_gap(); its
    address. When the kernel finds the range taken (something was mapped since the
    layout was read), the layout is read again and the range chosen again, once."""
    import errno
    from criu_py.native import lib
    global _known_layout
    for fresh in (False, True):
        if fresh:
            _known_layout = None
        addr = free_gap(size, known_layout() + avoid)
        r = lib.criu_py_restore_syscall(9, addr, size, prot, flags | MAP_FIXED_NOREPLACE, -1, 0)
        if r == addr:
            _known_layout.append((addr, addr + size))
            return addr
        if r != -errno.EEXIST or fresh:
            raise OSError(-r if r < 0 else errno.EEXIST,
                          f"cannot map {size:#x} bytes at {addr:#x}: "
                          f"{os.strerror(-r) if r < 0 else 'mapped elsewhere'}")
    raise AssertionError("unreachable")


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


def _zeroed(ffi, addr: int, ctype: str):
    p = ffi.cast(ctype + " *", addr)
    ffi.memmove(p, bytes(ffi.sizeof(ctype)), ffi.sizeof(ctype))
    return p


def _fill_creds(c, creds: PieCreds | None, w: "_Writer") -> None:
    if creds is None:
        c.set = 0
        return
    c.set = 1
    c.uid, c.euid, c.suid, c.fsuid = creds.uids
    c.gid, c.egid, c.sgid, c.fsgid = creds.gids
    for name in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb"):
        words = getattr(creds, name)
        arr = getattr(c, name)
        arr[0], arr[1] = words[0], words[1]
    c.secbits, c.no_new_privs, c.cap_last_cap = creds.secbits, creds.no_new_privs, creds.cap_last_cap
    c.nr_groups = len(creds.groups)
    c.groups = w.put(struct.pack(f"<{len(creds.groups)}I", *creds.groups) or bytes(4), 4)


def prepare(plan: PiePlan, base: int, size: int) -> tuple[int, int, int]:
    """Fill the (already mapped) region at `base`; return (entry, args, stack_top)."""
    from criu_py.native import ffi, lib
    start, stop = lib.criu_py_pie_blob_start(), lib.criu_py_pie_blob_end()
    blob_len = stop - start
    ffi.memmove(ffi.cast("char *", base), ffi.cast("char *", start), blob_len)
    entry = base + (lib.criu_py_pie_entry() - start)
    nthreads = len(plan.threads) + (1 if plan.vfork is not None else 0)
    stacks_size = STACK_SIZE + THREAD_STACK_SIZE * max(0, nthreads - 1)
    w = _Writer(ffi, base + page_up(blob_len), base + size - stacks_size)
    # the leader's stack at the top, then one per other thread (and the vfork child)
    tops = [(base + size - 64) & ~15] + [base + size - STACK_SIZE - THREAD_STACK_SIZE * i
                                          for i in range(nthreads - 1)]
    args = _fill_args(ffi, w, plan, base, size, tops[:len(plan.threads)])
    if plan.vfork is not None:
        a = ffi.cast("struct pie_args *", args)
        a.vfork_args = _fill_args(ffi, w, plan.vfork, base, size, tops[len(plan.threads):])
    return entry, args, tops[0]


FILL_SPLIT_MIN = 64 << 20      # bytes of pages from which a second thread fills half


def fill_parts(page_sources) -> int:
    """How many threads of the restorer fill the pages: two on a machine with more than
    one CPU when there is much to copy (faulting fresh memory in and copying into it is
    CPU-bound: ~1.6x on 1 GiB here), else one."""
    total = sum(n for _, iovs in page_sources for base, n in iovs if base)
    return 2 if total >= FILL_SPLIT_MIN and (os.cpu_count() or 1) > 1 else 1


def _fill_args(ffi, w: "_Writer", plan: PiePlan, base: int, size: int, tops: list) -> int:
    """One struct pie_args (and what it points to) for `plan`; its address."""
    from criu_py.native import lib
    nthreads = len(plan.threads)
    args_addr = w.alloc(ffi.sizeof("struct pie_args"), 64)
    a = _zeroed(ffi, args_addr, "struct pie_args")

    a.keep_start = base
    a.keep_end = base + size
    a.premap_start, a.premap_end = plan.premap
    a.task_size = TASK_SIZE
    a.tgid = plan.tgid

    vma_sz = ffi.sizeof("struct pie_vma")
    vmas_addr = w.alloc(max(1, len(plan.vmas)) * vma_sz, 16)
    for i, v in enumerate(plan.vmas):
        p = ffi.cast("struct pie_vma *", vmas_addr + i * vma_sz)
        p.start, p.end, p.pgoff, p.madv, p.src = v.start, v.end, v.pgoff, v.madv, v.src
        p.prot, p.flags, p.fd, p.kind = v.prot, v.flags, v.fd, v.kind
        p.map_prot = v.prot if v.map_prot is None else v.map_prot
        p.pad = 0
    a.vmas, a.nr_vmas = vmas_addr, len(plan.vmas)

    srcs = b""
    for fd, iovs in plan.page_sources:
        iov_bytes = b"".join(struct.pack("<QQ", b or 0, n) for b, n in iovs)
        addr = w.put(iov_bytes or bytes(16), 16)
        srcs += struct.pack("<iiQQQ", fd, 0, 0, addr, len(iovs))
    a.page_srcs = w.put(srcs or bytes(32), 16)
    a.nr_page_srcs = len(plan.page_sources)
    a.fill_parts = fill_parts(plan.page_sources)
    a.status_fd = plan.status_fd
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

    if plan.mm_map is not None:
        mm = dict(plan.mm_map)
        auxv = mm.pop("auxv", [])
        for k, v in mm.items():
            setattr(a.mm_map, k, v)
        a.mm_map.auxv = w.put(struct.pack(f"<{len(auxv)}Q", *auxv) or bytes(8), 8)
        a.mm_map.auxv_size = 8 * len(auxv)
        a.mm_map.exe_fd = plan.exe_fd & 0xFFFFFFFF
        a.has_mm_map = 1
    a.dumpable = plan.dumpable

    fds = [fd for fd in plan.close_fds if fd != plan.status_fd]
    a.close_fds = w.put(struct.pack(f"<{len(fds)}i", *fds) or bytes(4), 4)
    a.nr_close_fds = len(fds)
    a.signals = w.put(b"".join(plan.signals) or bytes(8), 8)
    a.nr_signals = len(plan.signals)

    th_sz = ffi.sizeof("struct pie_thread")
    threads_addr = w.alloc(max(1, nthreads) * th_sz, 64)
    for i, pt in enumerate(plan.threads):
        t = _zeroed(ffi, threads_addr + i * th_sz, "struct pie_thread")
        t.tid = pt.tid
        t.stack_top = tops[i]
        gp = pt.regs.gp
        t.fs_base, t.gs_base = gp.get("fs_base", 0), gp.get("gs_base", 0)
        t.clear_child_tid = pt.clear_child_tid
        if pt.rseq:
            t.rseq, t.rseq_len, t.rseq_sig = pt.rseq
        t.robust_list, t.robust_len = pt.robust_list
        t.sched_policy, t.sched_prio = pt.sched if pt.sched else (-1, 0)
        if pt.nice is not None:
            t.has_nice, t.sched_nice = 1, pt.nice
        comm = pt.comm[:15]
        for j, ch in enumerate(comm):
            t.comm[j] = bytes([ch])
        t.signals = w.put(b"".join(pt.signals) or bytes(8), 8)
        t.nr_signals = len(pt.signals)
        _fill_creds(t.creds, pt.creds, w)
        t.pdeath_sig = pt.pdeath_sig
        frame_len = _frame_len(pt.regs)
        if pt.frame_on_stack:
            # Built for its final place below the thread's red zone; the restorer copies
            # it there once the stack's contents are back.
            final = stack_frame_addr(gp["sp"], frame_len)
            frame = build_sigframe(final, pt.regs)
            t.sigframe_src, t.sigframe_len = w.put(frame, 64), len(frame)
            t.sigframe = final
        else:
            frame_addr = w.alloc(frame_len, 64)
            frame = build_sigframe(frame_addr, pt.regs)
            ffi.memmove(ffi.cast("char *", frame_addr), frame, len(frame))
            t.sigframe = frame_addr
    a.threads, a.nr_threads = threads_addr, nthreads
    a.thread_stack = THREAD_STACK_SIZE
    a.sync, a.sync_len = plan.sync
    a.stage_ready, a.stage_go = plan.stage_ready, plan.stage_go
    a.trap_before_sigreturn = 1 if plan.trap_before_sigreturn else 0

    moves = b"".join(struct.pack("<iiii", src, dst, int(cloexec), 0)
                     for src, dst, cloexec in plan.fd_moves)
    a.fd_moves, a.nr_fd_moves = w.put(moves or bytes(16), 8), len(plan.fd_moves)
    rl = b"".join(struct.pack("<QQ", cur, mx) for cur, mx in plan.rlimits)
    a.rlimits, a.nr_rlimits = w.put(rl or bytes(16), 8), len(plan.rlimits)
    if plan.itimers is not None:
        a.itimers = w.put(b"".join(struct.pack("<qqqq", *t) for t in plan.itimers), 8)
        a.has_itimers = 1
        a.arm_itimers = int(plan.arm_itimers)
    timers = b"".join(struct.pack("<iiiiiiQqqqq", tid, clk, sig, how, thr, 0, sival, *times)
                      for tid, clk, sig, how, thr, sival, times in plan.posix_timers)
    a.posix_timers, a.nr_posix_timers = w.put(timers or bytes(8), 8), len(plan.posix_timers)
    tfds = b"".join(struct.pack("<iiiiQqqqq", fd, flags, clk, 0, ticks, *times)
                    for fd, flags, clk, ticks, times in plan.timerfds)
    a.timerfds, a.nr_timerfds = w.put(tfds or bytes(8), 8), len(plan.timerfds)
    locks = b"".join(struct.pack("<iiqq", *lk) for lk in plan.locks)
    a.locks, a.nr_locks = w.put(locks or bytes(8), 8), len(plan.locks)
    a.cwd_fd, a.root_fd, a.umask = plan.cwd_fd, plan.root_fd, plan.umask
    a.clone_flags = plan.clone_flags
    a.setsid, a.pgid, a.personality = int(plan.setsid), plan.pgid, plan.personality
    a.dot[0] = b"."
    a.uffd = plan.uffd
    lazy = b"".join(struct.pack("<QQ", s, e - s) for s, e in plan.lazy)
    a.lazy, a.nr_lazy = w.put(lazy or bytes(16), 8), len(plan.lazy)
    return args_addr


def stack_frame_addr(sp: int, frame_len: int) -> int:
    """Where the kernel would put a signal frame: below the 128-byte red zone, aligned."""
    return (sp - 128 - frame_len) & ~63


def frame_bytes(regs: TaskRegisters) -> int:
    return _frame_len(regs)


def frame_bytes_here() -> int:
    """The size of every sigframe this process builds (its xsave part is always this
    process's signal-frame size, whatever the dump held)."""
    from criu_py.restore.sigframe import local_xstate
    return frame_layout(local_xstate()[1] + 4)[0]


# The C types the tasks name while they build their restorer region (and fork, and ask
# for xsave features): cffi parses a type given as a string, and lays a struct out, the
# first time it meets it in a process and keeps it in the ffi object. Met first in each
# forked task, that cost every task ~0.3 ms and ~30 copy-on-write faults (~0.1 ms for
# struct pie_args alone); warm_types() meets them once in the restore command.
TASK_CTYPES = ("struct pie_args", "struct pie_vma", "struct pie_thread", "struct pie_sigaction",
               "struct pie_args *", "struct pie_vma *", "struct pie_thread *", "char *",
               "uintptr_t", "int32_t *", "uint64_t *", "char[16]")


def warm_types() -> None:
    from criu_py.native import ffi
    for name in TASK_CTYPES:
        ffi.typeof(name)
        if name.startswith("struct") and not name.endswith("*"):
            ffi.sizeof(name)            # lays the struct out (and the ones it holds)


def enter(entry: int, args: int, stack_top: int):
    """Jump into the restorer. Never returns: the interpreter is gone after this."""
    from criu_py.native import lib
    lib.criu_py_enter_restorer(entry, args, stack_top)
    raise AssertionError("the restorer returned")
