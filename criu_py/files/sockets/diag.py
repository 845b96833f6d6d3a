# What the kernel says about the sockets of our network namespace through sock_diag
# (NETLINK_SOCK_DIAG): for unix sockets the bound name, the inode of the bound file, the
# peer, the connections waiting in a listener's queue ("icons"), queue lengths and
# shutdown state; for TCP and UDP sockets the state, addresses, queue lengths (for a
# listener: its accept queue and its backlog) and shutdown state. One dump of each table
# per checkpoint (the tree is frozen meanwhile); plain Python on a netlink socket.
import socket
import struct

from criu_py.errors import KernelError
from criu_py.proc import Record

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3

NLMSG = struct.Struct("<IHHII")               # len, type, flags, seq, pid
NLATTR = struct.Struct("<HH")                 # len, type
UNIX_REQ = struct.Struct("<BBHIII2I")         # family, protocol, pad, states, ino, show, cookie
UNIX_MSG = struct.Struct("<BBBBI2I")          # family, type, state, pad, ino, cookie
INET_REQ = struct.Struct("<BBBBI48s")         # family, protocol, ext, pad, states, sockid
INET_MSG = struct.Struct("<BBBB2s2s16s16sI8sIIIII")  # family, state, timer, retrans, sockid..., expires,
                                                    # rqueue, wqueue, uid, inode

UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER = 0x1, 0x2, 0x4
UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN, UDIAG_SHOW_UID = 0x8, 0x10, 0x40
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS = 0, 1, 2, 3
UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN, UNIX_DIAG_UID = 4, 6, 7
INET_DIAG_SHUTDOWN = 8
ALL_STATES = 0xFFFFFFFF


class UnixDiag(Record):
    """One unix socket. name: the bound name as bytes (b"" unbound; an abstract name
    starts with a NUL); vfs: (device, inode) of the bound file; peer: the peer's inode
    (0: none, or a connection still waiting in a listener's queue); icons: for a
    listener, the inodes of the clients whose connections wait to be accepted;
    rqlen/wqlen: receive/send queue bytes (a listener: connections waiting, backlog)."""
    _fields = ("ino", "type", "state", "name", "vfs", "peer", "icons", "rqlen", "wqlen",
               "shutdown", "uid")
    name = b""
    vfs = None
    peer = 0
    icons = ()
    rqlen = wqlen = shutdown = 0
    uid = None


class InetDiag(Record):
    """One TCP or UDP socket: addresses as 16 raw bytes (4 for IPv4 in the first four),
    ports as numbers; rqlen/wqlen (a listener: connections in its accept queue, its
    backlog)."""
    _fields = ("ino", "family", "proto", "state", "src", "sport", "dst", "dport", "rqlen",
               "wqlen", "shutdown")
    shutdown = 0


def _attrs(data: bytes, off: int, end: int) -> dict:
    out = {}
    while off + NLATTR.size <= end:
        length, kind = NLATTR.unpack_from(data, off)
        if length < NLATTR.size:
            break
        out[kind & 0x3FFF] = data[off + NLATTR.size:off + length]
        off += (length + 3) & ~3
    return out


def _dump(request: bytes, parse) -> list:
    """Send one dump request, collect parse(message bytes) of every answer."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    out = []
    try:
        s.sendto(NLMSG.pack(NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request, (0, 0))
        while True:
            data = s.recv(1 << 20)
            off = 0
            while off + NLMSG.size <= len(data):
                length, kind, _, _, _ = NLMSG.unpack_from(data, off)
                if length < NLMSG.size:
                    return out
                body = data[off + NLMSG.size:off + length]
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("<i", body)[0]
                    if err:
                        raise KernelError(f"sock_diag: {socket.errno.errorcode.get(err, err)}")
                    return out
                if kind == SOCK_DIAG_BY_FAMILY:
                    out.append(parse(body))
                off += (length + 3) & ~3
    except OSError as exc:
        raise KernelError(f"sock_diag: {exc.strerror or exc}") from None
    finally:
        s.close()


def parse_unix(body: bytes) -> UnixDiag:
    _, type_, state, _, ino, _, _ = UNIX_MSG.unpack_from(body)
    a = _attrs(body, UNIX_MSG.size, len(body))
    d = UnixDiag(ino=ino, type=type_, state=state)
    if UNIX_DIAG_NAME in a:
        d.name = bytes(a[UNIX_DIAG_NAME])
    if UNIX_DIAG_VFS in a:
        vino, vdev = struct.unpack_from("<II", a[UNIX_DIAG_VFS])
        d.vfs = (vdev, vino)
    if UNIX_DIAG_PEER in a:
        d.peer = struct.unpack_from("<I", a[UNIX_DIAG_PEER])[0]
    if UNIX_DIAG_ICONS in a:
        raw = a[UNIX_DIAG_ICONS]
        d.icons = struct.unpack(f"<{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    if UNIX_DIAG_RQLEN in a:
        d.rqlen, d.wqlen = struct.unpack_from("<II", a[UNIX_DIAG_RQLEN])
    if UNIX_DIAG_SHUTDOWN in a:
        d.shutdown = a[UNIX_DIAG_SHUTDOWN][0]
    if UNIX_DIAG_UID in a:
        d.uid = struct.unpack_from("<I", a[UNIX_DIAG_UID])[0]
    return d


def unix_sockets() -> dict:
    """inode -> UnixDiag of every unix socket of our network namespace."""
    show = (UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS |
            UDIAG_SHOW_RQLEN | UDIAG_SHOW_UID)
    req = UNIX_REQ.pack(socket.AF_UNIX, 0, 0, ALL_STATES, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
    return {d.ino: d for d in _dump(req, parse_unix)}


def parse_inet(body: bytes, proto: int) -> InetDiag:
    (family, state, _, _, sport, dport, src, dst, _, _, _, rq, wq, _, ino) = INET_MSG.unpack_from(body)
    a = _attrs(body, INET_MSG.size, len(body))
    d = InetDiag(ino=ino, family=family, proto=proto, state=state, src=src,
                 sport=int.from_bytes(sport, "big"), dst=dst, dport=int.from_bytes(dport, "big"),
                 rqlen=rq, wqlen=wq)
    if INET_DIAG_SHUTDOWN in a:
        d.shutdown = a[INET_DIAG_SHUTDOWN][0]
    return d


def inet_sockets() -> dict:
    """inode -> InetDiag of every TCP and UDP socket (IPv4 and IPv6) of our network
    namespace that the kernel has hashed (bound, listening or connected). An inode 0
    (a connection waiting in an accept queue, or closing) is left out."""
    out = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            req = INET_REQ.pack(family, proto, 0, 0, ALL_STATES, bytes(48))
            for d in _dump(req, lambda body, p=proto: parse_inet(body, p)):
                if d.ino:
                    out[d.ino] = d
    return out
