# Regular files, directories and character devices opened by path (/dev/null, a log
# file opened O_APPEND, ...): files.img REG entries with name, flags, position, mode
# and, for regular files, the size (except write-only O_APPEND logs, as upstream) and
# the ELF build-id, which restore compares with what it finds (files/identity.py: a file
# whose size or mode changed, or another file at the same path, is refused in one line,
# as CRIU does). A file renamed since it was opened is reopened by the path the kernel
# reports now. Also the entries for mapped files, the exe link, cwd and root, which
# upstream stores the same way. A deleted file is a ghost (files/ghost.py).
import fcntl
import os
import stat

from criu_py.files import O_CLOEXEC, FdRef, FileOps, FileTable, fown_entry

FD_TYPE_REG = 1

# Character devices that are the same everywhere and safe to reopen by path.
_PORTABLE_CHR = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"}


def keeps_size(flags: int) -> bool:
    """Whether the size is recorded (and checked at restore): not for write-only
    O_APPEND files (logs), which may grow meanwhile, as upstream."""
    return not (flags & os.O_ACCMODE == os.O_WRONLY and flags & os.O_APPEND)


def reg_file_entry(fid: int, path: str, flags: int, pos: int, st: os.stat_result | None):
    from criu_py.images import set_str
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_REG
    fe.id = fid
    r = fe.reg
    r.id = fid
    r.flags = flags & ~O_CLOEXEC
    r.pos = pos
    fown_entry(r.fown)
    set_str(r, "name", path)
    if st is not None:
        r.mode = st.st_mode
        if stat.S_ISREG(st.st_mode) and keeps_size(flags):
            r.size = st.st_size
    return fe


def add_reg_entry(table: FileTable, key, path: str, flags: int, pos: int,
                  st: os.stat_result | None, read_from: str | None = None) -> int:
    """The id of the REG entry for `key`, made the first time with what identifies its
    file (files/identity.py: the build-id, and the stat for criu-py-file-ids.img);
    read_from is a /proc path that opens the very file."""
    def make(fid):
        fe = reg_file_entry(fid, path, flags, pos, st)
        if st is not None:
            from criu_py.files import identity
            table.stats[fid] = st
            identity.record(fe.reg, st, read_from)
        return fe
    return table.add(key, make)


def path_entry_id(table: FileTable, path: str, st: os.stat_result | None = None,
                  flags: int = os.O_RDONLY, read_from: str | None = None) -> int:
    """Id of a REG entry naming `path` (mapped files, exe, cwd, root): one per inode."""
    if st is None:
        st = os.stat(path)
    key = ("path", st.st_dev, st.st_ino, flags)
    return add_reg_entry(table, key, path, flags, 0, st, read_from)


def mapped_file_id(ctx, link: str, st: os.stat_result, flags: int, open_path: str,
                   what: str) -> int:
    """path_entry_id for a file the task maps, runs (its exe) or works in (its cwd): a
    deleted one is a ghost."""
    from criu_py.files import ghost
    deleted = ghost.is_deleted(link, st)
    fid = path_entry_id(ctx.files, ghost.live_path(link) if deleted else link, st, flags,
                        read_from=open_path)
    if deleted:
        ghost.note(ctx, fid, link, st, open_path, what)
    return fid


class RegularFileOps(FileOps):
    fd_type = FD_TYPE_REG

    def claims(self, ref: FdRef) -> bool:
        mode = ref.st.st_mode
        if not ref.link.startswith("/"):
            return False
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            return not ref.link.startswith("/memfd:")
        if stat.S_ISCHR(mode):
            return ref.link in _PORTABLE_CHR
        return False

    def dump_fd(self, ctx, ref: FdRef) -> int:
        """The files.img id of this fd's open file (dup'ed fds share one)."""
        from criu_py.files import ghost
        key = ("fd", ctx.file_description_key(ref))
        deleted = ghost.is_deleted(ref.link, ref.st) and \
            (stat.S_ISREG(ref.st.st_mode) or stat.S_ISDIR(ref.st.st_mode))
        path = ghost.live_path(ref.link) if deleted else ref.link
        fid = add_reg_entry(ctx.files, key, path, ref.flags, ref.pos, ref.st,
                            f"/proc/{ref.pid}/fd/{ref.fd}")
        if deleted:
            ghost.note(ctx, fid, ref.link, ref.st, f"/proc/{ref.pid}/fd/{ref.fd}",
                       f"pid {ref.pid} fd {ref.fd}")
        return fid

    # ---- restore
    def check_image(self, tree, fe, what: str) -> None:
        tree.check_file(fe.id, what)

    def inherit_name(self, fe) -> str:
        from criu_py.images import get_str
        return get_str(fe.reg.name)[1:]          # CRIU's: the path without its first "/"

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        """Reopen the file by path with its flags (never creating or truncating it) and
        put the position back; returns the new fd (the caller moves it into place)."""
        r = entry.reg
        given = ctx.inherited(self.inherit_name(entry))
        if given is not None:
            # --inherit-fd: the caller's open file stands for it, as it is (CRIU's way)
            return fcntl.fcntl(given, fcntl.F_DUPFD_CLOEXEC, 0)
        name = ctx.tree.reg_path(entry.id)
        flags = (r.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | O_CLOEXEC)) | O_CLOEXEC
        try:
            fd = os.open(name, flags)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {name} for fd {fdinfo.fd}: {exc.strerror}") from None
        try:
            ctx.tree.check_opened(entry.id, fd, f"fd {fdinfo.fd}")
            if r.pos and not stat.S_ISCHR(os.fstat(fd).st_mode):
                os.lseek(fd, r.pos, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd


OPS = RegularFileOps()
