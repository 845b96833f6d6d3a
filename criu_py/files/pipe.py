# Pipes: each end is a files.img PIPE entry naming the pipe by its inode (pipe_id), so
# the restore can rebuild one pipe for both ends; unread data goes to pipes-data.img.
# The data is read with tee(2) from a duplicate of the task's fd (pidfd_getfd), so it
# stays queued in the task's pipe: a dump with --leave-running changes nothing.
import fcntl
import os
import stat
import termios

from criu_py.errors import DumpError, check_errno
from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry
from criu_py.log import log

FD_TYPE_PIPE = 2
F_GETPIPE_SZ = 1032
F_SETPIPE_SZ = 1031
SPLICE_F_NONBLOCK = 2


def pipe_file_entry(fid: int, pipe_id: int, flags: int):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_PIPE
    fe.id = fid
    p = fe.pipe
    p.id = fid
    p.pipe_id = pipe_id
    p.flags = flags & ~O_CLOEXEC
    fown_entry(p.fown)
    return fe


def _pending_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def peek_pipe(pidfd: int, ref: FdRef) -> tuple[bytes, int]:
    """(queued bytes, pipe buffer size) of the task's pipe, leaving the data in it."""
    from criu_py.native import lib
    if ref.flags & os.O_ACCMODE == os.O_WRONLY:
        # tee needs a readable end: a fresh read-only open of the same pipe through /proc.
        src = os.open(f"/proc/{ref.pid}/fd/{ref.fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    else:
        src = check_errno(lib.cp_pidfd_getfd(pidfd, ref.fd), f"pidfd_getfd of fd {ref.fd}", ref.pid)
    try:
        size = fcntl.fcntl(src, F_GETPIPE_SZ)
        queued = _pending_bytes(src)
        if not queued:
            return b"", size
        rd, wr = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(wr, F_SETPIPE_SZ, max(size, 4096))
            got = 0
            while got < queued:
                n = lib.cp_tee(src, wr, queued - got, SPLICE_F_NONBLOCK)
                if n <= 0:
                    break
                got += n
            data = b""
            while len(data) < got:
                data += os.read(rd, got - len(data))
        finally:
            os.close(rd)
            os.close(wr)
        if len(data) != queued:
            raise DumpError(f"pid {ref.pid} fd {ref.fd}: read {len(data)} of {queued} "
                            f"bytes queued in the pipe")
        return data, size
    finally:
        os.close(src)


class PipeOps(FileOps):
    fd_type = FD_TYPE_PIPE

    def claims(self, ref: FdRef) -> bool:
        return stat.S_ISFIFO(ref.st.st_mode) and ref.link.startswith("pipe:")

    def resource_key(self, fe, tree=None) -> tuple:
        return ("pipe", fe.pipe.pipe_id)        # both ends come from one pipe2

    def inherit_name(self, fe) -> str:
        return f"pipe:[{fe.pipe.pipe_id}]"

    def dump_fd(self, ctx, ref: FdRef) -> int:
        pipe_id = ref.st.st_ino
        key = ("fd", ctx.file_description_key(ref))
        fid = ctx.files.add(key, lambda fid: pipe_file_entry(fid, pipe_id, ref.flags))
        if pipe_id not in ctx.pipe_data:
            data, size = peek_pipe(ctx.pidfd, ref)
            ctx.pipe_data[pipe_id] = (data, size)
            log.debug("pipe %d: %d bytes queued (buffer %d)", pipe_id, len(data), size)
        return fid

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        """A description of the pipe named by pipe_id (both ends come from one pipe2,
        refilled with its queued data when first made), with the entry's O_NONBLOCK.
        The first description of each end is that end; any other (the pipe opened again
        through /proc) is a new one, with flags of its own."""
        p = entry.pipe
        write = p.flags & os.O_ACCMODE == os.O_WRONLY
        given = ctx.inherited(self.inherit_name(entry))
        if given is not None:
            # --inherit-fd: the caller's pipe (an end outside the tree), opened again
            # with the dumped end and flags, as CRIU does; its queued data is its own
            return os.open(f"/proc/self/fd/{given}", (os.O_WRONLY if write else os.O_RDONLY)
                           | (p.flags & os.O_NONBLOCK) | O_CLOEXEC)
        rd, wr = ctx.pipe_ends(p.pipe_id, lambda: make_pipe(*ctx.pipe_data.get(p.pipe_id, (b"", 0))))
        end = wr if write else rd
        if end not in ctx.handed:
            ctx.handed.add(end)
            fd = os.dup(end)
        else:
            fd = os.open(f"/proc/self/fd/{end}",
                         (os.O_WRONLY if write else os.O_RDONLY) | os.O_NONBLOCK | O_CLOEXEC)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fl = (fl | os.O_NONBLOCK) if p.flags & os.O_NONBLOCK else (fl & ~os.O_NONBLOCK)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl)
        return fd


OPS = PipeOps()


def make_pipe(data: bytes, size: int) -> tuple[int, int]:
    """A new pipe (read end, write end) holding `data`, with buffer size `size`."""
    rd, wr = os.pipe2(O_CLOEXEC)
    want = max(size, len(data))
    if want > 65536:
        try:
            fcntl.fcntl(wr, F_SETPIPE_SZ, want)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot grow a pipe to {want} bytes: {exc.strerror}") from None
    view = memoryview(data)
    while view:
        n = os.write(wr, view)
        view = view[n:]
    return rd, wr


def pipes_data_entries(pipe_data: dict) -> list:
    """(pipe_data_entry, payload) pairs for pipes-data.img: pipes that hold data."""
    from criu_py.images.pb import pipe_data_pb2
    out = []
    for pipe_id, (data, size) in sorted(pipe_data.items()):
        if not data:
            continue
        e = pipe_data_pb2.pipe_data_entry()
        e.pipe_id = pipe_id
        e.bytes = len(data)
        e.size = size
        out.append((e, data))
    return out
