# File handles of watched inodes (inotify watches, fanotify inode marks): opening one
# (open_by_handle_at on a mount of its device), and what a dump keeps of a watch: a
# path, found through the handle or the irmap, or - for an inode that exists but no path
# reaches - the handle alone (the restore opens it again). A watch on a deleted inode, or
# one neither way finds, fails the dump with one line naming it (upstream's behaviour).
import errno
import os
import struct

from criu_py.errors import Unsupported
from criu_py.irmap import kdev, kdev_text
from criu_py.log import log

NR_OPEN_BY_HANDLE_AT = 304
O_PATH = 0o10000000
# Filesystems whose inodes do not outlive their mount: a handle is no way back to them.
VOLATILE_FS = ("tmpfs", "devtmpfs")


def _mounts():
    from criu_py import proc
    return proc.read_mountinfo()


def mounts_of(dev: int) -> list:
    """Mounts (MountInfo) of the device dev (kernel encoding), directories first."""
    return [m for m in _mounts() if (m.major << 20 | m.minor) == dev]


def open_handle(dev: int, htype: int, handle: bytes) -> int:
    """An O_PATH fd of the inode a handle names, or -errno."""
    from criu_py.native import ffi, lib
    buf = ffi.new("char[]", struct.pack("<Ii", len(handle), htype) + handle)
    last = -errno.ENODEV
    for m in mounts_of(dev):
        try:
            mfd = os.open(m.mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fd = lib.criu_py_raw_syscall6(NR_OPEN_BY_HANDLE_AT, mfd,
                                          int(ffi.cast("uintptr_t", buf)),
                                          O_PATH | os.O_CLOEXEC, 0, 0, 0)
        finally:
            os.close(mfd)
        if fd >= 0:
            return fd
        last = fd
    return last


def handle_path(fd: int, dev: int, ino: int) -> str | None:
    """The path an opened handle's fd shows, when it names that very inode."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        st = os.lstat(link)
    except OSError:
        return None
    return link if (kdev(st.st_dev), st.st_ino) == (dev, ino) else None


def watch_path(irmap, force_irmap: bool, dev: int, ino: int, htype: int, handle: bytes,
               what: str) -> str | None:
    """The path to restore a watch with, or None to restore it through its handle.
    Raises Unsupported (one line naming `what`) when it cannot be restored."""
    fd = open_handle(dev, htype, handle) if handle else -errno.EINVAL
    try:
        if fd >= 0:
            st = os.fstat(fd)
            if st.st_nlink == 0:
                raise Unsupported(f"{what} watches a deleted file ({kdev_text(dev)} inode "
                                  f"{ino:#x}): not supported")
            if not force_irmap:
                path = handle_path(fd, dev, ino)
                if path is not None:
                    irmap.note(dev, ino, path)
                    return path
        path = irmap.lookup(dev, ino)
        if path is not None:
            return path
        if fd >= 0:
            fstypes = {m.fstype for m in mounts_of(dev)}
            if not fstypes & set(VOLATILE_FS):
                log.info("%s: no path found for %s inode %#x: kept as its file handle", what,
                         kdev_text(dev), ino)
                return None
        why = "not found: deleted, or outside --irmap-scan-path" if fd < 0 else \
            "reachable by no path (and its file system does not keep file handles)"
        raise Unsupported(f"{what} watches {kdev_text(dev)} inode {ino:#x}, {why}")
    finally:
        if fd >= 0:
            os.close(fd)


def open_target(path: str | None, dev: int, htype: int, handle: bytes) -> int:
    """Restore: an O_PATH fd of what a watch watches (by path, or by handle)."""
    if path:
        return os.open(path, O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    fd = open_handle(dev, htype, handle)
    if fd < 0:
        raise OSError(-fd, f"cannot open the file handle of {kdev_text(dev)}: {os.strerror(-fd)}")
    return fd


def fh_entry(msg, htype: int, handle: bytes, path: str | None) -> None:
    """Fill an fh_entry as upstream does: the handle as u64 words, padded to 16."""
    msg.bytes = len(handle)
    msg.type = htype
    padded = handle + bytes(-len(handle) % 8)
    words = list(struct.unpack(f"<{len(padded) // 8}Q", padded))
    words += [0] * (16 - len(words))
    msg.handle.extend(words)
    if path is not None:
        msg.path = path


def fh_handle(msg) -> tuple[int, bytes]:
    """(type, handle bytes) of an fh_entry."""
    raw = struct.pack(f"<{len(msg.handle)}Q", *msg.handle)
    return msg.type, raw[:msg.bytes]
