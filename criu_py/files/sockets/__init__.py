# Sockets, one module per family (like CRIU's sk-unix.c, sk-inet.c, sk-tcp.c): unix.py
# (stream, datagram, seqpacket), inet.py (TCP and UDP over IPv4 and IPv6, with tcp.py for
# established connections through TCP_REPAIR), other.py (what is refused: netlink,
# packet, raw, ...). This module holds what they share: what a socket fd is (family,
# type, protocol, read through the dumper's duplicate of the task's fd), the socket
# options CRIU saves (sk_opts_entry) both ways, shutdown state, and the dump-wide
# socket state (SocketDump: the sock_diag tables, queued unix data, TCP streams, the
# network lock and the connections in repair mode, undone if the dump fails).
from __future__ import annotations

import os
import struct

from criu_py.errors import Unsupported
from criu_py.files import FdRef
from criu_py.log import log

# The socket module costs milliseconds to import: these modules load with every dump and
# restore, so the constants they need at import time are spelled out (x86_64 Linux), and
# `socket` is imported by the functions that handle a socket.
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, AF_PACKET = 1, 2, 10, 16, 17
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_RDM, SOCK_SEQPACKET = 1, 2, 3, 4, 5
IPPROTO_TCP, IPPROTO_UDP = 6, 17
SOL_SOCKET = 1
SO_PEEK_OFF, SO_BUF_LOCK, SO_RCVBUFFORCE, SO_SNDBUFFORCE = 42, 72, 33, 32
SO_GET_FILTER = SO_ATTACH_FILTER = 26
SO_PASSSEC, SO_NO_CHECK = 34, 11
SIOCUNIXFILE = 0x89E0
SHUT_NONE, SHUT_READ, SHUT_WRITE, SHUT_BOTH = 0, 1, 2, 3     # sk_shutdown, the kernel's bits
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_CLOSE, TCP_LISTEN = 1, 2, 7, 10
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
               6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
               11: "CLOSING"}
TYPE_NAMES = {SOCK_STREAM: "stream", SOCK_DGRAM: "datagram", SOCK_SEQPACKET: "seqpacket",
              SOCK_RAW: "raw", SOCK_RDM: "rdm"}
FAMILY_NAMES = {AF_UNIX: "unix", AF_INET: "IPv4", AF_INET6: "IPv6", AF_NETLINK: "netlink",
                AF_PACKET: "packet"}


class SockKind:
    """What a socket fd is: family, type, protocol (SO_DOMAIN/SO_TYPE/SO_PROTOCOL)."""
    __slots__ = ("family", "type", "proto")

    def __init__(self, family, type_, proto):
        self.family, self.type, self.proto = family, type_, proto


def is_socket(ref: FdRef) -> bool:
    import stat
    return stat.S_ISSOCK(ref.st.st_mode)


def duplicate(ref: FdRef, pidfd: int = -1):
    """A socket object on a duplicate of the task's fd (pidfd_getfd): the very same
    socket, for getsockopt, ioctls and peeking."""
    import socket
    from criu_py.errors import check_errno
    from criu_py.native import lib
    own = pidfd < 0
    if own:
        try:
            pidfd = os.pidfd_open(ref.pid)
        except OSError as exc:
            from criu_py.errors import from_oserror
            raise from_oserror(exc, "pidfd_open", ref.pid) from None
    try:
        fd = check_errno(lib.cp_pidfd_getfd(pidfd, ref.fd), f"pidfd_getfd of fd {ref.fd}", ref.pid)
    finally:
        if own:
            os.close(pidfd)
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


def kind_of(ref: FdRef) -> SockKind:
    """Family, type and protocol of a socket fd (cached on the FdRef)."""
    import socket
    kind = getattr(ref, "sock_kind", None)
    if kind is None:
        s = duplicate(ref)
        try:
            kind = SockKind(s.getsockopt(SOL_SOCKET, socket.SO_DOMAIN),
                            s.getsockopt(SOL_SOCKET, socket.SO_TYPE),
                            s.getsockopt(SOL_SOCKET, socket.SO_PROTOCOL))
        finally:
            s.close()
        ref.sock_kind = kind
    return kind


def describe(kind: SockKind) -> str:
    fam = FAMILY_NAMES.get(kind.family, f"family {kind.family}")
    return f"{fam} {TYPE_NAMES.get(kind.type, f'type {kind.type}')} socket"


# ---------------------------------------------------------------- options
def _int(s, level: int, name: int) -> int:
    return s.getsockopt(level, name)


def dump_opts(s, family: int, e) -> None:
    """sk_opts_entry as CRIU fills it: buffers, timeouts, reuse, priority, low-water mark,
    mark, passcred/passsec (unix), dontroute, no_check, broadcast, keepalive, oobinline,
    linger, bound device, the socket filter (classic BPF)."""
    import socket
    e.so_sndbuf = _int(s, SOL_SOCKET, socket.SO_SNDBUF)
    e.so_rcvbuf = _int(s, SOL_SOCKET, socket.SO_RCVBUF)
    try:
        e.so_buf_lock = _int(s, SOL_SOCKET, SO_BUF_LOCK)
    except OSError:
        pass
    e.so_priority = _int(s, SOL_SOCKET, socket.SO_PRIORITY)
    e.so_rcvlowat = _int(s, SOL_SOCKET, socket.SO_RCVLOWAT)
    mark = _int(s, SOL_SOCKET, socket.SO_MARK)
    if mark:
        e.so_mark = mark
    for prefix, name in (("so_snd_tmo", socket.SO_SNDTIMEO), ("so_rcv_tmo", socket.SO_RCVTIMEO)):
        sec, usec = struct.unpack("<qq", s.getsockopt(SOL_SOCKET, name, 16))
        setattr(e, prefix + "_sec", sec)
        setattr(e, prefix + "_usec", usec)
    e.reuseaddr = bool(_int(s, SOL_SOCKET, socket.SO_REUSEADDR))
    e.so_reuseport = bool(_int(s, SOL_SOCKET, socket.SO_REUSEPORT))
    if family in (socket.AF_UNIX, socket.AF_NETLINK):
        e.so_passcred = bool(_int(s, SOL_SOCKET, socket.SO_PASSCRED))
        e.so_passsec = bool(_int(s, SOL_SOCKET, SO_PASSSEC))
    e.so_dontroute = bool(_int(s, SOL_SOCKET, socket.SO_DONTROUTE))
    e.so_no_check = bool(_int(s, SOL_SOCKET, SO_NO_CHECK))
    e.so_broadcast = bool(_int(s, SOL_SOCKET, socket.SO_BROADCAST))
    e.so_keepalive = bool(_int(s, SOL_SOCKET, socket.SO_KEEPALIVE))
    e.so_oobinline = int(bool(_int(s, SOL_SOCKET, socket.SO_OOBINLINE)))
    onoff, linger = struct.unpack("<ii", s.getsockopt(SOL_SOCKET, socket.SO_LINGER, 8))
    if onoff:
        e.so_linger = linger
    dev = s.getsockopt(SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
    if dev:
        e.so_bound_dev = os.fsdecode(dev)
    raw = _get_filter(s)
    if raw:
        for i in range(len(raw) // 8):
            code, jt, jf, k = struct.unpack_from("<HBBI", raw, i * 8)
            e.so_filter.append(code << 48 | jt << 40 | jf << 32 | k)


def _get_filter(s) -> bytes:
    """The attached classic BPF filter (struct sock_filter, 8 bytes per instruction).
    SO_GET_FILTER counts its length in instructions, not bytes: a zero length asks for
    the count (the socket module's getsockopt would cut the answer to that many bytes)."""
    from criu_py.native import ffi, lib
    n = ffi.new("uint32_t *", 0)
    addr = lambda p: int(ffi.cast("uintptr_t", p))     # noqa: E731
    if lib.criu_py_raw_syscall6(55, s.fileno(), SOL_SOCKET, SO_GET_FILTER, 0, addr(n), 0) or not n[0]:
        return b""
    buf = ffi.new("char[]", n[0] * 8)
    if lib.criu_py_raw_syscall6(55, s.fileno(), SOL_SOCKET, SO_GET_FILTER, addr(buf), addr(n), 0) < 0:
        return b""
    return ffi.buffer(buf, n[0] * 8)[:]


def restore_opts(s, e) -> None:
    """The options of sk_opts_entry (SO_REUSEADDR/SO_REUSEPORT excepted: the family
    modules set those once the socket is bound)."""
    import socket
    _setbufs(s, e.so_sndbuf // 2, e.so_rcvbuf // 2)
    if e.HasField("so_buf_lock") and e.so_buf_lock:
        s.setsockopt(SOL_SOCKET, SO_BUF_LOCK, e.so_buf_lock)
    if e.HasField("so_priority"):
        s.setsockopt(SOL_SOCKET, socket.SO_PRIORITY, e.so_priority)
    if e.HasField("so_rcvlowat"):
        s.setsockopt(SOL_SOCKET, socket.SO_RCVLOWAT, max(e.so_rcvlowat, 1))
    if e.HasField("so_mark"):
        s.setsockopt(SOL_SOCKET, socket.SO_MARK, e.so_mark)
    for field, name in (("so_passcred", socket.SO_PASSCRED), ("so_passsec", SO_PASSSEC),
                        ("so_dontroute", socket.SO_DONTROUTE), ("so_no_check", SO_NO_CHECK),
                        ("so_broadcast", socket.SO_BROADCAST), ("so_oobinline", socket.SO_OOBINLINE),
                        ("so_keepalive", socket.SO_KEEPALIVE)):
        if e.HasField(field) and getattr(e, field):
            s.setsockopt(SOL_SOCKET, name, 1)
    if e.HasField("so_linger"):
        s.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("<ii", 1, e.so_linger))
    for field, opt in (("tcp_keepcnt", socket.TCP_KEEPCNT), ("tcp_keepidle", socket.TCP_KEEPIDLE),
                       ("tcp_keepintvl", socket.TCP_KEEPINTVL)):
        if e.HasField(field):            # older images kept these here (CRIU reads them too)
            s.setsockopt(socket.IPPROTO_TCP, opt, getattr(e, field))
    s.setsockopt(SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("<qq", e.so_snd_tmo_sec, e.so_snd_tmo_usec))
    s.setsockopt(SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("<qq", e.so_rcv_tmo_sec, e.so_rcv_tmo_usec))
    if e.HasField("so_bound_dev") and e.so_bound_dev:
        s.setsockopt(SOL_SOCKET, socket.SO_BINDTODEVICE, os.fsencode(e.so_bound_dev))
    if len(e.so_filter):
        prog = b"".join(struct.pack("<HBBI", v >> 48 & 0xFFFF, v >> 40 & 0xFF, v >> 32 & 0xFF,
                                    v & 0xFFFFFFFF) for v in e.so_filter)
        _attach_filter(s, prog, len(e.so_filter))


def _attach_filter(s, prog: bytes, n: int) -> None:
    from criu_py.native import ffi
    buf = ffi.from_buffer(prog)
    fprog = struct.pack("<H6xQ", n, int(ffi.cast("uintptr_t", buf)))     # struct sock_fprog
    s.setsockopt(SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _setbufs(s, sndbuf: int, rcvbuf: int) -> None:
    """SO_SNDBUFFORCE/SO_RCVBUFFORCE (root, CAP_NET_ADMIN: above the sysctl limits), the
    plain options otherwise; the kernel doubles the values, as it did when they were set."""
    import socket
    for force, plain, value in ((SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf),
                                (SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)):
        try:
            s.setsockopt(SOL_SOCKET, force, value)
        except PermissionError:
            s.setsockopt(SOL_SOCKET, plain, value)


def prepare_for_queue(s) -> None:
    """Big buffers and no blocking while queued data is put back (restore_opts sets the
    dumped sizes after)."""
    _setbufs(s, 0x3FFFFFFF, 0x3FFFFFFF)
    s.setblocking(False)


def set_reuse(s, reuseaddr: bool, reuseport: bool) -> None:
    import socket
    s.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
    s.setsockopt(SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))


def set_file_flags(fd: int, flags: int) -> None:
    """O_NONBLOCK (and O_ASYNC) as dumped; a socket's access mode is always O_RDWR."""
    import fcntl
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    for bit in (os.O_NONBLOCK, 0o20000):     # O_NONBLOCK, O_ASYNC
        fl = (fl | bit) if flags & bit else (fl & ~bit)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl)


def shutdown(s, how: int, what: str) -> None:
    """Apply a dumped sk_shutdown (1 read, 2 write, 3 both)."""
    import socket
    if not how:
        return
    try:
        s.shutdown({SHUT_READ: socket.SHUT_RD, SHUT_WRITE: socket.SHUT_WR,
                    SHUT_BOTH: socket.SHUT_RDWR}[how])
    except OSError as exc:
        import errno
        if exc.errno != errno.ENOTCONN:
            raise OSError(exc.errno, f"{what}: shutdown: {exc.strerror}") from None


# ---------------------------------------------------------------- the dump's state
class SocketDump:
    """Socket state of one dump, shared by every task: the sock_diag tables (read once,
    the tree being frozen), the inodes of every socket the tree holds, sk-queues entries,
    TCP streams, unix sockets outside the tree (--ext-unix-sk), and the connections put
    in repair mode behind the network lock (undone by rollback() when the dump fails or
    the tree runs on)."""

    def __init__(self, dump):
        self.dump = dump
        self._unix = None
        self._inet = None
        self._in_tree = None
        self.queues = []               # (sk_packet_entry, bytes) for sk-queues.img
        self.streams = {}              # inode -> (tcp_stream_entry, bytes) for tcp-stream-%x.img
        self.extern = {}               # inode of a unix peer outside the tree -> files.img id
        self.repaired = []             # (socket, reuseaddr) in repair mode
        self.lock = None               # netlock.NetLock once a connection is locked
        self.committed = False

    @property
    def unix(self) -> dict:
        if self._unix is None:
            from criu_py.files.sockets import diag
            self._unix = diag.unix_sockets()
        return self._unix

    @property
    def inet(self) -> dict:
        if self._inet is None:
            from criu_py.files.sockets import diag
            self._inet = diag.inet_sockets()
        return self._inet

    @property
    def in_tree(self) -> set:
        """Inodes of every socket some task of the tree holds."""
        if self._in_tree is None:
            import stat
            self._in_tree = {ino for (_, ino), refs in self.dump.fd_index.items()
                             if stat.S_ISSOCK(refs[0][2].ref.st.st_mode)}
        return self._in_tree

    def network_lock(self):
        from criu_py.files.sockets import netlock
        if self.lock is None:
            self.lock = netlock.for_dump(self.dump.opts, self.dump.run_id, self.dump.pid)
        return self.lock

    def commit(self) -> None:
        """The tree is killed with its connections in repair mode (closed silently); the
        lock stays until the restore lifts it."""
        self.committed = True
        self.close_sockets()

    def rollback(self) -> None:
        """The tree runs on (or the dump failed): connections out of repair mode, each
        with its SO_REUSEADDR back, then the lock lifted."""
        import socket
        from criu_py.files.sockets import tcp
        for s, reuseaddr in self.repaired:
            try:
                tcp.repair_off(s)
                s.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, int(reuseaddr))
            except OSError as exc:
                log.warning("a TCP connection could not leave repair mode: %s", exc)
        self.close_sockets()
        if self.lock is not None:
            try:
                self.lock.unlock()
            except Exception as exc:            # noqa: BLE001 - best effort, said once
                log.warning("network unlock failed: %s", exc)
            self.lock = None

    def close_sockets(self) -> None:
        for s, _ in self.repaired:
            s.close()
        self.repaired = []

    def close(self) -> None:
        if not self.committed:
            self.rollback()

    def write_images(self) -> None:
        images = self.dump.images
        if self.queues:
            images.write_entries_with_payload("sk-queues.img", self.queues)
        for ino, (entry, data) in sorted(self.streams.items()):
            images.write_entries_with_payload(f"tcp-stream-{ino:x}.img", [(entry, data)])


def dump_state(ctx) -> SocketDump:
    """The dump's SocketDump (ctx: a ProcDump)."""
    dump = ctx.dump
    if dump.sockets is None:
        dump.sockets = SocketDump(dump)
    return dump.sockets


def refuse(ref: FdRef, text: str) -> Unsupported:
    return Unsupported(f"pid {ref.pid} fd {ref.fd}: {text}")
