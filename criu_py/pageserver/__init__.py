# CRIU's page-server protocol (upstream criu/page-xfer.c), spoken by `page-server`,
# `dump --page-server`, `dump --lazy-pages` and `lazy-pages --page-server`.
#
# Over one TCP connection, the client sends 32-byte commands, struct page_server_iov
# {u32 cmd; (4 bytes padding) u64 nr_pages; u64 vaddr; u64 dst_id} in host (little-endian)
# order; cmd = flags << 16 | command. dst_id names a pagemap: id << 8 | type (1: a
# process's pagemap-ID.img, 2: a shared memory object's pagemap-shmem-ID.img), except in
# PS_IOV_GET, where it is the pid itself (as upstream's lazy-pages sends it).
#   PS_IOV_OPEN2 (4) dst_id           -> the server opens that pagemap and a new pages
#                                        file; answers 1 byte: 1 when its dir has a parent
#                                        with that pagemap, else 0
#   PS_IOV_ADD_F (6) nr, vaddr, flags -> one pagemap entry (flags: PE_* in the cmd's flags);
#                                        with PE_PRESENT, nr pages of data follow
#   PS_IOV_ADD (1) / PS_IOV_HOLE (2)  -> the same with PE_PRESENT / PE_PARENT (old clients)
#   PS_IOV_PARENT (5) dst_id          -> answers an i32: whether a parent has that pagemap
#   PS_IOV_GET (7) pid, vaddr, nr     -> (lazy) the server answers a PS_IOV_ADD_F header
#                                        with the pages it has from vaddr on (nr or fewer),
#                                        then their data
#   PS_IOV_CLOSE (0x1023), PS_IOV_FORCE_CLOSE (0x1024) -> answers an i32 status (0: all
#                                        received and written), the session ends
#
# criu-py's extension, PS_FLAG_DIGEST (a flag bit upstream's decode_ps_cmd() masks off, so
# either side may be upstream CRIU): a client that sets it on PS_IOV_OPEN2 gets the answer
# byte with DIGEST_ANSWER set from a criu-py server, and then sends, after the data of
# every PS_IOV_ADD_F with PE_PRESENT (at most MAX_CHUNK bytes each), the CRC-32C of each
# of its 4 KiB blocks (u32 each, csrc/digest.c): the server writes the data straight from
# the socket to the pages file and seals the file with these CRCs (images/integrity.py),
# so a page damaged on the way fails the restore's check, before anything runs. A client
# that sets it on PS_IOV_GET gets, from a criu-py server, the reply's flags with
# PS_FLAG_DIGEST and the 8-byte digest of the data after it (images/integrity.py's run
# digest), checked before the data is used. An upstream server never sets the bit, and
# nothing follows the data.
import socket
import struct

PS_IOV_ADD, PS_IOV_HOLE, PS_IOV_OPEN, PS_IOV_OPEN2 = 1, 2, 3, 4
PS_IOV_PARENT, PS_IOV_ADD_F, PS_IOV_GET = 5, 6, 7
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
PS_CMD_BITS = 16
PS_CMD_MASK = (1 << PS_CMD_BITS) - 1
PS_TYPE_BITS = 8
PS_TYPE_PID, PS_TYPE_SHMEM = 1, 2
PS_FLAG_DIGEST = 0x8000          # criu-py: digests travel with the data (see above)
DIGEST_ANSWER = 0x80             # in OPEN2's answer byte: the server takes digests
HEADER = struct.Struct("<I4xQQQ")
DIGEST = struct.Struct("<Q")
CRC_SIZE = 4                     # a block's CRC after PS_IOV_ADD_F's data
MAX_CHUNK = 1 << 20              # data is sent in ADD_F commands of at most this much
DEFAULT_ADDRESS = "0.0.0.0"


def encode_cmd(cmd: int, flags: int = 0) -> int:
    return flags << PS_CMD_BITS | cmd


def decode_cmd(value: int) -> tuple[int, int]:
    return value & PS_CMD_MASK, value >> PS_CMD_BITS


def encode_pm(kind: int, ident: int) -> int:
    return ident << PS_TYPE_BITS | kind


def decode_pm(dst_id: int) -> tuple[int, int]:
    """(PS_TYPE_PID or PS_TYPE_SHMEM, id); upstream's older type numbers too."""
    kind = dst_id & ((1 << PS_TYPE_BITS) - 1)
    if kind in (PS_TYPE_PID, 10, 11, 16, 17):
        return PS_TYPE_PID, dst_id >> PS_TYPE_BITS
    if kind in (PS_TYPE_SHMEM, 27, 28, 29, 32, 33, 34):
        return PS_TYPE_SHMEM, dst_id >> PS_TYPE_BITS
    return 0, dst_id >> PS_TYPE_BITS


def pack(cmd: int, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0) -> bytes:
    return HEADER.pack(cmd, nr_pages, vaddr, dst_id)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("the connection was closed")
        got += k
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("the connection was closed")
        got += k


def digest_of(address: int, length: int) -> int:
    from criu_py.native import ffi, lib
    out = ffi.new("uint64_t *")
    lib.cp_digest_mem(ffi.cast("void *", address), length, out)
    return out[0]


def listen(address: str | None, port: int):
    """A listening TCP socket (IPv4 or IPv6 by the address)."""
    from criu_py.errors import CriuError
    address = address or DEFAULT_ADDRESS
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CriuError(f"bad page server address {address}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise CriuError(f"cannot listen on {address}:{port}: {exc.strerror}") from None
    return sock


def connect(address: str | None, port: int | None, timeout: float = 10.0):
    from criu_py.errors import CriuError
    if not address or port is None:
        raise CriuError("--page-server needs --address and --port")
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise CriuError(f"cannot connect to the page server at {address}:{port}: "
                        f"{exc.strerror or exc}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
