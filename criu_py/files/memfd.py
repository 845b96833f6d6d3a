# memfd files, open as an fd or only mapped: a files.img MEMFD entry per open file
# (flags, position, inode_id), the inode itself (name, size, seals) in memfd.img and its
# contents as a shared memory object (mem.shmem), as upstream's memfd.c does.
import os
import stat

from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry

FD_TYPE_MEMFD = 18


def memfd_file_entry(fid: int, inode_id: int, flags: int, pos: int):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_MEMFD
    fe.id = fid
    m = fe.memfd
    m.id = fid
    m.flags = flags & ~O_CLOEXEC
    m.pos = pos
    fown_entry(m.fown)
    m.inode_id = inode_id
    return fe


def memfd_file_id(ctx, obj, flags: int, pos: int, fd_key=None) -> int:
    """files.img id of a memfd file: per open file for fds, per (inode, mode) for VMAs."""
    key = fd_key or ("memfd-map", obj.shmid, flags)
    return ctx.files.add(key, lambda fid: memfd_file_entry(fid, obj.memfd_inode_id, flags, pos))


class MemfdOps(FileOps):
    fd_type = FD_TYPE_MEMFD

    def claims(self, ref: FdRef) -> bool:
        return ref.link.startswith("/memfd:") and stat.S_ISREG(ref.st.st_mode)

    def check_image(self, tree, fe, what: str) -> None:
        # memfds only open, not mapped, are shared objects too
        from criu_py.mem import shmem_restore
        shmem_restore.object_for_memfd(tree.shared, tree.images, tree.memfd_inodes, fe, what)

    def dump_fd(self, ctx, ref: FdRef) -> int:
        from criu_py.mem.shmem import memfd_object
        obj = memfd_object(ctx, ref.st, ref.link, f"/proc/{ref.pid}/fd/{ref.fd}")
        key = ("fd", ctx.file_description_key(ref))
        return memfd_file_id(ctx, obj, ref.flags, ref.pos, fd_key=key)

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        """A new open file description of the restored memfd (made and filled once for
        fds and mappings alike), with the entry's flags and position."""
        m = entry.memfd
        shared = ctx.shared_fd(ctx.memfd_shmid(m.inode_id))
        flags = (m.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)) | O_CLOEXEC
        fd = os.open(f"/proc/self/fd/{shared}", flags)
        if m.pos:
            os.lseek(fd, m.pos, os.SEEK_SET)
        return fd


OPS = MemfdOps()

