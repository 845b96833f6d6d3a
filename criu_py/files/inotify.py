# inotify instances: a files.img INOTIFY entry (inotify_file_entry) per open inotify,
# with every watch as upstream writes it: wd number, mask, ignored mask, device, inode
# and file handle, and the path the irmap found for it (criu_py/irmap). The restore
# makes the instance and adds the watches again in wd order, each with its old number
# (INOTIFY_IOC_SETNEXTWD; or, without it, adding and removing until the number comes).
# Events queued at dump time are not kept (as upstream: a warning says so).
import errno
import os

from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry
from criu_py.log import log

FD_TYPE_INOTIFY = 8
NR_IOCTL, NR_INOTIFY_ADD_WATCH, NR_INOTIFY_RM_WATCH, NR_INOTIFY_INIT1 = 16, 254, 255, 294
INOTIFY_IOC_SETNEXTWD = 0x40044900          # _IOW('I', 0, __s32)
IN_NONBLOCK = os.O_NONBLOCK
IN_ALL_EVENTS = 0xFFF
IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_ONESHOT = 0x02000000, 0x04000000, 0x80000000
MASK_KEPT = IN_ALL_EVENTS | IN_EXCL_UNLINK | IN_ONESHOT
FIONREAD = 0x541B


def _sys(nr: int, *args) -> int:
    from criu_py.native import ffi, lib
    args = [int(ffi.cast("intptr_t", a)) if isinstance(a, ffi.CData) else a for a in args]
    return lib.criu_py_raw_syscall6(nr, *(list(args) + [0] * (6 - len(args))))


def pending_events(pid: int, fd: int) -> int:
    """Bytes of events queued on the task's notify fd (read with a duplicate)."""
    import fcntl
    import struct
    from criu_py.native import lib
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0
    try:
        dup = lib.cp_pidfd_getfd(pidfd, fd)
        if dup < 0:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(dup, FIONREAD, b"\0" * 4))[0]
        except OSError:
            return 0
        finally:
            os.close(dup)
    finally:
        os.close(pidfd)


def mark_path(ctx, ref: FdRef, m, what: str):
    """(type, handle, path or None) of a watch/mark, path through the irmap."""
    from criu_py.irmap.handles import watch_path
    v = m.values
    htype = v.get("fhandle-type", 0)
    return htype, m.handle, watch_path(ctx.irmap, bool(ctx.opts.get("force_irmap")), v["sdev"],
                                       v["ino"], htype, m.handle, what)


def queue_watched_inodes(ctx, ref: FdRef, kind: str) -> None:
    """Pre-dump (inotify and fanotify): the inodes the fd's marks of `kind` watch, queued
    for the irmap cache (resolved once the tree runs again)."""
    from criu_py import proc
    for m in proc.read_fsnotify(ref.pid, ref.fd).marks:
        if m.kind == kind:
            ctx.dump.irmap_queue.append((m.values["sdev"], m.values["ino"],
                                         m.values.get("fhandle-type", 0), m.handle))


class InotifyOps(FileOps):
    fd_type = FD_TYPE_INOTIFY
    restore_imports = ("criu_py.irmap.handles",)

    def claims(self, ref: FdRef) -> bool:
        return ref.link == "anon_inode:inotify"

    def pre_dump(self, ctx, ref: FdRef) -> None:
        queue_watched_inodes(ctx, ref, "inotify")

    def dump_fd(self, ctx, ref: FdRef) -> int:
        from criu_py import proc
        from criu_py.images.pb import fdinfo_pb2
        from criu_py.irmap.handles import fh_entry
        info = proc.read_fsnotify(ref.pid, ref.fd)
        watches = []
        for m in sorted((m for m in info.marks if m.kind == "inotify"),
                        key=lambda m: m.values["wd"]):
            what = f"pid {ref.pid} fd {ref.fd}: inotify wd {m.values['wd']}"
            watches.append((m, *mark_path(ctx, ref, m, what)))
        queued = pending_events(ref.pid, ref.fd)
        if queued:
            log.warning("pid %d fd %d: %d bytes of inotify events are dropped", ref.pid, ref.fd,
                        queued)

        def make(fid):
            fe = fdinfo_pb2.file_entry()
            fe.type = FD_TYPE_INOTIFY
            fe.id = fid
            ie = fe.ify
            ie.id = fid
            ie.flags = ref.flags & ~O_CLOEXEC
            fown_entry(ie.fown)
            for m, htype, handle, path in watches:
                v = m.values
                we = ie.wd.add()
                we.id = 0                   # as upstream 4.2 (the owner is the file entry)
                we.i_ino, we.mask, we.ignored_mask = v["ino"], v["mask"], v.get("ignored_mask", 0)
                we.s_dev, we.wd = v["sdev"], v["wd"]
                fh_entry(we.f_handle, htype, handle, path)
            return fe
        return ctx.files.add(("fd", ctx.file_description_key(ref)), make)

    def check_image(self, tree, entry, what: str) -> None:
        """Restore, before anything is made: every watched path exists."""
        from criu_py.errors import ImageError
        for we in entry.ify.wd:
            if we.f_handle.HasField("path") and not os.path.lexists(we.f_handle.path):
                raise ImageError(f"{what}: inotify wd {we.wd} watches {we.f_handle.path}, "
                                 f"which does not exist on this system")

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        """A new inotify instance with every watch at its wd number."""
        from criu_py.irmap.handles import fh_handle, open_target
        ie = entry.ify
        fd = _sys(NR_INOTIFY_INIT1, (ie.flags & IN_NONBLOCK) | O_CLOEXEC)
        if fd < 0:
            raise OSError(-fd, f"inotify_init1 for fd {fdinfo.fd}: {os.strerror(-fd)}")
        try:
            for we in sorted(ie.wd, key=lambda w: w.wd):
                htype, handle = fh_handle(we.f_handle)
                path = we.f_handle.path if we.f_handle.HasField("path") else None
                target = open_target(path, we.s_dev, htype, handle)
                try:
                    add_watch(fd, target, we.mask & MASK_KEPT, we.wd, fdinfo.fd)
                finally:
                    os.close(target)
        except BaseException:
            os.close(fd)
            raise
        return fd


def add_watch(fd: int, target: int, mask: int, wd: int, fdnum) -> None:
    """inotify_add_watch on the O_PATH fd `target`, getting watch number wd."""
    import stat
    from criu_py.native import ffi
    if stat.S_ISLNK(os.fstat(target).st_mode):
        mask |= IN_DONT_FOLLOW
    name = ffi.new("char[]", f"/proc/self/fd/{target}".encode())
    use_ioctl = _sys(NR_IOCTL, fd, INOTIFY_IOC_SETNEXTWD, wd) == 0     # value, not pointer
    for _ in range(1 << 16):
        got = _sys(NR_INOTIFY_ADD_WATCH, fd, name, mask)
        if got < 0:
            raise OSError(-got, f"inotify_add_watch for fd {fdnum} wd {wd}: {os.strerror(-got)}")
        if got == wd:
            return
        if use_ioctl or got > wd:
            raise OSError(errno.EINVAL, f"fd {fdnum}: the watch came back as wd {got}, not {wd}")
        _sys(NR_INOTIFY_RM_WATCH, fd, got)
    raise OSError(errno.EINVAL, f"fd {fdnum}: wd {wd} was never handed out")


OPS = InotifyOps()
