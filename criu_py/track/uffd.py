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

# (the PAGEMAP_SCAN walks that read the tracking state are in csrc/track.c,
# cp_track_scan, wrapped by criu_py.track.track_scan)


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


def protect(uffd: int, start: int, end: int, on: bool = True, wake: bool = True) -> int:
    """UFFDIO_WRITEPROTECT: protect [start, end) or lift the protection; 0 or -errno."""
    _, lib = _lib()
    mode = UFFDIO_WRITEPROTECT_MODE_WP if on else (0 if wake else UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
    return lib.cp_uffd_wp(uffd, start, end - start, mode)


def mm_alive(pagemap_fd: int) -> bool:
    """Whether the mm a pagemap fd was opened on is still the task's (after an exec or
    exit, reads of the old fd come back empty, its PAGEMAP_SCAN fails with ESRCH)."""
    try:
        return len(os.pread(pagemap_fd, 8, 0)) == 8
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EIO):
            return False
        raise
