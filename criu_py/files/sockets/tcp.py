# Established TCP connections (--tcp-established), through the kernel's TCP_REPAIR mode
# as CRIU's libsoccr does it. Dump: the connection is locked (netlock.py), put in repair
# mode through the dumper's duplicate of the task's fd, and read: sequence numbers of
# both queues (TCP_QUEUE_SEQ), the bytes in each (MSG_PEEK per queue: received and not
# read; sent and not acknowledged + not sent yet, SIOCOUTQ / SIOCOUTQNSD), MSS, window
# scales, SACK and timestamp options (TCP_INFO), the timestamp clock (TCP_TIMESTAMP) and
# the windows (TCP_REPAIR_WINDOW): tcp-stream-<inode in hex>.img, tcp_stream_entry and
# then the receive queue's bytes and the send queue's. The socket stays in repair mode:
# when the dumped tree is killed it closes without a packet.
# Restore: a socket in repair mode gets both sequence numbers, is bound and "connected"
# (no packet: repair mode), gets its options, timestamp, its receive queue and the sent
# part of its send queue, its windows; then repair mode ends and the part never sent is
# sent normally. The network stays locked until the whole tree runs.
import fcntl
import socket
import struct

from criu_py.errors import RestoreError
from criu_py.log import log

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
WINDOW = struct.Struct("<5I")        # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup


def repair_on(s) -> None:
    s.setsockopt(SOL_TCP, TCP_REPAIR, 1)


def repair_off(s) -> None:
    s.setsockopt(SOL_TCP, TCP_REPAIR, 0)


def repair_off_fd(fd: int) -> None:
    s = socket.socket(fileno=fd)
    try:
        repair_off(s)
    finally:
        s.detach()


def _ioctl_int(s, req: int) -> int:
    return struct.unpack("<i", fcntl.ioctl(s.fileno(), req, b"\0" * 4))[0]


def _queue(s, queue: int, length: int) -> tuple[int, bytes]:
    """(sequence number, bytes) of one queue of a socket in repair mode."""
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    seq = struct.unpack("<I", s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]
    if not length:
        return seq, b""
    data = s.recv(length + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != length:
        raise OSError(0, f"read {len(data)} of the {length} bytes queued")
    return seq, data


def dump_stream(s):
    """tcp_stream_entry and the bytes of both queues of a socket in repair mode."""
    from criu_py.images.pb import tcp_stream_pb2
    info = s.getsockopt(SOL_TCP, socket.TCP_INFO, 8)
    state, opt_mask, wscale = info[0], info[5], info[6]
    e = tcp_stream_pb2.tcp_stream_entry()
    outq = _ioctl_int(s, SIOCOUTQ)
    unsq = _ioctl_int(s, SIOCOUTQNSD)
    inq = _ioctl_int(s, SIOCINQ)
    e.inq_len, e.outq_len, e.unsq_len = inq, outq, unsq
    e.mss_clamp = s.getsockopt(SOL_TCP, socket.TCP_MAXSEG)
    e.opt_mask = opt_mask
    e.snd_wscale = 0
    if opt_mask & TCPI_OPT_WSCALE:
        e.snd_wscale, e.rcv_wscale = wscale & 0xF, wscale >> 4
    if opt_mask & TCPI_OPT_TIMESTAMPS:
        e.timestamp = struct.unpack("<I", s.getsockopt(SOL_TCP, TCP_TIMESTAMP, 4))[0]
    e.snd_wl1, e.snd_wnd, e.max_window, e.rcv_wnd, e.rcv_wup = \
        WINDOW.unpack(s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, WINDOW.size))
    e.inq_seq, rq = _queue(s, TCP_RECV_QUEUE, inq)
    e.outq_seq, sq = _queue(s, TCP_SEND_QUEUE, outq)
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    return state, e, rq + sq


def _send_queue(s, data: bytes, what: str) -> None:
    """Put bytes in the selected queue; the kernel allocates one linear buffer per call
    in repair mode, so big chunks may fail with ENOMEM: halve and go on (as libsoccr)."""
    view = memoryview(data)
    chunk = len(view)
    while view:
        try:
            n = s.send(view[:chunk])
        except OSError as exc:
            if chunk > 1024:
                chunk //= 2
                continue
            raise RestoreError(f"{what}: cannot queue {len(view)} bytes: {exc.strerror}") from None
        view = view[n:]


def restore_stream(s, e, data: bytes, src: tuple, dst: tuple, what: str,
                   stay_in_repair: bool) -> None:
    """Make socket s (fresh, not bound) the dumped connection; left in repair mode when
    its task takes it out later (once the network lock is lifted)."""
    if len(data) != e.inq_len + e.outq_len:
        raise RestoreError(f"{what}: the stream image holds {len(data)} bytes, not "
                           f"{e.inq_len + e.outq_len}")
    unsent = e.unsq_len if e.HasField("unsq_len") else 0
    repair_on(s)
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("<I", (e.inq_seq - e.inq_len) & 0xFFFFFFFF))
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.pack("<I", (e.outq_seq - e.outq_len) & 0xFFFFFFFF))
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    try:
        s.bind(src)
        s.connect(dst)
    except OSError as exc:
        raise RestoreError(f"{what}: cannot bind and connect in repair mode: {exc.strerror}") from None
    opts = []
    if e.opt_mask & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if e.opt_mask & TCPI_OPT_WSCALE:
        opts.append((TCPOPT_WINDOW, e.snd_wscale + (e.rcv_wscale << 16)))
    if e.opt_mask & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    opts.append((TCPOPT_MAXSEG, e.mss_clamp))
    s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("<II", c, v) for c, v in opts))
    if e.opt_mask & TCPI_OPT_TIMESTAMPS:
        s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.pack("<I", e.timestamp))
    inq, sent = data[:e.inq_len], data[e.inq_len:e.inq_len + e.outq_len - unsent]
    if inq:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        _send_queue(s, inq, what)
    if sent:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        _send_queue(s, sent, what)
    if unsent:
        # never sent: queued the normal way (out of repair mode for it, as libsoccr)
        rest = data[e.inq_len + e.outq_len - unsent:e.inq_len + e.outq_len]
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        repair_off(s)
        s.setblocking(False)
        n = 0
        while n < len(rest):
            try:
                n += s.send(rest[n:])
            except OSError as exc:
                raise RestoreError(f"{what}: cannot send {len(rest) - n} unsent bytes again: "
                                   f"{exc.strerror}") from None
        repair_on(s)
    if e.HasField("snd_wnd"):
        s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW,
                     WINDOW.pack(e.snd_wl1, e.snd_wnd, e.max_window, e.rcv_wnd, e.rcv_wup))
    if not stay_in_repair:
        repair_off(s)
    log.debug("%s: restored, %d bytes received, %d sent, %d not sent", what, e.inq_len,
              e.outq_len - unsent, unsent)
