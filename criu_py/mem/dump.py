# The dump half of memory: /proc/PID/smaps -> vma_entry list (mm-PID.img), and the
# pages that hold data -> pagemap-PID.img + pages-N.img. Which pages: PAGEMAP_SCAN asks
# the kernel for present or swapped pages that are not the shared zero page and, in
# private file mappings, not page-cache pages (i.e. written, copy-on-write anonymous
# pages); without PAGEMAP_SCAN (< 6.7) the pagemap entries are read and filtered here.
# Contents are copied with process_vm_readv in 1 MiB chunks (reading and writing
# overlapped for large dumps; /proc/PID/mem for PROT_NONE areas). Shared anonymous and
# memfd mappings are dumped by their own module (mem.shmem).
import os
import time

from criu_py import mem as M
from criu_py.errors import DumpError, Unsupported, check_errno, from_oserror
from criu_py.log import log
from criu_py.proc import Record, Vma

# PAGEMAP_SCAN categories (linux/fs.h, 6.7+).
PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN, PAGE_IS_FILE = 1 << 0, 1 << 1, 1 << 2
PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_PFNZERO = 1 << 3, 1 << 4, 1 << 5

COPY_CHUNK = 1 << 20
SCAN_VEC_LEN = 4096

_SPECIAL = {"[vdso]": M.VMA_AREA_VDSO, "[vvar]": M.VMA_AREA_VVAR,
            "[vvar_vclock]": M.VMA_AREA_VVAR}
_MADV_BY_VMFLAG = {"dc": M.MADV_DONTFORK, "mg": M.MADV_MERGEABLE, "hg": M.MADV_HUGEPAGE,
                   "nh": M.MADV_NOHUGEPAGE, "dd": M.MADV_DONTDUMP, "wf": M.MADV_WIPEONFORK,
                   "sr": M.MADV_SEQUENTIAL, "rr": M.MADV_RANDOM}


class VmaPlan(Record):
    """One VMA as it will be written (entry: a vma_pb2.vma_entry), whether its anonymous
    pages go to pagemap-PID/pages-1, and the key of its shared object (shared anon, memfd)."""
    _fields = ("vma", "entry", "dump_private_pages", "shmem_key")
    dump_private_pages = False
    shmem_key = None


class PageStats(Record):
    """Counters for stats-dump."""
    _fields = ("pages_scanned", "pages_written", "pages_parent", "memdump_us", "memwrite_us",
               "pending", "copied")
    pages_scanned = pages_written = pages_parent = memdump_us = memwrite_us = 0
    pending = None          # deferred writing of the images (dump_private_pages(defer=True))
    copied = None           # ... and waiting for the copy into memory, before the task runs


def vma_prot(v: Vma) -> int:
    return ((M.PROT_READ if v.perms[0] == "r" else 0) | (M.PROT_WRITE if v.perms[1] == "w" else 0)
            | (M.PROT_EXEC if v.perms[2] == "x" else 0))


def _vma_flags_and_madv(v: Vma) -> tuple[int, int]:
    flags = 0
    if "gd" in v.vm_flags:
        flags |= M.MAP_GROWSDOWN
    if "lo" in v.vm_flags:
        flags |= M.MAP_LOCKED
    if "nr" in v.vm_flags:
        flags |= M.MAP_NORESERVE
    madv = 0
    for mnemonic, advice in _MADV_BY_VMFLAG.items():
        if mnemonic in v.vm_flags:
            madv |= 1 << advice
    return flags, madv


def is_shared_anon(v: Vma) -> bool:
    return v.path.startswith("/dev/zero") and v.shared


def is_memfd(v: Vma) -> bool:
    return v.path.startswith("/memfd:")


def plan_vmas(pid: int, vmas: list[Vma], ctx) -> list[VmaPlan]:
    """vma_entry for every VMA, refusing what cannot be dumped (before any image is written).
    ctx provides file_id_for_mapping(vma) and shmem_id_for(vma) for file-backed VMAs."""
    from criu_py.images.pb import vma_pb2
    plans = []
    for v in vmas:
        e = vma_pb2.vma_entry()
        e.start, e.end, e.pgoff, e.shmid, e.fd = v.start, v.end, 0, 0, -1
        e.prot = vma_prot(v)
        extra_flags, madv = _vma_flags_and_madv(v)
        if madv:
            e.madv = madv
        plan = VmaPlan(v, e)
        if v.path == "[vsyscall]":
            e.status = M.VMA_AREA_VSYSCALL | M.VMA_ANON_PRIVATE
            e.flags = M.MAP_PRIVATE | M.MAP_ANONYMOUS
        elif v.path in _SPECIAL:
            last = plans[-1].entry if plans else None
            if v.path == "[vvar_vclock]" and last is not None and \
                    last.status & M.VMA_AREA_VVAR and last.end == v.start:
                # one vvar area, as upstream writes it: its restorer takes a second one
                # for another kernel's vdso layout, maps the live vdso elsewhere and
                # leaves a patched copy of the dumped one at the old address
                last.end = v.end
                continue
            e.status = M.VMA_AREA_REGULAR | M.VMA_ANON_PRIVATE | _SPECIAL[v.path]
            e.flags = M.MAP_PRIVATE | M.MAP_ANONYMOUS
            # The vdso's pages are written too (never vvar's): upstream's restorer reads
            # the dumped vdso's ELF header to match it with the live one.
            plan.dump_private_pages = v.path == "[vdso]"
        elif v.path.startswith("[") or (v.inode == 0 and not v.path.startswith("/")):
            # [heap], [stack], [anon:...] and plain anonymous memory
            if v.shared:
                raise Unsupported(f"pid {pid}: shared anonymous mapping {v.start:#x}-{v.end:#x} "
                                  f"without a shmem inode is not supported")
            if v.path.startswith("[") and v.path not in ("[heap]", "[stack]") \
                    and not v.path.startswith("[anon:"):
                raise Unsupported(f"pid {pid}: special mapping {v.path} at {v.start:#x} "
                                  f"is not supported")
            e.status = M.VMA_AREA_REGULAR | M.VMA_ANON_PRIVATE
            if v.path == "[heap]":
                e.status |= M.VMA_AREA_HEAP
            kind = M.MAP_DROPPABLE if "dp" in v.vm_flags else M.MAP_PRIVATE
            e.flags = kind | M.MAP_ANONYMOUS | extra_flags
            plan.dump_private_pages = True
        elif is_shared_anon(v) or is_memfd(v):
            ctx.plan_shmem(plan)           # sets status, flags, shmid, pgoff; may refuse
        elif v.path.startswith("/SYSV"):
            ctx.plan_sysv_shm(plan)        # sets status, flags, shmid; may refuse
        else:
            e.pgoff = v.offset
            e.shmid = ctx.file_id_for_mapping(v)
            if v.shared:
                e.status = M.VMA_AREA_REGULAR | M.VMA_FILE_SHARED
                e.flags = M.MAP_SHARED | extra_flags
                e.fdflags = os.O_RDWR if e.prot & M.PROT_WRITE else os.O_RDONLY
            else:
                e.status = M.VMA_AREA_REGULAR | M.VMA_FILE_PRIVATE
                e.flags = M.MAP_PRIVATE | extra_flags
                e.fdflags = os.O_RDONLY
                plan.dump_private_pages = True
        plans.append(plan)
    return plans


def scan_pages(pagemap_fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Ranges of [start, end) whose pages hold private data: present or swapped, not the
    zero page, not page cache. One PAGEMAP_SCAN ioctl per SCAN_VEC_LEN regions."""
    from criu_py.native import ffi, lib
    # the region vector (~100 KiB, zeroed when made) is made once and reused: a dump
    # scans every VMA of every process
    vec, walk_end = _SCAN_BUFFERS.pop() if _SCAN_BUFFERS else (
        ffi.new("struct cp_page_region[]", SCAN_VEC_LEN), ffi.new("uint64_t *"))
    out = []
    addr = start
    not_wanted = PAGE_IS_FILE | PAGE_IS_PFNZERO
    try:
        while addr < end:
            n = lib.cp_pagemap_scan(pagemap_fd, addr, end, vec, SCAN_VEC_LEN,
                                    not_wanted, not_wanted, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, 0,
                                    walk_end)
            check_errno(n, "PAGEMAP_SCAN")
            for i in range(n):
                r = vec[i]
                if out and out[-1][1] == r.start:
                    out[-1] = (out[-1][0], r.end)
                else:
                    out.append((r.start, r.end))
            if walk_end[0] <= addr:
                raise DumpError(f"PAGEMAP_SCAN made no progress at {addr:#x}")
            addr = walk_end[0]
    finally:
        _SCAN_BUFFERS.append((vec, walk_end))
    return out


_SCAN_BUFFERS = []          # (region vector, walk end) free for the next scan_pages()


def lazy_allowed(plan: VmaPlan) -> bool:
    """Upstream's rule for PE_LAZY: private anonymous memory that is not locked (vdso,
    vvar and vsyscall never get here)."""
    e = plan.entry
    return bool(e.status & M.VMA_ANON_PRIVATE) and not e.flags & M.MAP_LOCKED and \
        not e.status & (M.VMA_AREA_VDSO | M.VMA_AREA_VVAR | M.VMA_AREA_VSYSCALL)


PM_PRESENT, PM_SWAPPED, PM_FILE = 1 << 63, 1 << 62, 1 << 61
PM_PFN_MASK = (1 << 55) - 1
PAGEMAP_READ_PAGES = 1 << 16


def scan_pages_by_pagemap(pagemap_fd: int, start: int, end: int, zero_pfn: int = 0) -> list:
    """The same ranges as scan_pages, for kernels without PAGEMAP_SCAN (< 6.7): the
    pagemap entries read and filtered here (present or swapped, not file/shared, not the
    zero page). About 100 ns per page, so only a fallback."""
    from array import array
    out = []
    page = start // M.PAGE_SIZE
    last = end // M.PAGE_SIZE
    while page < last:
        n = min(PAGEMAP_READ_PAGES, last - page)
        entries = array("Q", os.pread(pagemap_fd, n * 8, page * 8))
        for i, pme in enumerate(entries):
            if not pme & (PM_PRESENT | PM_SWAPPED) or pme & PM_FILE:
                continue
            if zero_pfn and pme & PM_PRESENT and pme & PM_PFN_MASK == zero_pfn:
                continue
            addr = (page + i) * M.PAGE_SIZE
            if out and out[-1][1] == addr:
                out[-1] = (out[-1][0], addr + M.PAGE_SIZE)
            else:
                out.append((addr, addr + M.PAGE_SIZE))
        page += len(entries)
        if not entries:
            break
    return out


class PagePlan:
    """The pages of one process, decided while it is frozen: per VMA with pages, its
    VmaPlan and (start, end, in_parent) triples in address order, kept as a flat C array
    (in_parent 1: the page lives in the parent images, incremental dumps). Nothing here
    makes per-range Python objects until they are asked for (after the freeze).
    The third word of a triple: 0 data, 1 in the parent images (PE_PARENT), 2 kept in
    the source for lazy migration (dump --lazy-pages: PE_LAZY, no data written)."""

    def __init__(self):
        self.chunks = []            # (VmaPlan, uint64_t[] triples, count)
        self.scanned = 0            # pages of the VMAs looked at
        self.scan_us = 0
        self._flat = None

    def add(self, plan, triples, n: int) -> None:
        if n:
            self.chunks.append((plan, triples, n))
            self._flat = None

    def add_list(self, plan, found: list) -> None:
        """found: [(start, end, in_parent)]."""
        from criu_py.native import ffi
        if found:
            self.add(plan, ffi.new("uint64_t[]", [x for s, e, p in found for x in (s, e, int(p))]),
                     len(found))

    def bytes(self, in_parent: bool = False) -> int:
        from criu_py.native import lib
        return sum(lib.cp_triples_bytes(t, n, int(in_parent)) for _, t, n in self.chunks)

    def flat(self) -> list:
        """[(start, end, in_parent, VmaPlan)] in address order."""
        from criu_py.native import ffi
        if self._flat is None:
            out = []
            for plan, t, n in self.chunks:
                v = ffi.unpack(t, 3 * n)
                out += [(v[i], v[i + 1], v[i + 2], plan) for i in range(0, 3 * n, 3)]
            self._flat = out
        return self._flat

    @property
    def ranges(self) -> list:
        return [(s, e) for s, e, _, _ in self.flat()]

    @property
    def in_parent(self) -> list:
        return [p == IN_PARENT for _, _, p, _ in self.flat()]

    @property
    def owners(self) -> list:
        return [plan for _, _, _, plan in self.flat()]

    def data_ranges(self) -> list:
        return [(s, e) for s, e, p, _ in self.flat() if not p]

    def keep_lazy(self, stacks=()) -> list:
        """dump --lazy-pages: the data pages of lazy-eligible VMAs (lazy/ranges.py's
        rule, the one `restore --lazy-pages` applies; `stacks`: the threads' stack
        pointers) stay out of the images (marked KEPT_LAZY); returns their ranges."""
        from criu_py.lazy.ranges import vma_can_be_lazy
        kept = []
        for plan, t, n in self.chunks:
            v = plan.entry
            if not vma_can_be_lazy(v) or any(v.start <= sp < v.end for sp in stacks):
                continue
            for i in range(n):
                if t[3 * i + 2] == 0:
                    t[3 * i + 2] = KEPT_LAZY
                    kept.append((t[3 * i], t[3 * i + 1]))
        self._flat = None
        return kept


IN_PARENT, KEPT_LAZY = 1, 2


def private_page_ranges(pid: int, plans: list[VmaPlan], scan=None, vma_scan=None) -> PagePlan:
    """The pages to dump, per VMA in address order. scan(fd, start, end) finds the
    ranges of one VMA (default: scan_pages, i.e. PAGEMAP_SCAN); vma_scan(fd, plan), when
    given, may answer for a VMA instead with (uint64_t[] triples, count) (memory
    tracking: pages unchanged since the parent images are in_parent), or None to leave
    it to scan."""
    scan = scan or scan_pages
    t0 = time.monotonic()
    path = f"/proc/{pid}/pagemap"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, f"opening {path}", pid) from None
    out = PagePlan()
    try:
        for p in plans:
            if not p.dump_private_pages:
                continue
            out.scanned += (p.vma.end - p.vma.start) // M.PAGE_SIZE
            if p.entry.status & M.VMA_AREA_VDSO:
                # kernel pages: no scan sees them
                out.add_list(p, [(p.vma.start, p.vma.end, False)])
                continue
            found = vma_scan(fd, p) if vma_scan is not None else None
            if found is None:
                found = [(s, e, False) for s, e in scan(fd, p.vma.start, p.vma.end)]
            if isinstance(found, list):
                out.add_list(p, found)
            else:
                out.add(p, *found)
    finally:
        os.close(fd)
    out.scan_us = int((time.monotonic() - t0) * 1e6)
    return out


def pagemap_entries(ranges: list, pages_id: int, flags) -> list:
    """pagemap_head + one pagemap_entry per range; flags: one value for all, or a list."""
    from criu_py.images import set_pagemap_nr_pages
    from criu_py.images.pb import pagemap_pb2
    head = pagemap_pb2.pagemap_head()
    head.pages_id = pages_id
    out = [head]
    per_range = flags if isinstance(flags, list) else [flags] * len(ranges)
    for (start, end), f in zip(ranges, per_range):
        pe = pagemap_pb2.pagemap_entry()
        pe.vaddr = start
        set_pagemap_nr_pages(pe, (end - start) // M.PAGE_SIZE)
        pe.flags = f
        out.append(pe)
    return out


def copy_pages(pid: int, ranges: list, out_fd: int, unreadable: list = ()) -> int:
    """Write the bytes of `ranges` of pid's memory to out_fd, in order. Ranges inside
    VMAs the task cannot read (PROT_NONE, listed in `unreadable` as (start, end)) go
    through /proc/PID/mem, which may read them; the rest through process_vm_readv."""
    from criu_py.native import ffi, lib
    buf = ffi.new("char[]", COPY_CHUNK)
    total = 0
    batch = []

    def flush():
        nonlocal total
        if not batch:
            return
        arr = ffi.new("uint64_t[]", [x for r in batch for x in r])
        n = lib.cp_vm_copy_ranges(pid, out_fd, arr, len(batch), buf, COPY_CHUNK)
        check_errno(n, "copying memory with process_vm_readv", pid)
        total += n
        batch.clear()

    mem_fd = -1
    try:
        for start, end in ranges:
            if any(s <= start < e for s, e in unreadable):
                flush()
                if mem_fd < 0:
                    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
                addr = start
                while addr < end:
                    chunk = os.pread(mem_fd, min(COPY_CHUNK, end - addr), addr)
                    if not chunk:
                        raise DumpError(f"cannot read memory of pid {pid} at {addr:#x}")
                    os.write(out_fd, chunk)
                    addr += len(chunk)
                    total += len(chunk)
            else:
                batch.append((start, end))
        flush()
    finally:
        if mem_fd >= 0:
            os.close(mem_fd)
    return total


def copy_pages_overlapped(pid: int, ranges: list, out_fd: int, crcs=None) -> int:
    """Like copy_pages for readable memory, with reading and writing overlapped in C
    (cp_vm_copy_ranges2: process_vm_readv in this thread, write(2) in another, two 1 MiB
    buffers). With crcs (a uint32_t array, one per 4 KiB of output) the reading thread
    also computes the CRC of every block (images/integrity.py's digest, without reading
    the file back). Worth it for large dumps only."""
    from criu_py.native import ffi, lib
    bufs = ffi.new("char[]", 2 * COPY_CHUNK)
    arr = ffi.new("uint64_t[]", [x for r in ranges for x in r] or [0])
    n = lib.cp_vm_copy_ranges2(pid, out_fd, arr, len(ranges), bufs, COPY_CHUNK,
                               crcs if crcs is not None else ffi.NULL)
    return check_errno(n, "copying memory with process_vm_readv", pid)


OVERLAP_MIN_BYTES = 16 << 20


def page_scanner(kdat):
    """scan_pages where PAGEMAP_SCAN works (kerndat says so, or no kerndat given), else
    the pagemap reader with the zero page's PFN."""
    if kdat is None or getattr(kdat, "pagemap_scan", True):
        return scan_pages
    zero_pfn = getattr(kdat, "zero_pfn", 0)
    log.info("no PAGEMAP_SCAN: reading pagemap entries (zero pfn %#x)", zero_pfn)
    return lambda fd, start, end: scan_pages_by_pagemap(fd, start, end, zero_pfn)


def write_no_pages(images, pages_id: int, pid_for_name: int) -> None:
    """An empty pagemap (and pages file) for a process whose memory is dumped elsewhere."""
    from criu_py.images import PE_PRESENT
    os.close(images.open_raw(f"pages-{pages_id}.img", write=True))
    images.write_entries(f"pagemap-{pid_for_name}.img", pagemap_entries([], pages_id, PE_PRESENT))


# Up to this much page data is copied into memory while the tree is frozen and written
# to the images once it runs again (or is killed): an incremental dump's few changed
# pages cost the task only process_vm_readv's ~5 GB/s, not the disk's ~1.4 GB/s.
BUFFER_MAX = 64 << 20


MADV_POPULATE_WRITE = 23


class PageBuffer:
    """Memory for page data copied while the tree is frozen, mapped and faulted in
    before the freeze (faulting fresh memory runs at ~2 GB/s: on the frozen path it
    would cost more than the copy). Handed out in slices; closed after the writes."""

    def __init__(self, size: int):
        import mmap
        self.size = max(size, M.PAGE_SIZE)
        self.map = mmap.mmap(-1, self.size)
        try:
            self.map.madvise(MADV_POPULATE_WRITE)
        except OSError:
            pass
        self.used = 0

    def take(self, n: int):
        """(mmap, offset) of n free bytes, or None."""
        if self.used + n > self.size:
            return None
        off = self.used
        self.used += n
        return self.map, off

    def close(self) -> None:
        self.map.close()


class BufferedCopy:
    """The data pages of a PagePlan being read from the task into memory by a thread of
    ours (process_vm_readv releases the GIL) while the dump goes on with its other
    frozen work; join() before the task may run or die. (A second reader thread does not
    help: both wait on the task's page tables.) One reader thread takes the copies of
    every process in turn (_Reader): starting a thread per process costs more than a
    small process's copy."""

    def __init__(self, pid: int, pages: PagePlan, pool: PageBuffer | None = None):
        import mmap
        import threading
        self.pid = pid
        self.pages = pages
        self.total = total = pages.bytes()
        got = pool.take(total) if pool is not None else None
        if got is not None:
            self.buf, self.off, self.own = got[0], got[1], False
        else:
            self.buf, self.off, self.own = mmap.mmap(-1, max(total, M.PAGE_SIZE)), 0, True
        self.error = 0
        self.exc = None
        self.done = threading.Event()
        _READER.submit(self)

    def _read(self) -> None:
        from criu_py.native import ffi, lib
        cbuf = ffi.from_buffer(self.buf)
        try:
            at = self.off
            for _, t, n in self.pages.chunks:
                r = lib.cp_vm_read_triples(self.pid, cbuf + at, t, n)
                if r < 0:
                    self.error = r
                    return
                at += r
        finally:
            ffi.release(cbuf)

    def join(self):
        self.done.wait()
        if self.exc is not None:
            raise self.exc
        check_errno(self.error, "copying memory with process_vm_readv", self.pid)
        return self.buf, self.off, self.total, self.own


class _Reader:
    """The thread that runs queued BufferedCopy reads in order; it ends once none is
    left, and the next copy starts another."""

    def __init__(self):
        self.lock = None
        self.jobs = []
        self.thread = None

    def submit(self, job: BufferedCopy) -> None:
        import threading
        if self.lock is None:
            self.lock = threading.Lock()
        with self.lock:
            self.jobs.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="page-copy", daemon=True)
                self.thread.start()

    def _serve(self) -> None:
        while True:
            with self.lock:
                if not self.jobs:
                    self.thread = None
                    return
                job = self.jobs.pop(0)
            try:
                job._read()
            except BaseException as exc:       # noqa: BLE001 - raised again by join()
                job.exc = exc
            finally:
                job.done.set()


_READER = _Reader()


def pagemap_flags(pages: PagePlan) -> list:
    from criu_py.images import PE_LAZY, PE_PARENT, PE_PRESENT
    return [PE_PARENT if flag == IN_PARENT else PE_LAZY if flag == KEPT_LAZY else
            PE_PRESENT | PE_LAZY if lazy_allowed(p) else PE_PRESENT
            for _, _, flag, p in pages.flat()]


def send_private_pages(pid: int, plans: list[VmaPlan], sink, pages: PagePlan,
                       task=None) -> PageStats:
    """dump --page-server: pid's pagemap and data pages go to the page server (sink, a
    pageserver.client.Sink) instead of pagemap-PID.img and pages-ID.img; task: see
    Sink.process_pages."""
    from criu_py.pageserver.client import send_process_pages
    st = PageStats()
    t0 = time.monotonic()
    st.pages_scanned = pages.scanned
    unreadable = [(p.vma.start, p.vma.end) for p in plans
                  if p.dump_private_pages and not p.vma.prot_readable]
    written = send_process_pages(sink, pid, pid, pages, pagemap_flags(pages), unreadable,
                                 task)
    _finish_stats(st, pages, written, t0, t0, time.monotonic())
    log.info("pid %d: %d pages sent to the page server %s (%.1f ms)", pid, st.pages_written,
             sink.where, st.memwrite_us / 1e3)
    return st


def dump_private_pages(pid: int, plans: list[VmaPlan], images, pages_id: int,
                       pid_for_name: int, kdat=None, pages: PagePlan | None = None,
                       defer: bool = False, pool: PageBuffer | None = None) -> PageStats:
    """pagemap-PID.img and pages-ID.img for the private pages of `plans`: those of
    `pages` (planned before, e.g. while the task was frozen), else scanned now. Pages
    marked in_parent get PE_PARENT entries and no data. defer: when the data is small,
    only copy it into memory now; st.pending() writes both images later (once the tree
    runs again, or was killed)."""
    st = PageStats()
    t0 = time.monotonic()
    if pages is None:
        pages = private_page_ranges(pid, plans, page_scanner(kdat))
    st.pages_scanned = pages.scanned
    # PROT_NONE VMAs with pages to dump (guard areas hold none: they do not keep a big
    # dump off the overlapped copy, nor a small one off the buffered copy)
    unreadable = [(p.vma.start, p.vma.end) for p, t, n in pages.chunks
                  if p.dump_private_pages and not p.vma.prot_readable and _data_bytes(t, n)]
    nbytes = pages.bytes()
    t1 = time.monotonic()
    if defer and not unreadable and nbytes <= BUFFER_MAX:
        copy = BufferedCopy(pid, pages, pool)
        total = copy.total
        # The space both images need is taken now, while the task still runs (or is
        # frozen): a full disk must fail the dump before the task is killed, not after.
        pages_fd = images.open_raw(f"pages-{pages_id}.img", write=True)
        pagemap_name = f"pagemap-{pid_for_name}.img"
        pagemap_fd = images.open_raw(pagemap_name, write=True)
        try:
            if total:
                os.posix_fallocate(pages_fd, 0, total)
            os.posix_fallocate(pagemap_fd, 0, 64 + 32 * sum(n for _, _, n in pages.chunks))
        except OSError as exc:
            os.close(pages_fd)
            os.close(pagemap_fd)
            copy.join()
            from criu_py.errors import DumpError
            raise DumpError(f"no room for the images of pid {pid}: {exc.strerror}") from None

        def copied():
            nonlocal buf, off, own
            buf, off, _, own = copy.join()
            _finish_stats(st, pages, total, t0, t1, time.monotonic())
        buf = off = own = None

        def pending():
            from criu_py.images import encode_file
            try:
                view = memoryview(buf)[off:off + total]
                done = 0
                while done < total:
                    done += os.pwrite(pages_fd, view[done:], done)
                images.note_written(f"pages-{pages_id}.img", view)
                view.release()
                entries = pagemap_entries(pages.ranges, pages_id, pagemap_flags(pages))
                data = encode_file("pagemap", entries, pagemap_name)
                done = 0
                while done < len(data):
                    done += os.pwrite(pagemap_fd, data[done:], done)
                os.ftruncate(pagemap_fd, len(data))
                images.note_written(pagemap_name, data, entries)
            finally:
                os.close(pages_fd)
                os.close(pagemap_fd)
                if own:
                    buf.close()
            _log_pages(st, pid, pages)
        st.copied, st.pending = copied, pending
        return st
    data = pages.data_ranges()
    fd = images.open_raw(f"pages-{pages_id}.img", write=True)
    try:
        if nbytes >= OVERLAP_MIN_BYTES and not unreadable:
            from criu_py.native import ffi
            crcs = ffi.new("uint32_t[]", nbytes // M.PAGE_SIZE)
            written = copy_pages_overlapped(pid, data, fd, crcs=crcs)
            if written == nbytes and hasattr(images, "block_crcs"):
                images.block_crcs[f"pages-{pages_id}.img"] = (nbytes, crcs)
        else:
            written = copy_pages(pid, data, fd, unreadable)
    finally:
        os.close(fd)
    t2 = time.monotonic()
    images.write_entries(f"pagemap-{pid_for_name}.img",
                         pagemap_entries(pages.ranges, pages_id, pagemap_flags(pages)))
    _finish_stats(st, pages, written, t0, t1, t2)
    _log_pages(st, pid, pages)
    return st


def _data_bytes(triples, n: int) -> int:
    from criu_py.native import lib
    return lib.cp_triples_bytes(triples, n, 0)


def _finish_stats(st: PageStats, pages: PagePlan, written: int, t0, t1, t2) -> None:
    st.pages_written = written // M.PAGE_SIZE
    st.pages_parent = pages.bytes(in_parent=True) // M.PAGE_SIZE
    st.memdump_us = pages.scan_us + int((t1 - t0) * 1e6)
    st.memwrite_us = int((t2 - t1) * 1e6)


def _log_pages(st: PageStats, pid: int, pages: PagePlan) -> None:
    log.info("pid %d: %d of %d pages written, %d left in the parent images (scan %.1f ms, "
             "copy %.1f ms)", pid, st.pages_written, st.pages_scanned, st.pages_parent,
             st.memdump_us / 1e3, st.memwrite_us / 1e3)
