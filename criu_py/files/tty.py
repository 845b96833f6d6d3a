# Terminals: pseudo-terminal masters (/dev/ptmx) and slaves (/dev/pts/N). files.img has
# a TTY entry per open file (tty_file_entry, its path in a REG entry as upstream) and
# tty-info.img one tty_info_entry per terminal end (id = index * 2, + 1 for the master,
# as upstream numbers them): termios, window size, exclusive mode, and for the master
# packet mode and the lock; sid and pgrp: the session it is the controlling terminal of
# and its foreground group (from /proc/PID/stat of the tree's tasks).
# Restore: all ends of one pty are one resource: the master is opened at the dumped
# index (/dev/ptmx opened until the kernel hands out that index, as CRIU does),
# unlocked, the slaves opened, settings put back, the lock last. The session leader
# makes it its controlling terminal right after setsid(), before it forks the session's
# other members; the foreground group is set once the groups exist.
# A slave whose master is outside the tree is the caller's terminal (--shell-job): on
# restore it is the restoring command's own terminal (its stdin), as in CRIU.
import fcntl
import os
import stat
import struct

from criu_py.errors import ImageError, RestoreError, Unsupported
from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry

FD_TYPE_TTY = 11
TTY_PTY = 1
PTS_MAJOR, PTMX_RDEV = 136, os.makedev(5, 2)
TIOCGPTN, TIOCSPTLCK, TIOCGPTLCK = 0x80045430, 0x40045431, 0x80045439
TIOCPKT, TIOCGPKT, TIOCGEXCL, TIOCEXCL = 0x5420, 0x80045438, 0x80045440, 0x540C
TIOCSCTTY, TIOCSPGRP, TIOCGWINSZ, TIOCSWINSZ = 0x540E, 0x5410, 0x5413, 0x5414
NCC = 19


def is_master(st: os.stat_result) -> bool:
    return st.st_rdev == PTMX_RDEV


def is_slave(st: os.stat_result) -> bool:
    return os.major(st.st_rdev) == PTS_MAJOR


def info_id(index: int, master: bool) -> int:
    return index * 2 + (1 if master else 0)


def _ioctl_int(fd: int, req: int) -> int:
    return struct.unpack("<i", fcntl.ioctl(fd, req, b"\0" * 4))[0]


TCGETS, TCSETS, TIOCGLCKTRMIOS, TIOCSLCKTRMIOS = 0x5401, 0x5402, 0x5456, 0x5457
KTERMIOS = struct.Struct("<IIIIB19s")       # the kernel's struct termios (TCGETS)


def _fill_termios(msg, fd: int, req: int) -> None:
    """termios_entry as upstream writes it: the flags, c_line, and the 19 control
    characters' bytes copied as they lie into the repeated uint32 c_cc (4 per word, the
    rest 0); speeds are in c_cflag."""
    iflag, oflag, cflag, lflag, line, cc = KTERMIOS.unpack(fcntl.ioctl(fd, req, bytes(KTERMIOS.size)))
    msg.c_iflag, msg.c_oflag, msg.c_cflag, msg.c_lflag, msg.c_line = iflag, oflag, cflag, lflag, line
    msg.c_ispeed = msg.c_ospeed = 0
    words = list(struct.unpack("<5I", cc + b"\0"))
    msg.c_cc.extend(words + [0] * (NCC - len(words)))


def _termios_bytes(t) -> bytes:
    cc = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in t.c_cc)[:NCC]
    return KTERMIOS.pack(t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_line & 0xFF,
                         cc.ljust(NCC, b"\0"))


def tty_info_entry(fd: int, index: int, master: bool, st: os.stat_result, sessions: dict):
    """tty_info_entry of one end, read through the dumper's duplicate of the fd."""
    from criu_py.images.pb import tty_pb2
    e = tty_pb2.tty_info_entry()
    e.id = info_id(index, master)
    e.type = TTY_PTY
    e.rdev = st.st_rdev
    e.dev, e.uid, e.gid = st.st_dev, st.st_uid, st.st_gid
    e.pty.index = index
    e.exclusive = bool(_ioctl_int(fd, TIOCGEXCL))
    e.packet_mode = bool(_ioctl_int(fd, TIOCGPKT)) if master else False
    e.locked = bool(_ioctl_int(fd, TIOCGPTLCK)) if master else False
    e.sid, e.pgrp = sessions.get(index, (0, 0))
    _fill_termios(e.termios, fd, TCGETS)
    _fill_termios(e.termios_locked, fd, TIOCGLCKTRMIOS)
    rows, cols, xp, yp = struct.unpack("<HHHH", fcntl.ioctl(fd, TIOCGWINSZ, b"\0" * 8))
    e.winsize.ws_row, e.winsize.ws_col, e.winsize.ws_xpixel, e.winsize.ws_ypixel = rows, cols, xp, yp
    return e


def tty_file_entry(fid: int, info: int, flags: int, regf: int):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_TTY
    fe.id = fid
    t = fe.tty
    t.id = fid
    t.tty_info_id = info
    t.flags = flags & ~O_CLOEXEC
    fown_entry(t.fown)
    t.regf_id = regf
    return fe


def controlling_ttys(procs) -> dict:
    """pty index -> (session, foreground group) of the ptys that are a controlling
    terminal of some task of the tree (/proc/PID/stat tty_nr and tpgid)."""
    out = {}
    for pd in procs:
        st = pd.stat
        if st.tty_nr and os.major(st.tty_nr) == PTS_MAJOR:
            out.setdefault(os.minor(st.tty_nr), (st.sid, max(st.tpgid, 0)))
    return out


class TtyOps(FileOps):
    fd_type = FD_TYPE_TTY
    late = True             # a slave's master may be in a table planned after it

    def claims(self, ref: FdRef) -> bool:
        return stat.S_ISCHR(ref.st.st_mode) and (is_master(ref.st) or is_slave(ref.st))

    def dump_fd(self, ctx, ref: FdRef) -> int:
        from criu_py.errors import check_errno
        from criu_py.files.regular import reg_file_entry
        from criu_py.native import lib
        dump = ctx.dump
        master = is_master(ref.st)
        index = ref.info.tty_index if master else os.minor(ref.st.st_rdev)
        if index is None:
            raise Unsupported(f"pid {ref.pid} fd {ref.fd}: {ref.link}: no pty index in fdinfo")
        if not master and index not in pty_masters(dump):
            if not ctx.opts.get("shell_job"):
                raise Unsupported(f"pid {ref.pid} fd {ref.fd}: terminal {ref.link} belongs to "
                                  f"a pty outside the tree: use --shell-job")
        desc = ctx.file_description_key(ref)
        fid = ctx.files.lookup(("fd", desc))
        if fid is not None:
            return fid
        iid = info_id(index, master)
        if iid not in dump.tty_infos:
            fd = check_errno(lib.cp_pidfd_getfd(ctx.pidfd, ref.fd), f"pidfd_getfd of fd {ref.fd}",
                             ref.pid)
            try:
                dump.tty_infos[iid] = tty_info_entry(fd, index, master, ref.st,
                                                     controlling_ttys(dump.procs))
            except OSError as exc:
                raise Unsupported(f"pid {ref.pid} fd {ref.fd}: cannot read the state of "
                                  f"{ref.link}: {exc.strerror}") from None
            finally:
                os.close(fd)
        regf = ctx.files.add(("tty-path", desc),
                             lambda i: reg_file_entry(i, ref.link, ref.flags, 0, ref.st))
        return ctx.files.add(("fd", desc), lambda i: tty_file_entry(i, iid, ref.flags, regf))

    # ---- restore
    def resource_key(self, fe, tree=None) -> tuple:
        return ("tty", fe.tty.tty_info_id // 2)

    def check_image(self, tree, fe, what: str) -> None:
        info = tree.tty_infos.get(fe.tty.tty_info_id)
        if info is None:
            raise ImageError(f"tty-info.img: no terminal {fe.tty.tty_info_id} (needed by {what})")
        if info.type != TTY_PTY:
            raise Unsupported(f"{what}: terminal of type {info.type} is not supported")
        tty_path(tree, fe)

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        index = entry.tty.tty_info_id // 2
        fds = ctx.group(("tty", index), lambda: open_pty(ctx, index))
        return os.dup(fds[entry.id])


def pty_masters(dump) -> set:
    """Indexes of the pty masters some task of the tree holds."""
    if dump.pty_masters is None:
        dump.pty_masters = {ref.info.tty_index for refs in dump.fd_index.values()
                            for _, _, plan in refs
                            for ref in (plan.ref,) if is_master(ref.st)}
    return dump.pty_masters


def tty_path(tree, fe):
    regf = tree.files.get(fe.tty.regf_id)
    if regf is None or not regf.HasField("reg"):
        raise ImageError(f"files.img: terminal {fe.id} names no path entry")
    return regf.reg


def _set_params(fd: int, info) -> None:
    if info.HasField("termios_locked"):
        fcntl.ioctl(fd, TIOCSLCKTRMIOS, _termios_bytes(info.termios_locked))
    if info.HasField("termios"):
        fcntl.ioctl(fd, TCSETS, _termios_bytes(info.termios))
    if info.HasField("winsize"):
        w = info.winsize
        fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("<HHHH", w.ws_row, w.ws_col, w.ws_xpixel,
                                                  w.ws_ypixel))
    if info.exclusive:
        fcntl.ioctl(fd, TIOCEXCL)


def _open_master(path: str, flags: int, index: int) -> int:
    """/dev/ptmx opened until it hands out `index` (the ones before are closed again)."""
    extra = []
    try:
        for _ in range(64):
            fd = os.open(path, flags)
            got = _ioctl_int(fd, TIOCGPTN)
            if got == index:
                return fd
            extra.append(fd)
            if got > index:
                break
        raise RestoreError(f"cannot get pty index {index} from {path} (it is in use)")
    finally:
        for fd in extra:
            os.close(fd)


def open_pty(ctx, index: int) -> dict:
    """Every description of pty `index`: files.img id -> fd."""
    from criu_py.images import get_str
    tree = ctx.tree
    ids = [fid for fid, fe in tree.files.items()
           if fe.HasField("tty") and fe.tty.tty_info_id // 2 == index]
    master_info = tree.tty_infos.get(info_id(index, True))
    slave_info = tree.tty_infos.get(info_id(index, False))
    out = {}
    base = os.O_NOCTTY | O_CLOEXEC
    masters = [f for f in ids if tree.files[f].tty.tty_info_id % 2]
    slaves = [f for f in ids if not tree.files[f].tty.tty_info_id % 2]
    if master_info is None:
        # the caller's terminal (--shell-job): reopen the restoring command's own
        term = ctx.caller_tty()
        for fid in slaves:
            flags = tree.files[fid].tty.flags & ~(os.O_CREAT | os.O_TRUNC | O_CLOEXEC)
            out[fid] = os.open(f"/proc/self/fd/{term}", flags | base)
        if slave_info is not None and out:
            _set_params(out[slaves[0]], slave_info)
        return out
    first = None
    for fid in masters:
        flags = tree.files[fid].tty.flags & ~(os.O_CREAT | os.O_TRUNC | O_CLOEXEC) | base
        if first is None:
            first = out[fid] = _open_master(get_str(tty_path(tree, tree.files[fid]).name), flags,
                                            index)
            fcntl.ioctl(first, TIOCSPTLCK, struct.pack("<i", 0))
        else:
            out[fid] = os.open(f"/proc/self/fd/{first}", flags)
    if first is None:
        raise RestoreError(f"pty {index}: its master is in the dump but no task holds it")
    for fid in slaves:
        flags = tree.files[fid].tty.flags & ~(os.O_CREAT | os.O_TRUNC | O_CLOEXEC) | base
        out[fid] = os.open(get_str(tty_path(tree, tree.files[fid]).name), flags)
    if slave_info is not None:
        slave = out[slaves[0]] if slaves else os.open(f"/dev/pts/{index}", os.O_RDWR | base)
        _set_params(slave, slave_info)
        if not slaves:
            os.close(slave)
    _set_params(first, master_info)
    if master_info.packet_mode:
        fcntl.ioctl(first, TIOCPKT, struct.pack("<i", 1))
    if master_info.locked:
        fcntl.ioctl(first, TIOCSPTLCK, struct.pack("<i", 1))
    return out


def take_controlling_tty(fd: int, pgrp: int = 0) -> None:
    """Make the pty slave `fd` the calling session leader's controlling terminal."""
    fcntl.ioctl(fd, TIOCSCTTY, 0)
    if pgrp:
        set_foreground(fd, pgrp)


def set_foreground(fd: int, pgrp: int) -> None:
    fcntl.ioctl(fd, TIOCSPGRP, struct.pack("<i", pgrp))


def write_info_images(dump) -> None:
    if dump.tty_infos:
        dump.images.write_entries("tty-info.img", [dump.tty_infos[k] for k in sorted(dump.tty_infos)])


OPS = TtyOps()
