# Named pipes (fifos): the path goes into a files.img REG entry (regf_id, as upstream
# does) and the FIFO entry names the fifo by its inode (pipe_id); unread data goes to
# fifo-data.img like pipes-data.img (read with tee, so it stays in the task's fifo).
# Restore opens the fifo by its path, first O_RDWR (so that opening one end neither
# blocks nor fails for want of the other), puts the data back through that open once
# per fifo, then opens it with the dumped flags.
import os
import stat

from criu_py.errors import ImageError
from criu_py.files import O_CLOEXEC, FdRef, FileOps
from criu_py.log import log

FD_TYPE_FIFO = 3


def fifo_entry(fid: int, pipe_id: int, regf_id: int):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_FIFO
    fe.id = fid
    e = fe.fifo
    e.id = fid
    e.pipe_id = pipe_id
    e.regf_id = regf_id
    return fe


class FifoOps(FileOps):
    fd_type = FD_TYPE_FIFO

    def claims(self, ref: FdRef) -> bool:
        return stat.S_ISFIFO(ref.st.st_mode) and ref.link.startswith("/")

    def check(self, ctx, ref: FdRef) -> None:
        from criu_py.errors import Unsupported
        if ref.link.endswith(" (deleted)"):
            raise Unsupported(f"pid {ref.pid} fd {ref.fd}: fifo {ref.link} was deleted: "
                              f"not supported")

    def dump_fd(self, ctx, ref: FdRef) -> int:
        from criu_py.files.pipe import peek_pipe
        from criu_py.files.regular import reg_file_entry
        desc = ctx.file_description_key(ref)
        fid = ctx.files.lookup(("fd", desc))
        if fid is not None:
            return fid
        regf = ctx.files.add(("fifo-path", desc),
                             lambda i: reg_file_entry(i, ref.link, ref.flags, 0, ref.st))
        pipe_id = ref.st.st_ino
        fid = ctx.files.add(("fd", desc), lambda i: fifo_entry(i, pipe_id, regf))
        if pipe_id not in ctx.dump.fifo_data:
            data, size = peek_pipe(ctx.pidfd, ref)
            ctx.dump.fifo_data[pipe_id] = (data, size)
            log.debug("fifo %s: %d bytes queued", ref.link, len(data))
        return fid

    # ---- restore
    def check_image(self, tree, fe, what: str) -> None:
        fifo_path_entry(tree, fe)
        tree.check_file(fe.fifo.regf_id if fe.fifo.HasField("regf_id") else fe.id, what)

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        from criu_py.images import get_str
        regf = fifo_path_entry(ctx.tree, entry)
        name = get_str(regf.name)
        pipe_id = entry.fifo.pipe_id
        keeper = os.open(name, os.O_RDWR | os.O_NONBLOCK | O_CLOEXEC)
        try:
            owner = ctx.tree.fifo_data_owner.get(pipe_id)   # the first entry of the fifo
            data, _ = ctx.tree.fifo_data.get(pipe_id, (b"", 0))
            if owner == entry.id and data:
                view = memoryview(data)
                while view:
                    view = view[os.write(keeper, view):]
            flags = regf.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC) | O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(name, flags)
            if not regf.flags & os.O_NONBLOCK:
                os.set_blocking(fd, True)
        finally:
            os.close(keeper)
        return fd


def fifo_path_entry(tree, fe):
    """The REG entry holding the fifo's path and flags (upstream images without regf_id
    use the fifo's own id)."""
    regf_id = fe.fifo.regf_id if fe.fifo.HasField("regf_id") else fe.id
    regf = tree.files.get(regf_id)
    if regf is None or not regf.HasField("reg"):
        raise ImageError(f"files.img: fifo {fe.id} names no path entry ({regf_id})")
    return regf.reg


OPS = FifoOps()
