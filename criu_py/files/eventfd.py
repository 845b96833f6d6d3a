# eventfd: its counter and flags (EFD_SEMAPHORE, O_NONBLOCK), read from fdinfo; restore
# makes a new eventfd holding the same count. One files.img EVENTFD entry per open file
# (upstream's eventfd_file_entry). EFD_SEMAPHORE is not a file flag: it is kept in bit 0
# of `flags`, which is free because an eventfd is always O_RDWR (upstream's restore
# passes flags to F_SETFL, which ignores the access mode bits).
import os
import struct

from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry

FD_TYPE_EVENTFD = 6
EFD_SEMAPHORE = 1


def eventfd_entry(fid: int, ref: FdRef):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_EVENTFD
    fe.id = fid
    e = fe.efd
    e.id = fid
    e.flags = ref.flags & ~O_CLOEXEC | (EFD_SEMAPHORE if ref.info.eventfd_semaphore else 0)
    fown_entry(e.fown)
    e.counter = ref.info.eventfd_count
    return fe


class EventfdOps(FileOps):
    fd_type = FD_TYPE_EVENTFD

    def claims(self, ref: FdRef) -> bool:
        return ref.link == "anon_inode:[eventfd]" and ref.info.eventfd_count is not None

    def dump_fd(self, ctx, ref: FdRef) -> int:
        key = ("fd", ctx.file_description_key(ref))
        return ctx.files.add(key, lambda fid: eventfd_entry(fid, ref))

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        e = entry.efd
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if e.flags & os.O_NONBLOCK else 0)
        if e.flags & os.O_ACCMODE == os.O_RDWR | EFD_SEMAPHORE:
            flags |= os.EFD_SEMAPHORE
        fd = os.eventfd(0, flags)
        if e.counter:
            # eventfd(2) takes a 32-bit start value; a write adds any 64-bit count
            os.write(fd, struct.pack("<Q", e.counter))
        return fd


OPS = EventfdOps()
