# TCP and UDP sockets over IPv4 and IPv6: one files.img INETSK entry per socket
# (inet_sk_entry as upstream 4.2 writes it: addresses as 1 or 4 u32 words in network
# byte order, state, backlog, sk_opts, ip_opts, tcp_opts, v6only, shutdown).
# Dump: sock_diag gives state, addresses, queue lengths and (for a listener) its backlog
# and accept queue; a socket the kernel has not hashed (never bound, or bound and never
# listening/connected for TCP) is read with getsockname/getpeername/TCP_INFO.
# Refused, as CRIU: a listener whose accept queue holds connections (without
# --skip-in-flight: with it they are lost, each client gets a reset), a connected TCP
# socket without --tcp-established or --tcp-close, a corked UDP socket; datagrams
# queued in a UDP socket are dropped with a warning (CRIU drops them too).
# Restore: socket(), SO_REUSEADDR/SO_REUSEPORT on while it is bound (other sockets of
# the tree may share its port: an accepted connection shares its listener's), bind,
# listen with the dumped backlog or connect (UDP), then the dumped options, reuse flags,
# shutdown and file flags. Established TCP connections: tcp.py, or closed
# (shutdown both ways) with --tcp-close.
from __future__ import annotations

import os
import struct

from criu_py.errors import ImageError, RestoreError, Unsupported
from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry
from criu_py.files.sockets import (AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP,
                                   SOCK_DGRAM, SOCK_STREAM, STATE_NAMES, TCP_CLOSE,
                                   TCP_ESTABLISHED, TCP_LISTEN, dump_state, duplicate,
                                   is_socket, kind_of, refuse)
from criu_py.log import log

FD_TYPE_INETSK = 4
IP_FREEBIND, IP_PKTINFO, IP_TOS, IP_TTL = 15, 8, 1, 2
IPV6_RECVPKTINFO, IPV6_FREEBIND = 49, 78
UDP_CORK = 1
TCP_CORK = 3
PROTOS = (IPPROTO_TCP, IPPROTO_UDP)


def _words(raw: bytes, family: int) -> list[int]:
    import socket
    n = 1 if family == socket.AF_INET else 4
    return list(struct.unpack(f"<{n}I", raw[:4 * n].ljust(4 * n, b"\0")))


def _raw(words, family: int) -> bytes:
    import socket
    return struct.pack(f"<{len(words)}I", *words)[:4 if family == socket.AF_INET else 16]


def sockaddr(family: int, words, port: int, ifname: str | None = None) -> tuple:
    import socket
    host = socket.inet_ntop(family, _raw(words, family))
    if family == socket.AF_INET:
        return (host, port)
    scope = socket.if_nametoindex(ifname) if ifname else 0
    return (host, port, 0, scope)


def _from_name(addr, family: int) -> tuple[bytes, int]:
    """(raw address, port) of a getsockname/getpeername result."""
    import socket
    return socket.inet_pton(family, addr[0]).ljust(16, b"\0"), addr[1]


class _Sk:
    """What the dump knows of one inet socket: diag's view, or getsockname's."""

    def __init__(self, s, kind, d):
        import socket
        self.family, self.type, self.proto = kind.family, kind.type, kind.proto
        if d is not None:
            self.state, self.src, self.sport, self.dst, self.dport = d.state, d.src, d.sport, d.dst, d.dport
            self.rqlen, self.wqlen, self.shutdown = d.rqlen, d.wqlen, d.shutdown
            return
        self.state, self.rqlen, self.wqlen, self.shutdown = TCP_CLOSE, 0, 0, 0
        self.src, self.sport = bytes(16), 0
        self.dst, self.dport = bytes(16), 0
        try:
            self.src, self.sport = _from_name(s.getsockname(), self.family)
        except OSError:
            pass
        try:
            self.dst, self.dport = _from_name(s.getpeername(), self.family)
            if self.type == socket.SOCK_DGRAM:
                self.state = TCP_ESTABLISHED
        except OSError:
            pass
        if self.proto == socket.IPPROTO_TCP:
            self.state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def _dump_ip_opts(s, family: int, o) -> None:
    import socket
    if family == socket.AF_INET6:
        if s.getsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND):
            o.freebind = True
        if s.getsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO):
            o.pktinfo = True
        return
    if s.getsockopt(socket.IPPROTO_IP, IP_FREEBIND):
        o.freebind = True
    if s.getsockopt(socket.IPPROTO_IP, IP_PKTINFO):
        o.pktinfo = True
    tos = s.getsockopt(socket.IPPROTO_IP, IP_TOS)
    if tos:
        o.tos = tos
    ttl = s.getsockopt(socket.IPPROTO_IP, IP_TTL)
    if ttl:
        o.ttl = ttl


def _dump_tcp_opts(s, t) -> None:
    import socket
    for field, opt in (("nodelay", socket.TCP_NODELAY), ("cork", TCP_CORK),
                       ("keepcnt", socket.TCP_KEEPCNT), ("keepidle", socket.TCP_KEEPIDLE),
                       ("keepintvl", socket.TCP_KEEPINTVL)):
        v = s.getsockopt(socket.IPPROTO_TCP, opt)
        if v:
            setattr(t, field, bool(v) if field in ("nodelay", "cork") else v)


def inet_entry(fid: int, ref: FdRef, sk: _Sk, ns_id: int):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_INETSK
    fe.id = fid
    e = fe.isk
    e.id = fid
    e.ino = ref.st.st_ino
    e.family, e.type, e.proto, e.state = sk.family, sk.type, sk.proto, sk.state
    e.src_port, e.dst_port = sk.sport, sk.dport
    e.flags = ref.flags & ~O_CLOEXEC
    e.backlog = sk.wqlen
    e.src_addr.extend(_words(sk.src, sk.family))
    e.dst_addr.extend(_words(sk.dst, sk.family))
    fown_entry(e.fown)
    if ns_id:
        e.ns_id = ns_id
    return fe


def connection(e):
    """netlock.Connection of an inet_sk_entry."""
    from criu_py.files.sockets.netlock import Connection
    return Connection(e.family, _raw(e.src_addr, e.family).ljust(16, b"\0"), e.src_port,
                      _raw(e.dst_addr, e.family).ljust(16, b"\0"), e.dst_port)


def is_connection(e) -> bool:
    """A TCP socket with a peer: an established (or closing) connection."""
    import socket
    return e.proto == socket.IPPROTO_TCP and e.dst_port != 0 and e.state != TCP_LISTEN


class InetOps(FileOps):
    fd_type = FD_TYPE_INETSK

    def claims(self, ref: FdRef) -> bool:
        if not is_socket(ref):
            return False
        k = kind_of(ref)
        return k.family in (AF_INET, AF_INET6) and k.proto in PROTOS and \
            k.type in (SOCK_STREAM, SOCK_DGRAM)

    def dump_fd(self, ctx, ref: FdRef) -> int:
        import socket
        desc = ctx.file_description_key(ref)
        fid = ctx.files.lookup(("fd", desc))
        if fid is not None:
            return fid
        sd = dump_state(ctx)
        kind = kind_of(ref)
        s = duplicate(ref, ctx.pidfd)
        keep = False
        try:
            sk = _Sk(s, kind, sd.inet.get(ref.st.st_ino))
            what = self._describe(sk)
            self._check(ctx, ref, s, sk, what)
            fid = ctx.files.add(("fd", desc), lambda i: inet_entry(i, ref, sk, ctx.ns_ids.get("net", 0)))
            e = ctx.files.entry(fid).isk
            if sk.family == socket.AF_INET6:
                e.v6only = bool(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
                dev = s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
                if dev and sk.sport and (sk.src[:2] == b"\xfe\x80"):
                    e.ifname = os.fsdecode(dev)
            _dump_ip_opts(s, sk.family, e.ip_opts)
            from criu_py.files.sockets import dump_opts
            dump_opts(s, sk.family, e.opts)
            if sk.proto == socket.IPPROTO_TCP:
                _dump_tcp_opts(s, e.tcp_opts)
            if sk.shutdown:
                e.shutdown = sk.shutdown
            if is_connection(e) and ctx.opts.get("tcp_established") and not ctx.opts.get("tcp_close"):
                keep = self._dump_connection(ctx, ref, s, e, what)
        finally:
            if not keep:
                s.close()
        log.debug("pid %d fd %d: %s (ino %d)", ref.pid, ref.fd, what, ref.st.st_ino)
        return fid

    @staticmethod
    def _describe(sk: _Sk) -> str:
        import socket
        from criu_py.files.sockets.netlock import Connection
        c = Connection(sk.family, sk.src, sk.sport, sk.dst, sk.dport)
        proto = "TCP" if sk.proto == socket.IPPROTO_TCP else "UDP"
        v = "IPv4" if sk.family == socket.AF_INET else "IPv6"
        if sk.dport:
            return f"{v} {proto} socket {c} ({STATE_NAMES.get(sk.state, sk.state)})"
        if sk.sport:
            return f"{v} {proto} socket on {str(c).split(' -> ')[0]} ({STATE_NAMES.get(sk.state, sk.state)})"
        return f"unbound {v} {proto} socket"

    def _check(self, ctx, ref: FdRef, s, sk: _Sk, what: str) -> None:
        import socket
        opts = ctx.opts
        if sk.proto == socket.IPPROTO_UDP:
            if s.getsockopt(socket.IPPROTO_UDP, UDP_CORK):
                raise refuse(ref, f"{what} is corked (UDP_CORK): not supported")
            from criu_py.files.sockets.tcp import SIOCINQ, _ioctl_int
            if _ioctl_int(s, SIOCINQ):
                log.warning("pid %d fd %d: %s: the datagrams queued in it are dropped",
                            ref.pid, ref.fd, what)
            return
        if sk.state == TCP_LISTEN:
            if sk.rqlen:
                if not opts.get("skip_in_flight"):
                    raise refuse(ref, f"{what} has {sk.rqlen} connection(s) not yet accepted: "
                                      f"use --skip-in-flight to let them be reset")
                log.warning("pid %d fd %d: %s: %d connection(s) not yet accepted are lost",
                            ref.pid, ref.fd, what, sk.rqlen)
            return
        if sk.state == TCP_CLOSE:
            return
        if not (opts.get("tcp_established") or opts.get("tcp_close")):
            raise refuse(ref, f"{what}: established TCP connection: use --tcp-established "
                              f"(or --tcp-close)")
        if sk.state != TCP_ESTABLISHED and not opts.get("tcp_close"):
            raise refuse(ref, f"{what}: a TCP connection in state "
                              f"{STATE_NAMES.get(sk.state, sk.state)} is not supported "
                              f"(use --tcp-close)")

    def _dump_connection(self, ctx, ref: FdRef, s, e, what: str) -> bool:
        """Lock, repair mode, tcp-stream image; the socket stays open (and in repair
        mode) until the dump ends."""
        from criu_py.files.sockets import tcp
        sd = dump_state(ctx)
        sd.network_lock().lock(connection(e))
        try:
            tcp.repair_on(s)
        except OSError as exc:
            raise refuse(ref, f"{what}: cannot enter TCP repair mode: {exc.strerror}") from None
        sd.repaired.append((s, e.opts.reuseaddr))
        try:
            state, stream, data = tcp.dump_stream(s)
        except OSError as exc:
            raise refuse(ref, f"{what}: cannot read the connection in repair mode: "
                              f"{exc.strerror}") from None
        if state != TCP_ESTABLISHED:
            raise refuse(ref, f"{what}: the connection went to state "
                              f"{STATE_NAMES.get(state, state)} meanwhile: not supported")
        sd.streams[e.ino] = (stream, data)
        log.info("pid %d fd %d: %s: %d bytes received, %d to send (%d not sent yet)", ref.pid,
                 ref.fd, what, stream.inq_len, stream.outq_len, stream.unsq_len)
        return True

    # ---- restore
    def check_image(self, tree, fe, what: str) -> None:
        import socket
        e = fe.isk
        n = 1 if e.family == socket.AF_INET else 4
        if e.family not in (socket.AF_INET, socket.AF_INET6) or len(e.src_addr) < n or \
                len(e.dst_addr) < n:
            raise ImageError(f"files.img: inet socket {fe.id}: bad family or address")
        if e.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM) or e.proto not in PROTOS:
            raise Unsupported(f"files.img: inet socket {fe.id} of type {e.type} protocol "
                              f"{e.proto} is not supported")

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        import socket
        from criu_py.files.sockets import (prepare_for_queue, restore_opts, set_file_flags,
                                           set_reuse, shutdown)
        e = entry.isk
        opts = ctx.run.rs.opts
        what = f"inet socket {e.ino:#x}"
        s = socket.socket(e.family, e.type, e.proto)
        try:
            if e.family == socket.AF_INET6 and e.v6only:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            set_reuse(s, True, True)
            ifname = e.ifname if e.HasField("ifname") else None
            if is_connection(e):
                if opts.get("tcp_close") or e.ino not in streams_of(ctx.tree):
                    _close_connection(s)
                else:
                    from criu_py.files.sockets import tcp
                    stream, data = streams_of(ctx.tree)[e.ino]
                    prepare_for_queue(s)
                    tcp.restore_stream(s, stream, data, sockaddr(e.family, e.src_addr, e.src_port, ifname),
                                       sockaddr(e.family, e.dst_addr, e.dst_port), what,
                                       ctx.repaired_by_restorer(entry.id))
            else:
                if e.src_port:
                    self._bind(s, e, ifname, what)
                if e.state == TCP_LISTEN:
                    s.listen(e.backlog)
                if e.dst_port:
                    try:
                        s.connect(sockaddr(e.family, e.dst_addr, e.dst_port))
                    except OSError as exc:
                        raise RestoreError(f"{what}: connect: {exc.strerror}") from None
            set_reuse(s, e.opts.reuseaddr, e.opts.so_reuseport)
            _restore_ip_opts(s, e)
            restore_opts(s, e.opts)
            if e.proto == socket.IPPROTO_TCP and e.HasField("tcp_opts"):
                _restore_tcp_opts(s, e.tcp_opts)
            if e.HasField("shutdown") and not (is_connection(e) and opts.get("tcp_close")):
                shutdown(s, e.shutdown, what)
            set_file_flags(s.fileno(), e.flags)
            return s.detach()
        except BaseException:
            s.close()
            raise

    @staticmethod
    def _bind(s, e, ifname, what: str) -> None:
        import socket
        freebind = e.family == socket.AF_INET6
        if freebind:       # an IPv6 address may still be "tentative": bind anyway
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        try:
            s.bind(sockaddr(e.family, e.src_addr, e.src_port, ifname))
        except OSError as exc:
            addr = sockaddr(e.family, e.src_addr, e.src_port)
            raise RestoreError(f"{what}: cannot bind to {addr[0]} port {addr[1]}: "
                               f"{exc.strerror}") from None
        if freebind and not (e.HasField("ip_opts") and e.ip_opts.freebind):
            s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 0)


def _close_connection(s) -> None:
    """--tcp-close: a connection comes back closed both ways (reads see the end,
    writes fail), as CRIU makes it."""
    import socket
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _restore_ip_opts(s, e) -> None:
    import socket
    if not e.HasField("ip_opts"):
        return
    o = e.ip_opts
    if e.family == socket.AF_INET6:
        if o.freebind:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        if o.pktinfo:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        return
    if o.freebind:
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    if o.pktinfo:
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    if o.HasField("tos"):
        s.setsockopt(socket.IPPROTO_IP, IP_TOS, o.tos)
    if o.HasField("ttl"):
        s.setsockopt(socket.IPPROTO_IP, IP_TTL, o.ttl)


def _restore_tcp_opts(s, t) -> None:
    import socket
    for field, opt in (("nodelay", socket.TCP_NODELAY), ("cork", TCP_CORK),
                       ("keepcnt", socket.TCP_KEEPCNT), ("keepidle", socket.TCP_KEEPIDLE),
                       ("keepintvl", socket.TCP_KEEPINTVL)):
        if t.HasField(field):
            s.setsockopt(socket.IPPROTO_TCP, opt, int(getattr(t, field)))


def streams_of(tree) -> dict:
    """inode -> (tcp_stream_entry, bytes) of every tcp-stream image of the dump."""
    if tree.inet_sockets is None:
        from criu_py.images import PAYLOAD_SIZE
        out = {}
        for fe in tree.files.values():
            if fe.HasField("isk") and is_connection(fe.isk):
                name = f"tcp-stream-{fe.isk.ino:x}.img"
                if tree.images.exists(name):
                    pairs = tree.images.read_entries_with_payload(name, PAYLOAD_SIZE["tcp_stream"])
                    if len(pairs) != 1:
                        raise ImageError(f"{name}: expected one entry, found {len(pairs)}")
                    out[fe.isk.ino] = pairs[0]
        tree.inet_sockets = out
    return tree.inet_sockets


OPS = InetOps()
