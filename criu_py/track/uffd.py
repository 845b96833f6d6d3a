# userfaultfd write-protect on another process's memory, from the dumper's side: the
# uffd was made inside the task (dump/parasite.make_userfaultfd) and taken with
# pidfd_getfd, so every ioctl on it acts on the task's mm. Two modes use it:
#   - tracking (WP_ASYNC): the kernel only clears a page's protection on the first write,
#     never waking anyone; PAGEMAP_SCAN then reports the pages written since they were
#     protected (PAGE_IS_WRITTEN) and can protect them again in the same walk;
#   - snapshots (synchronous WP): a write to a protected page waits until the dumper has
#     copied it and lifts the protection (criu_py/track/snapshot.py).
import errno
import os

from criu_py.errors import check_errno

# UFFD_FEATURE_* (linux/userfaultfd.h, 6.7+)
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

# PAGEMAP_SCAN (linux/fs.h, 6.7+)
PM_SCAN_WP_MATCHING = 1 << 0
PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN, PAGE_IS_FILE = 1 << 0, 1 << 1, 1 << 2
PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_PFNZERO = 1 << 3, 1 << 4, 1 << 5
PAGE_IS_SOFT_DIRTY = 1 << 7

SCAN_VEC_LEN = 4096
NR_USERFAULTFD = 323


def _lib():
    from criu_py.native import ffi, lib
    return ffi, lib


def api(uffd: int, features: int, pid: int | None = None) -> int:
    """UFFDIO_API asking for `features`; returns what the kernel offers."""
    ffi, lib = _lib()
    out = ffi.new("uint64_t *")
    check_errno(lib.cp_uffd_api(uffd, features, out), "UFFDIO_API", pid)
    return out[0]


def register_wp(uffd: int, start: int, end: int) -> int:
    """UFFDIO_REGISTER in write-protect mode; 0 or -errno (some VMAs cannot be
    registered: the caller then treats them as untracked)."""
    _, lib = _lib()
    return lib.cp_uffd_register(uffd, start, end - start, UFFDIO_REGISTER_MODE_WP)


def unregister(uffd: int, start: int, end: int) -> int:
    _, lib = _lib()
    return lib.cp_uffd_unregister(uffd, start, end - start)


def protect(uffd: int, start: int, end: int, on: bool = True, wake: bool = True) -> int:
    """UFFDIO_WRITEPROTECT: protect [start, end) or lift the protection; 0 or -errno."""
    _, lib = _lib()
    mode = UFFDIO_WRITEPROTECT_MODE_WP if on else (0 if wake else UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    return lib.cp_uffd_wp(uffd, start, end - start, mode)


# Pages that hold data of their own: present or swapped, not the zero page, not page
# cache (the same filter as mem.dump.scan_pages).
DATA_NOT = PAGE_IS_FILE | PAGE_IS_PFNZERO
DATA_ANY = PAGE_IS_PRESENT | PAGE_IS_SWAPPED


def scan(pagemap_fd: int, start: int, end: int, report: int = 0, rearm: bool = False,
         pid: int | None = None) -> list[tuple[int, int, int]]:
    """[(start, end, categories & report)] of the data pages of [start, end), adjacent
    regions with the same reported categories merged. rearm: write-protect them again
    in the same walk (PM_SCAN_WP_MATCHING; ranges not registered with a WP_ASYNC uffd
    are skipped by the kernel, so only tracked VMAs may be scanned this way)."""
    ffi, lib = _lib()
    vec = ffi.new("struct cp_page_region[]", SCAN_VEC_LEN)
    walk_end = ffi.new("uint64_t *")
    flags = PM_SCAN_WP_MATCHING if rearm else 0
    out = []
    addr = start
    while addr < end:
        n = check_errno(lib.cp_pagemap_scan_ex(pagemap_fd, addr, end, flags, vec, SCAN_VEC_LEN,
                                               DATA_NOT, DATA_NOT, DATA_ANY, report, walk_end),
                        "PAGEMAP_SCAN", pid)
        for i in range(n):
            r = vec[i]
            cat = r.categories & report
            if out and out[-1][1] == r.start and out[-1][2] == cat:
                out[-1] = (out[-1][0], r.end, cat)
            else:
                out.append((r.start, r.end, cat))
        # A walk that filled the vector stopped at walk_end; one that did not is done
        # (walk_end may then be stale when many regions came back).
        if n < SCAN_VEC_LEN:
            break
        if walk_end[0] <= addr:
            from criu_py.errors import DumpError
            raise DumpError(f"PAGEMAP_SCAN made no progress at {addr:#x}")
        addr = walk_end[0]
    return out


def mm_alive(pagemap_fd: int) -> bool:
    """Whether the mm a pagemap fd was opened on is still the task's (after an exec or
    exit, reads of the old fd come back empty, its PAGEMAP_SCAN fails with ESRCH)."""
    try:
        return len(os.pread(pagemap_fd, 8, 0)) == 8
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EIO):
            return False
        raise
