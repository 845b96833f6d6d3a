# The restore half of memory: mm-PID.img's VMAs -> what the PIE restorer maps (struct
# pie_vma), pagemap-PID.img -> the iovecs it preadv's pages-N.img into, and the vDSO
# check. All of it is computed and validated in the restore parent before any fork, so a
# bad image fails with one line and nothing created.
import os

from criu_py import mem as M
from criu_py.errors import ImageError, RestoreError
from criu_py.proc import Record

# mmap flags a VMA is re-created with. MAP_LOCKED is passed on to the restorer, which
# mlock()s the VMA once its pages are in instead of mapping it locked (and empty).
MAP_KEEP = M.MAP_TYPE | M.MAP_GROWSDOWN | M.MAP_NORESERVE | M.MAP_LOCKED

SPECIAL = M.VMA_AREA_VDSO | M.VMA_AREA_VVAR | M.VMA_AREA_VSYSCALL
TASK_SIZE = 0x7FFFFFFFF000


class MappedFile(Record):
    """A file some VMAs map; the child opens it (or makes the shared memory object
    `shmid`) and parks the fd for the restorer."""
    _fields = ("file_id", "path", "flags", "fd", "shmid")

    def __init__(self, file_id: int, path: str | None, flags: int, fd: int = -1,
                 shmid: int | None = None):
        self.file_id = file_id
        self.path = path
        self.flags = flags
        self.fd = fd
        self.shmid = shmid


class PageSource(Record):
    """One pages file the restore reads from: the dump's own, or one of its parents'
    (incremental dumps, mem/chain.py). iovs: (address, length) in file order, address
    None for bytes to skip."""
    _fields = ("images", "name", "iovs", "fd")

    def __init__(self, images, name: str, iovs: list | None = None, fd: int = -1):
        self.images = images            # criu_py.images.ImageDir
        self.name = name                # pages-N.img
        self.iovs = [] if iovs is None else iovs
        self.fd = fd                    # opened (and parked) by the task that reads it


class MemoryPlan(Record):
    _fields = ("vmas", "files", "sources", "pages_bytes", "vdso_vvar", "special", "shared",
               "memfd_inodes", "lazy", "lazy_pages", "lazy_mode")

    def __init__(self, vmas: list, files: dict | None = None, sources: list | None = None,
                 pages_bytes: int = 0, vdso_vvar: int = 0, special: list | None = None,
                 shared: dict | None = None, memfd_inodes: dict | None = None,
                 lazy: list | None = None, lazy_pages: int = 0, lazy_mode: bool = False):
        self.vmas = vmas                # vma_entry of VMAs the restorer maps (no vdso/vvar/vsyscall)
        self.files = {} if files is None else files         # (file_id, open flags) -> MappedFile
        self.sources = [] if sources is None else sources   # PageSource: the dump's own pages file
                                                            # first, then parents' (chains)
        self.pages_bytes = pages_bytes  # bytes of the dump's own pages file
        self.vdso_vvar = vdso_vvar      # dumped start of the vvar area (ARCH_MAP_VDSO_64 address)
        self.special = [] if special is None else special   # (start, end) of dumped vdso/vvar VMAs
        self.shared = {} if shared is None else shared      # shmid -> shmem_restore.SharedObject
        self.memfd_inodes = {} if memfd_inodes is None else memfd_inodes
        # restore --lazy-pages: the (start, end) ranges the restorer registers with the task's
        # userfaultfd (empty: nothing for the lazy-pages daemon) and how many of their pages
        # the daemon brings (criu_py/lazy/)
        self.lazy = [] if lazy is None else lazy
        self.lazy_pages = lazy_pages
        self.lazy_mode = lazy_mode

    @property
    def pages_name(self) -> str:
        return self.sources[0].name

    @property
    def iovs(self) -> list:
        """The runs of the dump's own pages file (its parents' are in sources[1:])."""
        return self.sources[0].iovs

    def filled(self):
        """(address, length) of every run of pages the restore writes, from any source."""
        for src in self.sources:
            for addr, n in src.iovs:
                if addr is not None:
                    yield addr, n


def _vma_key(v) -> tuple:
    """(kind, object id, open flags) of a VMA's file. A private mapping never writes its
    file: opened read-only whatever the image says. A shared one is opened for writing
    only when the dump recorded its file open that way (fdflags; images without it get
    upstream's guess from the protection), see _check_file_vma."""
    if v.status & M.VMA_ANON_SHARED:
        return ("anon", v.shmid, os.O_RDWR)
    flags = os.O_RDONLY
    if v.status & M.VMA_FILE_SHARED:
        if v.HasField("fdflags"):
            writable = v.fdflags & os.O_ACCMODE == os.O_RDWR
        else:
            writable = bool(v.prot & M.PROT_WRITE)
        flags = os.O_RDWR if writable else os.O_RDONLY
    return ("file", v.shmid, flags)


def _check_file_vma(v, key: tuple, fe, checks, pid: int, what: str) -> None:
    """A file mapped shared and writable must have been open for writing at dump, by
    every record the images have of it: a damaged flag never makes the restore write
    pages into (or open for writing) a file the task only read."""
    if not v.status & M.VMA_FILE_SHARED:
        return
    if v.prot & M.PROT_WRITE and key[2] != os.O_RDWR:
        raise ImageError(f"mm-{pid}.img: {what} maps {fe.reg.name} shared and writable, "
                         f"but the dump had it open read-only")
    if key[2] == os.O_RDWR and checks is not None and checks.idents \
            and not checks.opened_for_writing(fe):
        raise ImageError(f"mm-{pid}.img: {what} maps {fe.reg.name} for writing, but "
                         f"files.img has it open read-only")


def plan_memory(images, pid: int, mm, files: dict, shared: dict, memfd_inodes: dict,
                checks=None, chain: list | None = None, lazy_stacks=None) -> MemoryPlan:
    """Check mm's VMAs and pagemap against each other and the pages file size. Shared
    memory objects are registered in `shared` (shmid -> object), one for the whole tree.
    checks: the tree's files.identity.FileChecks; chain: [images, parent, ...]
    (mem.chain.open_chain) for incremental dumps; lazy_stacks: restore --lazy-pages,
    the addresses that mark stacks (lazy.ranges.stack_addrs_of)."""
    from criu_py.mem import shmem_restore
    plan = MemoryPlan(vmas=[], shared=shared, memfd_inodes=memfd_inodes)
    prev_end = 0
    for v in sorted(mm.vmas, key=lambda v: v.start):
        if v.status & M.VMA_AREA_VSYSCALL:
            continue
        if v.start >= v.end or v.start % M.PAGE_SIZE or v.end % M.PAGE_SIZE or v.end > TASK_SIZE:
            raise ImageError(f"mm-{pid}.img: bad VMA {v.start:#x}-{v.end:#x}")
        if v.start < prev_end:
            raise ImageError(f"mm-{pid}.img: VMA {v.start:#x}-{v.end:#x} overlaps the previous one")
        prev_end = v.end
        if v.status & (M.VMA_AREA_VDSO | M.VMA_AREA_VVAR):
            plan.special.append((v.start, v.end))
            continue
        if v.status & M.VMA_AREA_SYSVIPC:
            plan.vmas.append(v)             # the restorer attaches segment v.shmid
            continue
        if v.status & (M.VMA_AREA_SOCKET | M.VMA_AREA_AIORING):
            raise ImageError(f"mm-{pid}.img: VMA {v.start:#x}-{v.end:#x} has status "
                             f"{v.status:#x}, which this restore does not support")
        key = _vma_key(v)
        what = f"VMA {v.start:#x}"
        if v.status & M.VMA_ANON_SHARED:
            obj = shmem_restore.object_for_anon(plan.shared, images, v.shmid,
                                                v.pgoff + v.end - v.start)
            plan.files.setdefault(key, MappedFile(v.shmid, None, key[2], shmid=obj.shmid))
        elif v.status & (M.VMA_FILE_PRIVATE | M.VMA_FILE_SHARED):
            fe = files.get(v.shmid)
            if fe is None or not (fe.HasField("reg") or fe.HasField("memfd")):
                raise ImageError(f"mm-{pid}.img: {what} maps file id {v.shmid}, "
                                 f"which files.img does not have")
            if fe.HasField("memfd"):
                obj = shmem_restore.object_for_memfd(plan.shared, images, plan.memfd_inodes, fe, what)
                plan.files.setdefault(key, MappedFile(v.shmid, None, key[2], shmid=obj.shmid))
            else:
                from criu_py.images import get_str
                _check_file_vma(v, key, fe, checks, pid, what)
                plan.files.setdefault(key, MappedFile(v.shmid, get_str(fe.reg.name), key[2]))
        plan.vmas.append(v)
    if plan.special:
        plan.vdso_vvar = min(s for s, _ in plan.special)
    if lazy_stacks is not None:
        from criu_py.lazy.ranges import lazy_ranges
        plan.lazy = lazy_ranges(mm.vmas, lazy_stacks)
        plan.lazy_mode = True
    plan_pages(images, pid, plan, chain or [images])
    return plan


def plan_pages(images, pid: int, plan: MemoryPlan, chain: list | None = None) -> None:
    """The runs of pages-N.img in file order: (address, length) of each run, address
    None for bytes read only to be dropped (upstream's dumped vdso pages); and for pages
    marked PE_PARENT, the runs of the parents' pages files that hold them."""
    from criu_py.images import PE_LAZY, PE_PARENT, PE_PRESENT
    from criu_py.mem.chain import Chain
    name = f"pagemap-{pid}.img"
    entries = images.read_entries(name)
    if not entries:
        raise ImageError(f"{name}: no pagemap head")
    own = PageSource(images, f"pages-{entries[0].pages_id}.img")
    plan.sources = [own]
    spans = []          # contiguous runs of private VMAs (upstream's entries may span two);
    for v in plan.vmas:  # pages of shared ones live in their object, never in pages-N.img
        if v.status & (M.VMA_FILE_SHARED | M.VMA_ANON_SHARED):
            continue
        if spans and spans[-1][1] == v.start:
            spans[-1] = (spans[-1][0], v.end)
        else:
            spans.append((v.start, v.end))
    iovs = []
    total = 0
    in_parent = []      # (start, end) of PE_PARENT entries
    for pe, start, end, flags, lazy in _entries(name, entries[1:], plan.lazy):
        if lazy:
            # the lazy-pages daemon brings these (from here, the parents or the source)
            if flags & (PE_PRESENT | PE_LAZY | PE_PARENT):
                plan.lazy_pages += (end - start) // M.PAGE_SIZE
            if flags & PE_PRESENT:
                iovs.append((None, end - start))
                total += end - start
            continue
        if flags & PE_PARENT:
            if flags & PE_PRESENT:
                raise ImageError(f"{name}: pages at {start:#x} are both here and in the parent")
            if not any(s <= start and end <= e for s, e in spans + plan.special):
                raise ImageError(f"{name}: pages {start:#x}-{end:#x} lie outside the restored VMAs")
            in_parent.append((start, end))
            continue
        if not flags & PE_PRESENT:
            if flags & PE_LAZY and plan.lazy_mode:
                raise ImageError(f"{name}: lazy pages at {start:#x} outside the memory a "
                                 f"lazy restore leaves to the lazy-pages daemon")
            if flags & PE_LAZY:
                raise ImageError(f"{name}: lazy pages at {start:#x} without data (restore "
                                 f"with --lazy-pages and a lazy-pages daemon)")
            continue
        if any(s <= start and end <= e for s, e in plan.special):
            # upstream dumps the vdso's pages; the live vdso replaces them: skipped
            iovs.append((None, end - start))
            total += end - start
            continue
        if not any(s <= start and end <= e for s, e in spans):
            raise ImageError(f"{name}: pages {start:#x}-{end:#x} lie outside the private "
                             f"VMAs (pages are restored into private memory only)")
        if iovs and iovs[-1][0] is not None and iovs[-1][0] + iovs[-1][1] == start:
            iovs[-1] = (iovs[-1][0], iovs[-1][1] + end - start)
        else:
            iovs.append((start, end - start))
        total += end - start
    check_pages_size(images, own.name, name, total)
    own.iovs = iovs
    plan.pages_bytes = total
    if not plan.lazy_pages:
        plan.lazy = []                  # nothing for the daemon: no userfaultfd
    if in_parent:
        chain = chain or [images]
        if len(chain) < 2:
            raise ImageError(f"{name}: pages at {in_parent[0][0]:#x} live in a parent image, "
                             f"but {images.dirpath} has no parent link")
        plan.sources += parent_sources(Chain(chain, name, M.PAGE_SIZE), in_parent, plan.special)


def _entries(name: str, entries, lazy: list):
    """(entry, start, end, flags, inside a lazy range) of every pagemap entry, cut where
    a lazy range begins or ends (upstream's entries may span VMAs)."""
    import bisect
    from criu_py.images import PE_PARENT, PE_PRESENT, pagemap_nr_pages
    starts = [a for a, _ in lazy]
    for pe in entries:
        n = pagemap_nr_pages(pe)
        flags = pe.flags if pe.HasField("flags") else PE_PRESENT
        if pe.HasField("in_parent") and pe.in_parent:
            flags |= PE_PARENT
        start, end = pe.vaddr, pe.vaddr + n * M.PAGE_SIZE
        if not n or start % M.PAGE_SIZE:
            raise ImageError(f"{name}: bad entry at {start:#x} ({n} pages)")
        if not lazy:
            yield pe, start, end, flags, False
            continue
        i = max(0, bisect.bisect_right(starts, start) - 1)
        pos = start
        while pos < end:
            while i < len(lazy) and lazy[i][1] <= pos:
                i += 1
            if i >= len(lazy) or lazy[i][0] >= end:
                yield pe, pos, end, flags, False
                break
            lo, hi = max(lazy[i][0], pos), min(lazy[i][1], end)
            if lo > pos:
                yield pe, pos, lo, flags, False
            yield pe, lo, hi, flags, True
            pos = hi


def parent_sources(chain, ranges: list, special: list) -> list:
    """PageSources of the parents' pages files holding `ranges` (vdso pages, which the
    live vdso replaces, are not read)."""
    pieces = {}                     # depth -> [(offset, address, length)]
    for start, end in ranges:
        for lo, hi, depth, off in chain.resolve(start, end):
            if any(s <= lo and hi <= e for s, e in special):
                continue
            pieces.setdefault(depth, []).append((off, lo, hi - lo))
    out = []
    for depth in sorted(pieces):
        lv = chain.level(depth)
        src = PageSource(lv.images, lv.pages_name)
        pos = 0
        for off, addr, n in sorted(pieces[depth]):
            if off > pos:
                src.iovs.append((None, off - pos))
            last = src.iovs[-1] if src.iovs else None
            if last and last[0] is not None and last[0] + last[1] == addr:
                src.iovs[-1] = (last[0], last[1] + n)
            else:
                src.iovs.append((addr, n))
            pos = off + n
        out.append(src)
    return out


def page_runs_in(plan: MemoryPlan, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(address, length, source index, offset in that pages file) of the dumped pages in
    [start, end), in address order."""
    out = []
    for i, src in enumerate(plan.sources):
        off = 0
        for addr, n in src.iovs:
            if addr is not None and addr < end and start < addr + n:
                lo, hi = max(addr, start), min(addr + n, end)
                out.append((lo, hi - lo, i, off + lo - addr))
            off += n
    out.sort()
    return out


def iovs_without(iovs: list, ranges: list[tuple[int, int]]) -> list:
    """`iovs` ((address, length), pages-file order) with the pages inside `ranges`
    ((start, end), already restored another way) turned into skips."""
    if not ranges:
        return list(iovs)
    out = []

    def add(addr, n):
        if out and out[-1][0] is None and addr is None:
            out[-1] = (None, out[-1][1] + n)
        else:
            out.append((addr, n))
    for addr, n in iovs:
        if addr is None:
            add(None, n)
            continue
        pos, end = addr, addr + n
        for s, e in sorted(ranges):
            if e <= pos or s >= end:
                continue
            if s > pos:
                add(pos, s - pos)
            cut = min(e, end)
            add(None, cut - max(s, pos))
            pos = cut
        if pos < end:
            add(pos, end - pos)
    return out


def check_pages_size(images, pages_name: str, pagemap_name: str, total: int) -> None:
    """The pages file must hold exactly the bytes its pagemap describes."""
    try:
        size = os.stat(pages_name, dir_fd=images.dirfd).st_size
    except OSError as exc:
        raise ImageError(f"{pages_name}: cannot open ({exc.strerror})") from None
    if size != total:
        raise ImageError(f"{pages_name}: holds {size} bytes, {pagemap_name} describes {total}")


_OWN_VDSO = None


def own_vdso_layout() -> list[tuple[str, int, int]]:
    """[(name, start, end)] of this process's [vvar], [vvar_vclock], [vdso] (read once)."""
    global _OWN_VDSO
    if _OWN_VDSO is not None:
        return _OWN_VDSO
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] in ("[vvar]", "[vvar_vclock]", "[vdso]"):
                s, e = parts[0].split("-")
                out.append((parts[5], int(s, 16), int(e, 16)))
    _OWN_VDSO = out
    return out


def check_vdso(plan: MemoryPlan, mm, pid: int) -> None:
    """The live vdso+vvar can only come back at the dumped address as one unit, which
    needs the same sizes and offsets; anything else is refused before the fork."""
    if not plan.special:
        return
    live = own_vdso_layout()
    if not live:
        raise RestoreError(f"pid {pid}: the dump has a vdso but this process has none")
    dumped_vdso = [v for v in mm.vmas if v.status & M.VMA_AREA_VDSO]
    live_vdso = [(s, e) for n, s, e in live if n == "[vdso]"]
    base_live = min(s for _, s, _ in live)
    end_live = max(e for _, _, e in live)
    base_dump = plan.vdso_vvar
    end_dump = max(e for _, e in plan.special)
    ok = (len(dumped_vdso) == 1 and len(live_vdso) == 1
          and end_live - base_live == end_dump - base_dump
          and live_vdso[0][0] - base_live == dumped_vdso[0].start - base_dump
          and live_vdso[0][1] - live_vdso[0][0] == dumped_vdso[0].end - dumped_vdso[0].start)
    if not ok:
        raise RestoreError(f"pid {pid}: the dumped vdso/vvar layout differs from this "
                           f"kernel's; it cannot be moved into place")


# madvise advice a restored VMA gets back (vma_entry.madv bit n = advice n).
MADV_RESTORED = (1 << M.MADV_DONTFORK) | (1 << M.MADV_MERGEABLE) | (1 << M.MADV_HUGEPAGE) | \
    (1 << M.MADV_NOHUGEPAGE) | (1 << M.MADV_DONTDUMP) | (1 << M.MADV_WIPEONFORK) | \
    (1 << M.MADV_SEQUENTIAL) | (1 << M.MADV_RANDOM)


def pie_vmas(plan: MemoryPlan, premapped: dict | None = None) -> list:
    """struct pie_vma values (as pie.PieVma) for the planned VMAs; file fds must be open.
    premapped: start -> address in the premap area of the VMAs filled before the fork."""
    from criu_py.native import lib
    from criu_py.restore.pie import PieVma
    premapped = premapped or {}
    out = []
    for v in plan.vmas:
        flags = v.flags & MAP_KEEP
        if v.start in premapped:
            out.append(PieVma(v.start, v.end, v.prot, flags, lib.PIE_VMA_PREMAPPED,
                              src=premapped[v.start], map_prot=M.PROT_READ | M.PROT_WRITE))
        elif v.status & M.VMA_AREA_SYSVIPC:
            out.append(PieVma(v.start, v.end, v.prot, M.MAP_SHARED, lib.PIE_VMA_SYSVSHM,
                              fd=v.shmid))
        elif v.status & (M.VMA_FILE_PRIVATE | M.VMA_FILE_SHARED | M.VMA_ANON_SHARED):
            mf = plan.files[_vma_key(v)]
            if v.status & M.VMA_ANON_SHARED:
                flags |= M.MAP_SHARED
            out.append(PieVma(v.start, v.end, v.prot, flags & ~M.MAP_ANONYMOUS, lib.PIE_VMA_FILE,
                              fd=mf.fd, pgoff=v.pgoff))
        else:
            kind = M.MAP_DROPPABLE if flags & M.MAP_TYPE == M.MAP_DROPPABLE else M.MAP_PRIVATE
            out.append(PieVma(v.start, v.end, v.prot, (flags & ~M.MAP_TYPE) | kind,
                              lib.PIE_VMA_ANON))
        if v.HasField("madv"):
            out[-1].madv = v.madv & MADV_RESTORED
    # VMAs pages are read into are mapped writable first; the others (PROT_NONE
    # reservations, shared mappings) at once with their final protection, which also
    # keeps big PROT_NONE areas out of the commit charge.
    filled = sorted((a, a + n) for a, n in plan.filled())
    i = 0
    for pv in out:
        if pv.kind == lib.PIE_VMA_PREMAPPED:
            continue
        while i < len(filled) and filled[i][1] <= pv.start:
            i += 1
        if i < len(filled) and filled[i][0] < pv.end:
            pv.map_prot = pv.prot | M.PROT_READ | M.PROT_WRITE
    return out


