# fanotify groups: a files.img FANOTIFY entry (fanotify_file_entry) per open group, with
# its init flags (faflags), event file flags (evflags) and marks as upstream writes them:
# inode marks (device, inode, file handle and the path the irmap found) and mount marks
# (mnt_id and the mount point), each with its mark flags, mask and ignored mask.
# Filesystem marks are refused, as upstream has no image for them. Events queued at
# dump time are not kept (a warning says so).
import os

from criu_py.errors import Unsupported
from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry
from criu_py.files.inotify import mark_path, pending_events
from criu_py.log import log

FD_TYPE_FANOTIFY = 12
MARK_INODE, MARK_MOUNT = 1, 2
NR_FANOTIFY_INIT, NR_FANOTIFY_MARK = 300, 301
FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_MARK_ADD, FAN_MARK_MOUNT = 0x1, 0x10
FAN_MARK_IGNORED_MASK, FAN_MARK_IGNORE = 0x20, 0x400
AT_FDCWD = -100


def _sys(nr: int, *args) -> int:
    from criu_py.files.inotify import _sys as sys_
    return sys_(nr, *args)


class FanotifyOps(FileOps):
    fd_type = FD_TYPE_FANOTIFY
    restore_imports = ("criu_py.irmap.handles",)

    def claims(self, ref: FdRef) -> bool:
        return ref.link == "anon_inode:[fanotify]"

    def check(self, ctx, ref: FdRef) -> None:
        from criu_py import proc
        for m in proc.read_fsnotify(ref.pid, ref.fd).marks:
            if m.kind == "sb":
                raise Unsupported(f"pid {ref.pid} fd {ref.fd}: fanotify filesystem mark on "
                                  f"{m.values.get('sdev', 0) >> 20}:"
                                  f"{m.values.get('sdev', 0) & 0xFFFFF} is not supported")

    def pre_dump(self, ctx, ref: FdRef) -> None:
        from criu_py.files.inotify import queue_watched_inodes
        queue_watched_inodes(ctx, ref, "inode")

    def dump_fd(self, ctx, ref: FdRef) -> int:
        from criu_py import proc
        from criu_py.images.pb import fdinfo_pb2
        from criu_py.irmap.handles import fh_entry
        info = proc.read_fsnotify(ref.pid, ref.fd)
        marks = []
        mounts = None
        for m in info.marks:
            if m.kind == "inode":
                what = f"pid {ref.pid} fd {ref.fd}: fanotify mark"
                marks.append((m, *mark_path(ctx, ref, m, what)))
            elif m.kind == "mount":
                if mounts is None:
                    mounts = {mi.mnt_id: mi for mi in proc.read_mountinfo(ref.pid)}
                mi = mounts.get(m.values["mnt_id"])
                if mi is None:
                    raise Unsupported(f"pid {ref.pid} fd {ref.fd}: fanotify mount mark on "
                                      f"mount {m.values['mnt_id']}, which is gone")
                marks.append((m, mi, None, None))
        queued = pending_events(ref.pid, ref.fd)
        if queued:
            log.warning("pid %d fd %d: %d bytes of fanotify events are dropped", ref.pid,
                        ref.fd, queued)

        def make(fid):
            fe = fdinfo_pb2.file_entry()
            fe.type = FD_TYPE_FANOTIFY
            fe.id = fid
            f = fe.ffy
            f.id = fid
            f.flags = ref.flags & ~O_CLOEXEC
            fown_entry(f.fown)
            f.faflags, f.evflags = info.flags, info.event_flags
            for m, a, b, c in marks:
                v = m.values
                me = f.mark.add()
                me.id = 0
                me.mflags, me.mask, me.ignored_mask = v["mflags"], v["mask"], v["ignored_mask"]
                if m.kind == "inode":
                    me.type = MARK_INODE
                    me.s_dev = v["sdev"]
                    me.ie.i_ino = v["ino"]
                    fh_entry(me.ie.f_handle, a, b, c)
                else:
                    mi = a
                    me.type = MARK_MOUNT
                    me.s_dev = mi.major << 20 | mi.minor
                    me.me.mnt_id = mi.mnt_id
                    me.me.path = mi.mount_point[1:]     # as upstream: without the leading "/"
            return fe
        return ctx.files.add(("fd", ctx.file_description_key(ref)), make)

    def check_image(self, tree, entry, what: str) -> None:
        from criu_py.errors import ImageError
        for me in entry.ffy.mark:
            path = None
            if me.type == MARK_MOUNT:
                path = "/" + me.me.path
            elif me.ie.f_handle.HasField("path"):
                path = me.ie.f_handle.path
            if path is not None and not os.path.lexists(path):
                raise ImageError(f"{what}: a fanotify mark names {path}, which does not "
                                 f"exist on this system")

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        """A new fanotify group with its marks."""
        from criu_py.irmap.handles import fh_handle, open_target
        from criu_py.native import ffi
        f = entry.ffy
        flags = f.faflags | FAN_CLOEXEC | (FAN_NONBLOCK if f.flags & os.O_NONBLOCK else 0)
        fd = _sys(NR_FANOTIFY_INIT, flags, f.evflags)
        if fd < 0:
            raise OSError(-fd, f"fanotify_init for fd {fdinfo.fd}: {os.strerror(-fd)}")
        try:
            for me in f.mark:
                add = FAN_MARK_ADD | (me.mflags & ~FAN_MARK_IGNORE)
                if me.type == MARK_MOUNT:
                    target = os.open("/" + me.me.path, os.O_PATH | os.O_CLOEXEC)
                    add |= FAN_MARK_MOUNT
                else:
                    htype, handle = fh_handle(me.ie.f_handle)
                    path = me.ie.f_handle.path if me.ie.f_handle.HasField("path") else None
                    target = open_target(path, me.s_dev, htype, handle)
                try:
                    name = ffi.new("char[]", f"/proc/self/fd/{target}".encode())
                    calls = []
                    if me.mask:
                        calls.append((add, me.mask))
                    if me.ignored_mask:
                        ignore = FAN_MARK_IGNORE if me.mflags & FAN_MARK_IGNORE else FAN_MARK_IGNORED_MASK
                        calls.append((add | ignore, me.ignored_mask))
                    for flg, mask in calls:
                        r = _sys(NR_FANOTIFY_MARK, fd, flg, mask, AT_FDCWD, name)
                        if r < 0:
                            raise OSError(-r, f"fanotify_mark for fd {fdinfo.fd}: {os.strerror(-r)}")
                finally:
                    os.close(target)
        except BaseException:
            os.close(fd)
            raise
        return fd


OPS = FanotifyOps()
