# Copy-on-write memory across a restored tree. After fork(), a child's private pages are
# the parent's until one of them writes; a restore that gave every task fresh memory
# would multiply the tree's footprint by the number of children. So, as CRIU does, the
# private VMAs a child may still share with its parent (same bounds, kind and file:
# restore.tree decides) are "premapped": the parent maps and fills them in a premap area
# before it forks, the child inherits them through the fork, moves them (mremap keeps
# the sharing) into a premap area of its own and overwrites only the pages whose dumped
# contents differ. The restorer later moves every premapped VMA into place.
import os

from criu_py import mem as M
from criu_py.errors import RestoreError

NR_MMAP, NR_MREMAP, NR_MADVISE = 9, 25, 28
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MAP_FIXED, MAP_FIXED_NOREPLACE = 0x10, 0x100000
MADV_DONTNEED = 4


def _sys(nr: int, *args) -> int:
    from criu_py.native import lib
    args = list(args) + [0] * (6 - len(args))
    return lib.criu_py_restore_syscall(nr, *args)


def premap_vmas(run) -> None:
    """Map and fill run.t.premap (vma_entry list) in a fresh premap area, free in this
    process's layout and in the task's restored one; sets t.premap_area (start, end) and
    t.premap_addrs {vma start: address in the area}."""
    from criu_py.mem.restore import page_runs_in
    from criu_py.restore.pie import map_free
    t = run.t
    img = t.img
    vmas = sorted(t.premap, key=lambda v: v.start)
    size = sum(v.end - v.start for v in vmas)
    try:
        area = map_free(size, [(v.start, v.end) for v in img.mm.vmas], 0,
                        M.MAP_PRIVATE | M.MAP_ANONYMOUS | M.MAP_NORESERVE)
    except OSError as exc:
        raise RestoreError(f"cannot reserve the premap area: {exc.strerror}") from None
    t.premap_area = (area, area + size)
    t.premap_addrs = {}
    fds = {}                        # source index -> pages fd
    shared = written = compared = 0
    try:
        dst = area
        for v in vmas:
            length = v.end - v.start
            parent_vma = t.inherits.get(v.start)
            if parent_vma is not None:
                src = t.parent.premap_addrs[v.start]
                r = _sys(NR_MREMAP, src, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, dst)
                if r != dst:
                    raise RestoreError(f"cannot move the inherited VMA {v.start:#x} into "
                                       f"place: {os.strerror(-r) if r < 0 else r}")
                n_written, n_same = _fill_inherited(fds, img.memory, v, dst)
                written += n_written
                shared += n_same
                compared += n_written + n_same
            else:
                _map_fresh(run, v, dst)
                for addr, n, src, off in page_runs_in(img.memory, v.start, v.end):
                    _fill(_source_fd(fds, img.memory, src), off, dst + addr - v.start, n,
                          compare=False)
                    written += n // M.PAGE_SIZE
            t.premap_addrs[v.start] = dst
            dst += length
    finally:
        for fd in fds.values():
            os.close(fd)
    from criu_py.log import log
    log.debug("pid %d: %d VMAs premapped at %#x (%d KiB): %d pages written, %d kept shared",
              t.pid, len(vmas), area, size >> 10, written, shared)
    if compared:
        run.rs.sync.count_cow(compared, shared)


def _map_fresh(run, v, dst: int) -> None:
    length = v.end - v.start
    flags = M.MAP_PRIVATE | MAP_FIXED | (v.flags & M.MAP_NORESERVE)
    prot = M.PROT_READ | M.PROT_WRITE
    if v.status & M.VMA_FILE_PRIVATE:
        path = run.rs.tree.path(v.shmid, f"VMA {v.start:#x}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            r = _sys(NR_MMAP, dst, length, prot, flags, fd, v.pgoff)
        finally:
            os.close(fd)
    else:
        r = _sys(NR_MMAP, dst, length, prot, flags | M.MAP_ANONYMOUS, -1, 0)
    if r != dst:
        raise RestoreError(f"cannot premap VMA {v.start:#x}: {os.strerror(-r) if r < 0 else r}")


def _fill(fd: int, off: int, dst: int, length: int, compare: bool) -> int:
    from criu_py.native import lib
    r = lib.criu_py_fill_pages(fd, off, dst, length, 1 if compare else 0)
    if r < 0:
        raise RestoreError(f"reading pages at {dst:#x}: {os.strerror(-r)}")
    return r


def _source_fd(fds: dict, memory, index: int) -> int:
    """The pages file of memory.sources[index], opened once."""
    fd = fds.get(index)
    if fd is None:
        src = memory.sources[index]
        fd = fds[index] = src.images.open_raw(src.name)
    return fd


def _fill_inherited(fds: dict, memory, v, dst: int) -> tuple[int, int]:
    """The dumped pages over the inherited ones: only those that differ are written;
    pages the child did not have (not in its pagemap) are dropped back to zero (or to
    the file's page)."""
    from criu_py.mem.restore import page_runs_in
    written = same = 0
    pos = v.start
    for addr, n, src, off in page_runs_in(memory, v.start, v.end):
        if addr > pos:
            _sys(NR_MADVISE, dst + pos - v.start, addr - pos, MADV_DONTNEED)
        w = _fill(_source_fd(fds, memory, src), off, dst + addr - v.start, n, compare=True)
        written += w
        same += n // M.PAGE_SIZE - w
        pos = addr + n
    if pos < v.end:
        _sys(NR_MADVISE, dst + pos - v.start, v.end - pos, MADV_DONTNEED)
    return written, same
