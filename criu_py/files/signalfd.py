# signalfd: the set of signals it reads and its flags, from fdinfo's sigmask; restore
# makes a new signalfd for the same set (files.img SIGNALFD entry, upstream's
# signalfd_entry). Pending signals themselves belong to the task and come back with it.
import os

from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry

FD_TYPE_SIGNALFD = 9


def signalfd_entry(fid: int, ref: FdRef):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_SIGNALFD
    fe.id = fid
    e = fe.sgfd
    e.id = fid
    e.flags = ref.flags & ~O_CLOEXEC
    fown_entry(e.fown)
    e.sigmask = ref.info.sigmask
    return fe


class SignalfdOps(FileOps):
    fd_type = FD_TYPE_SIGNALFD
    restore_imports = ("criu_py.files.kcall",)

    def claims(self, ref: FdRef) -> bool:
        return ref.link == "anon_inode:[signalfd]" and ref.info.sigmask is not None

    def dump_fd(self, ctx, ref: FdRef) -> int:
        key = ("fd", ctx.file_description_key(ref))
        return ctx.files.add(key, lambda fid: signalfd_entry(fid, ref))

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        from criu_py.files import kcall
        e = entry.sgfd
        return kcall.signalfd(e.sigmask, O_CLOEXEC | (e.flags & os.O_NONBLOCK))


OPS = SignalfdOps()
