# Unix sockets (stream, datagram, seqpacket): one files.img UNIXSK entry per socket
# (unix_sk_entry, as upstream 4.2 writes it), its unread data in sk-queues.img
# (sk_packet_entry {id_for = the socket whose receive queue held it, length} + bytes, one
# entry per datagram or record, so message boundaries stay).
#
# Dump: sock_diag gives the bound name, peer, shutdown state and the connections waiting
# in a listener's queue; the queue is read with MSG_PEEK through the dumper's duplicate of
# the task's fd (SO_PEEK_OFF walks it), so the task's socket is left as it was. The bound
# file (mode, owner, whether it was deleted, the directory of a relative name) comes from
# SIOCUNIXFILE. As in CRIU: a peer outside the tree is refused, except with --ext-unix-sk
# (the peer written as an entry of its own, flagged USK_EXTERN): a named datagram peer
# the restore connects to by name, or the peer of a stream or seqpacket connection (a
# service's stdout to a log collector), which only the caller can give back: the restore
# takes the socket from `--inherit-fd fd[N]:socket:[INODE]`; a client whose connection still waits in a listener of
# the tree is recorded with that listener as its peer; a connection waiting in a
# listener from a client outside the tree is lost; file descriptors in flight
# (SCM_RIGHTS) are refused.
#
# Restore: two sockets connected to each other are one resource, made with socketpair()
# by the lowest common ancestor of their users; the data queued in each is sent by the
# other. Any other socket is made on its own (bound, listening, and connected to its
# peer once the peer exists: the peer's resource is opened first); its queued data is
# sent by a helper socket (a socketpair end, disconnected with AF_UNSPEC for datagrams),
# which is then closed. Options and shutdown state last. A bound path is unlinked first
# when a socket file is there (what the dumped socket left); a deleted one is bound and
# unlinked again, peers reaching it through /proc/self/fd/N of an O_PATH fd.
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from criu_py.errors import ImageError, RestoreError, Unsupported
from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry
from criu_py.files.sockets import (AF_UNIX, SHUT_BOTH, SIOCUNIXFILE, SO_PEEK_OFF,
                                   SOCK_DGRAM, SOCK_SEQPACKET, SOCK_STREAM, TCP_CLOSE,
                                   TCP_ESTABLISHED, TCP_LISTEN, dump_state, duplicate,
                                   is_socket, kind_of, refuse)
from criu_py.log import log

FD_TYPE_UNIXSK = 5
USK_EXTERN = 1
SCM_RIGHTS = 1
MSG_CMSG_CLOEXEC = 0x40000000
TYPES = (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET)
TYPE_WORDS = {SOCK_STREAM: "stream", SOCK_DGRAM: "datagram", SOCK_SEQPACKET: "seqpacket"}


def path_of(name: bytes) -> bytes:
    """A bound path without the NUL the kernel keeps after it (and sock_diag reports)."""
    end = name.find(b"\0")
    return name if end < 0 else name[:end]


def show_name(name: bytes) -> str:
    if not name:
        return "unbound"
    if name[:1] == b"\0":
        return "@" + os.fsdecode(name[1:].replace(b"\0", b"@"))
    return os.fsdecode(path_of(name))


def unix_entry(fid: int, d, ref: FdRef | None, ns_id: int):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_UNIXSK
    fe.id = fid
    u = fe.usk
    u.id = fid
    u.ino = d.ino
    u.type = d.type
    u.state = d.state
    u.flags = (ref.flags & ~O_CLOEXEC) if ref is not None else 0
    u.uflags = 0
    u.backlog = d.wqlen
    u.peer = d.peer
    fown_entry(u.fown)
    o = u.opts
    o.so_sndbuf = o.so_rcvbuf = 0
    o.so_snd_tmo_sec = o.so_snd_tmo_usec = o.so_rcv_tmo_sec = o.so_rcv_tmo_usec = 0
    u.name = d.name
    if ns_id:
        u.ns_id = ns_id
    return fe


def _bound_file(s, name: bytes) -> tuple:
    """(stat, deleted, directory of a relative name) of the file a socket is bound to."""
    fd = fcntl.ioctl(s.fileno(), SIOCUNIXFILE)
    try:
        st = os.fstat(fd)
        link = os.readlink(f"/proc/self/fd/{fd}".encode())
    finally:
        os.close(fd)
    deleted = link.endswith(b" (deleted)")
    if deleted:
        link = link[:-len(b" (deleted)")]
    name_dir = None
    if not name.startswith(b"/"):
        rel = os.path.normpath(name)
        if not link.endswith(b"/" + rel):
            return st, deleted, None
        name_dir = link[:-len(rel) - 1] or b"/"
    return st, deleted, name_dir


class UnixOps(FileOps):
    fd_type = FD_TYPE_UNIXSK
    restore_imports = ("socket",)

    def claims(self, ref: FdRef) -> bool:
        return is_socket(ref) and kind_of(ref).family == AF_UNIX

    def dump_fd(self, ctx, ref: FdRef) -> int:
        import socket
        desc = ctx.file_description_key(ref)
        fid = ctx.files.lookup(("fd", desc))
        if fid is not None:
            return fid
        sd = dump_state(ctx)
        ino = ref.st.st_ino
        d = sd.unix.get(ino)
        if d is None:
            raise refuse(ref, f"unix socket {ino} is unknown to sock_diag")
        if d.type not in TYPES:
            raise refuse(ref, f"unix socket of type {d.type} is not supported")
        if d.state not in (TCP_LISTEN, TCP_ESTABLISHED, TCP_CLOSE):
            raise refuse(ref, f"unix socket in state {d.state} is not supported")
        what = f"unix {TYPE_WORDS[d.type]} socket {show_name(d.name)}"
        peer = self._check_peer(ctx, ref, d, what)
        s = duplicate(ref, ctx.pidfd)
        try:
            fid = ctx.files.add(("fd", desc), lambda i: unix_entry(i, d, ref, ctx.ns_ids.get("net", 0)))
            u = ctx.files.entry(fid).usk
            u.peer = peer
            if d.shutdown:
                u.shutdown = d.shutdown
            if d.name and d.name[:1] != b"\0":
                try:
                    st, deleted, name_dir = _bound_file(s, path_of(d.name))
                except OSError as exc:
                    raise refuse(ref, f"{what}: cannot find its bound file: {exc.strerror}") from None
                u.file_perms.mode, u.file_perms.uid, u.file_perms.gid = st.st_mode, st.st_uid, st.st_gid
                if deleted:
                    u.deleted = True
                if name_dir is not None:
                    from criu_py.images import set_str
                    set_str(u, "name_dir", os.fsdecode(name_dir))
            from criu_py.files.sockets import dump_opts
            dump_opts(s, socket.AF_UNIX, u.opts)
            if d.state != TCP_LISTEN:
                for entry, data in peek_queue(s, fid, d.type, ref, what):
                    sd.queues.append((entry, data))
        finally:
            s.close()
        log.debug("pid %d fd %d: %s ino %d peer %d state %d shutdown %d, %d bytes queued",
                  ref.pid, ref.fd, what, ino, peer, d.state, d.shutdown, d.rqlen)
        return fid

    def _check_peer(self, ctx, ref: FdRef, d, what: str) -> int:
        """The peer inode to record, after CRIU's rules for peers outside the tree and
        connections still waiting in a listener."""
        import socket
        sd = dump_state(ctx)
        if d.state == TCP_LISTEN:
            if 0 in d.icons:
                raise refuse(ref, f"{what}: a client that connected to it closed its socket "
                                  f"before being accepted: not supported")
            lost = [i for i in d.icons if i not in sd.in_tree]
            if lost:
                log.warning("pid %d fd %d: %s: %d connection(s) from outside the tree wait to "
                            "be accepted: they are lost", ref.pid, ref.fd, what, len(lost))
            return 0
        if d.peer:
            if d.peer in sd.in_tree:
                return d.peer
            p = sd.unix.get(d.peer)
            if not ctx.opts.get("ext_unix_sk"):
                raise refuse(ref, f"{what} is connected to a peer outside the tree (socket "
                                  f"{d.peer}{' ' + show_name(p.name) if p else ''}): use "
                                  f"--ext-unix-sk")
            if p is None:
                raise refuse(ref, f"{what} is connected to socket {d.peer} outside the tree, "
                                  f"which sock_diag does not show here")
            if d.type != socket.SOCK_DGRAM:
                return self._extern_peer(ctx, sd, d, p, d.type)
            if not p.name:
                raise refuse(ref, f"{what} is connected to an unnamed socket outside the tree "
                                  f"({d.peer}): cannot connect it again")
            return self._extern_peer(ctx, sd, d, p, socket.SOCK_DGRAM)
        if d.state == TCP_ESTABLISHED and d.type != socket.SOCK_DGRAM:
            listener = next((x for x in sd.unix.values() if x.state == TCP_LISTEN
                             and d.ino in x.icons), None)
            if listener is not None:
                if listener.ino not in sd.in_tree:
                    raise refuse(ref, f"{what} waits to be accepted by a listener outside the "
                                      f"tree ({show_name(listener.name)}): not supported")
                if d.wqlen:
                    raise refuse(ref, f"{what} sent data on a connection not yet accepted: "
                                      f"not supported")
                return listener.ino
            if d.shutdown != SHUT_BOTH:
                raise refuse(ref, f"{what} is connected to nothing and not shut down: "
                                  f"not supported")
        return 0

    @staticmethod
    def _extern_peer(ctx, sd, d, p, type_: int) -> int:
        """Record the peer outside the tree (--ext-unix-sk) as an USK_EXTERN entry, as
        upstream does; its inode goes into the socket's entry."""
        if d.peer not in sd.extern:
            fid = ctx.files.add(("unix-extern", d.peer),
                                lambda i: unix_entry(i, p, None, ctx.ns_ids.get("net", 0)))
            e = ctx.files.entry(fid).usk
            e.type, e.state, e.uflags, e.peer, e.backlog = type_, TCP_LISTEN, USK_EXTERN, 0, 0
            sd.extern[d.peer] = fid
        if type_ == SOCK_DGRAM:
            log.info("unix socket %d outside the tree (%s): restored as a connection to "
                     "that name", d.peer, show_name(p.name))
        else:
            log.info("unix socket %d is connected to %d outside the tree: its restore needs "
                     "--inherit-fd fd[N]:socket:[%d]", d.ino, d.peer, d.ino)
        return d.peer

    # ---- restore
    def inherit_name(self, fe) -> str:
        return f"socket:[{fe.usk.ino}]"

    def resource_key(self, fe, tree=None) -> tuple:
        if tree is not None:
            partner = pair_partner(tree, fe)
            if partner is not None:
                return ("usk-pair", min(fe.usk.ino, partner.usk.ino))
        return ("file", fe.id)

    def deps(self, tree, fe) -> list:
        u = fe.usk
        if not u.peer or u.peer == u.ino or pair_partner(tree, fe) is not None:
            return []
        p = images_of(tree).unix.get(u.peer)
        if p is None or p.usk.uflags & USK_EXTERN:
            return []
        return [p.id]

    def check_image(self, tree, fe, what: str) -> None:
        u = fe.usk
        if u.type not in TYPES:
            raise ImageError(f"files.img: unix socket {fe.id} of type {u.type}")
        if len(u.name) > 108:
            raise ImageError(f"files.img: unix socket {fe.id}: name of {len(u.name)} bytes")
        if u.peer and u.peer != u.ino and u.peer not in images_of(tree).unix:
            raise ImageError(f"files.img: unix socket {fe.id} has peer {u.peer}, which "
                             f"files.img does not have")
        if u.deleted and not (u.name and u.name[:1] != b"\0"):
            raise ImageError(f"files.img: unix socket {fe.id} is deleted but has no path")
        p = images_of(tree).unix.get(u.peer)
        if u.type != SOCK_DGRAM and p is not None and p.usk.uflags & USK_EXTERN and \
                self.inherit_name(fe) not in tree.inherited:
            raise Unsupported(f"{what}: unix socket {u.ino} was connected to socket {u.peer} "
                              f"outside the tree: restore with --inherit-fd "
                              f"fd[N]:socket:[{u.ino}], N a socket connected where it should be")

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        given = ctx.inherited(self.inherit_name(entry))
        if given is not None:
            # --inherit-fd: the caller's socket, as it is (its queue, its options), with
            # the dumped file flags
            from criu_py.files.sockets import set_file_flags
            fd = fcntl.fcntl(given, fcntl.F_DUPFD_CLOEXEC, 0)
            set_file_flags(fd, entry.usk.flags)
            if images_of(ctx.tree).queues.get(entry.id):
                log.warning("unix socket %d: the data queued in it at the dump is dropped: "
                            "the socket given with --inherit-fd holds its own", entry.usk.ino)
            return fd
        partner = pair_partner(ctx.tree, entry)
        if partner is not None:
            key = ("usk-pair", min(entry.usk.ino, partner.usk.ino))
            fds = ctx.group(key, lambda: open_pair(ctx, entry, partner))
            return os.dup(fds[entry.id])
        return open_standalone(ctx, entry)


OPS = UnixOps()


# ---------------------------------------------------------------- dump: queued data
def peek_queue(s, fid: int, type_: int, ref: FdRef, what: str) -> list:
    """(sk_packet_entry, bytes) for each datagram/record (stream: chunk) queued in the
    socket, read with MSG_PEEK from peek offset 0; the socket's own peek offset is put
    back. File descriptors in flight are refused."""
    import socket
    from criu_py.images.pb import sk_packet_pb2
    out = []
    orig = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
    size = max(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
               s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), 1 << 16) * 2
    if type_ == socket.SOCK_STREAM:
        size = min(size, 1 << 20)
    s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        for _ in range(1 << 20):
            try:
                data, anc, flags, _ = s.recvmsg(size, socket.CMSG_SPACE(253 * 4),
                                                socket.MSG_PEEK | socket.MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.ENOTCONN, errno.EINVAL):
                    break
                raise
            rights = [c for c in anc if c[0] == socket.SOL_SOCKET and c[1] == SCM_RIGHTS]
            for _, _, raw in rights:
                for i in range(len(raw) // 4):
                    os.close(int.from_bytes(raw[i * 4:i * 4 + 4], "little", signed=True))
            if rights or flags & socket.MSG_CTRUNC:
                raise refuse(ref, f"{what} has file descriptors in flight (SCM_RIGHTS not "
                                  f"yet received): not supported")
            if flags & socket.MSG_TRUNC:
                raise refuse(ref, f"{what}: a queued datagram is larger than {size} bytes")
            if not data and type_ != socket.SOCK_DGRAM:
                break                       # end of stream (the peer shut down)
            e = sk_packet_pb2.sk_packet_entry()
            e.id_for = fid
            e.length = len(data)
            out.append((e, data))
    finally:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, orig)
    return out


# ---------------------------------------------------------------- restore
class UnixImages:
    """What the restore knows of the tree's unix sockets: entries by inode (the extern
    ones too) and the queued data by the id of the socket it was queued in."""

    def __init__(self, tree):
        self.unix = {fe.usk.ino: fe for fe in tree.files.values() if fe.HasField("usk")}
        self.queues = {}
        if tree.images.exists("sk-queues.img"):
            from criu_py.images import PAYLOAD_SIZE
            for e, data in tree.images.read_entries_with_payload("sk-queues.img",
                                                                 PAYLOAD_SIZE["sk_queues"]):
                if e.id_for not in tree.files:
                    raise ImageError(f"sk-queues.img: data for file id {e.id_for}, which "
                                     f"files.img does not have")
                if len(e.scm):
                    raise Unsupported("sk-queues.img: file descriptors in flight (SCM_RIGHTS) "
                                      "are not supported")
                self.queues.setdefault(e.id_for, []).append(data)


def images_of(tree) -> UnixImages:
    if tree.unix_sockets is None:
        tree.unix_sockets = UnixImages(tree)
    return tree.unix_sockets


def pair_partner(tree, fe):
    """The entry of the socket fe's socket is connected to and that is connected to it
    (a socketpair, or both ends of an accepted connection), if any."""
    u = fe.usk
    if not u.peer or u.peer == u.ino:
        return None
    p = images_of(tree).unix.get(u.peer)
    if p is None or p.usk.uflags & USK_EXTERN or p.usk.peer != u.ino:
        return None
    return p


_OPATH = {}     # inode of a socket bound to a path it deleted -> an O_PATH fd of that file


@contextlib.contextmanager
def _in_dir(name_dir: str | None):
    if not name_dir:
        yield
        return
    back = os.open(".", os.O_PATH | os.O_DIRECTORY | O_CLOEXEC)
    try:
        os.chdir(name_dir)
        yield
    finally:
        os.fchdir(back)
        os.close(back)


def _name_dir(u) -> str | None:
    if not u.HasField("name_dir") or not u.name_dir:
        return None
    from criu_py.images import get_str
    return get_str(u.name_dir)


def _bind(s, fe) -> None:
    """Bind to the dumped name: a stale socket file left at the path goes first; a
    deleted one is bound, kept reachable by an O_PATH fd, and unlinked again."""
    u = fe.usk
    name = bytes(u.name)
    with _in_dir(_name_dir(u)):
        if name[:1] == b"\0":
            s.bind(name)
            return
        name = path_of(name)
        if u.deleted:
            _bind_deleted(s, fe, name)
            return
        try:
            if stat.S_ISSOCK(os.lstat(name).st_mode):
                os.unlink(name)
        except FileNotFoundError:
            pass
        try:
            s.bind(name)
        except OSError as exc:
            raise RestoreError(f"unix socket {show_name(name)}: bind: {exc.strerror}") from None
        _set_perms(name, u)


def _set_perms(name: bytes, u) -> None:
    if u.HasField("file_perms"):
        p = u.file_perms
        os.chown(name, p.uid, p.gid, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(p.mode))


def _bind_deleted(s, fe, name: bytes) -> None:
    u = fe.usk
    made = []
    d = os.path.dirname(name)
    todo = []
    while d and not os.path.exists(d):
        todo.append(d)
        d = os.path.dirname(d)
    for x in reversed(todo):
        os.mkdir(x, 0o755)
        made.append(x)
    aside = None
    try:
        if os.path.lexists(name):
            aside = name + b".criu-sk-ghost"
            os.rename(name, aside)
        try:
            s.bind(name)
            _set_perms(name, u)
            _OPATH[u.ino] = os.open(name, os.O_PATH | O_CLOEXEC)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
    finally:
        if aside is not None:
            os.rename(aside, name)
        for x in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(x)


def _connect(s, peer, opts: dict) -> None:
    """Connect to the peer's name (a deleted one through its O_PATH fd)."""
    p = peer.usk
    if p.uflags & USK_EXTERN and not opts.get("ext_unix_sk"):
        raise RestoreError(f"unix socket {show_name(p.name)} is outside the tree: restore "
                           f"with --ext-unix-sk")
    name = bytes(p.name)
    if name[:1] != b"\0":
        name = path_of(name)
    try:
        if p.ino in _OPATH:
            s.connect(f"/proc/self/fd/{_OPATH[p.ino]}".encode())
            return
        if not name:
            raise RestoreError(f"unix socket {p.ino}: its peer has no name to connect to")
        with _in_dir(_name_dir(p)):
            s.connect(name)
    except OSError as exc:
        raise RestoreError(f"unix socket: connect to {show_name(name)}: {exc.strerror}") from None


def _disconnect(s) -> None:
    """connect(AF_UNSPEC): a datagram socket forgets its peer."""
    import socket
    from criu_py.native import ffi, lib
    addr = ffi.new("unsigned short *", socket.AF_UNSPEC)
    ret = lib.criu_py_raw_syscall6(42, s.fileno(), int(ffi.cast("uintptr_t", addr)), 2, 0, 0, 0)
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))


def _send_all(sender, chunks: list, what: str) -> None:
    for data in chunks:
        try:
            n = sender.send(data)
        except OSError as exc:
            raise RestoreError(f"{what}: cannot queue {len(data)} bytes again: "
                               f"{exc.strerror}") from None
        if n != len(data):
            raise RestoreError(f"{what}: queued {n} of {len(data)} bytes")


def _finish(s, fe) -> int:
    from criu_py.files.sockets import restore_opts, set_file_flags, shutdown
    u = fe.usk
    restore_opts(s, u.opts)
    shutdown(s, u.shutdown if u.HasField("shutdown") else 0, f"unix socket {u.ino}")
    set_file_flags(s.fileno(), u.flags)
    fd = s.detach()
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    return fd


def open_pair(ctx, a, b) -> dict:
    """Both ends of a connection: socketpair(), names for datagram pairs, each end's
    queued data sent by the other, then options and shutdown state."""
    import socket
    from criu_py.files.sockets import prepare_for_queue
    ua = a.usk
    qs = images_of(ctx.tree).queues
    sa, sb = socket.socketpair(socket.AF_UNIX, ua.type)
    try:
        if ua.type == socket.SOCK_DGRAM:
            for s, fe in ((sa, a), (sb, b)):
                if fe.usk.name:
                    _bind(s, fe)
        for s in (sa, sb):
            prepare_for_queue(s)
        _send_all(sb, qs.get(a.id, []), f"unix socket {ua.ino}")
        _send_all(sa, qs.get(b.id, []), f"unix socket {b.usk.ino}")
        return {a.id: _finish(sa, a), b.id: _finish(sb, b)}
    except BaseException:
        sa.close()
        sb.close()
        raise


def open_standalone(ctx, fe) -> int:
    """A socket that is not one end of a pair of the tree."""
    import socket
    from criu_py.files.sockets import prepare_for_queue
    u = fe.usk
    tree = ctx.tree
    queue = images_of(tree).queues.get(fe.id, [])
    stream_like = u.type != socket.SOCK_DGRAM
    helper = None
    if u.type == socket.SOCK_DGRAM and queue:
        s, helper = socket.socketpair(socket.AF_UNIX, u.type)
        _disconnect(s)
        helper.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)   # clears the ECONNRESET it got
    elif stream_like and u.state == TCP_ESTABLISHED and not u.peer:
        s, helper = socket.socketpair(socket.AF_UNIX, u.type)   # the peer had closed
    else:
        s = socket.socket(socket.AF_UNIX, u.type)
    try:
        if u.name and not (stream_like and u.state == TCP_ESTABLISHED):
            _bind(s, fe)
        if u.state == TCP_LISTEN:
            s.listen(u.backlog)
        if helper is not None:
            prepare_for_queue(helper)
            prepare_for_queue(s)
            _send_all(helper, queue, f"unix socket {u.ino}")
            helper.close()
            helper = None
        if u.peer:
            peer = fe if u.peer == u.ino else images_of(tree).unix[u.peer]
            _connect(s, peer, ctx.run.rs.opts)
        return _finish(s, fe)
    except BaseException:
        s.close()
        if helper is not None:
            helper.close()
        raise
