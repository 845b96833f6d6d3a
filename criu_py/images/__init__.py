# Reading and writing CRIU image files (the format of upstream CRIU 4.2, criu/include/magic.h and
# criu/image-desc.c): a magic header, then entries framed as a u32 length + protobuf bytes, some
# followed by raw payload. Import-light: protobuf modules are imported only when a kind is used.
#
#   from criu_py.images import ImageDir
#   d = ImageDir("/tmp/ckpt", create=True)
#   d.write_entries("core-42.img", [core])       # framed, magic header, file 0600
#   core = d.read_one("core-42.img")
#
# Every problem with an image raises criu_py.errors.ImageError whose text names the file.
import functools
import importlib
import os
import re
import struct

from criu_py.errors import ImageError

COMMON_MAGIC = 0x54564319   # first word of every image but inventory.img, stats and irmap-cache
SERVICE_MAGIC = 0x55105940  # first word of the service images (stats-*, irmap-cache.img)
RAW = "raw"                 # kind of images without magic and framing (pages-N.img, tarballs, ...)

# pagemap_entry.flags
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# kind -> (magic, protobuf module, message name). The kind is magic.h's name in lower case; crit's
# JSON "magic" field is the same name in upper case.
MAGICS = {
    "inventory": (0x58313116, "inventory_pb2", "inventory_entry"),
    "pstree": (0x50273030, "pstree_pb2", "pstree_entry"),
    "fdinfo": (0x56213732, "fdinfo_pb2", "fdinfo_entry"),
    "pagemap": (0x56084025, "pagemap_pb2", "pagemap_entry"),   # first entry: pagemap_head
    "core": (0x55053847, "core_pb2", "core_entry"),
    "ids": (0x54432030, "core_pb2", "task_kobj_ids_entry"),
    "vmas": (0x54123737, "vma_pb2", "vma_entry"),
    "pipes": (0x56513555, "pipe_pb2", "pipe_entry"),
    "pipes_data": (0x56453709, "pipe_data_pb2", "pipe_data_entry"),
    "fifo": (0x58364939, "fifo_pb2", "fifo_entry"),
    "fifo_data": (0x59333054, "pipe_data_pb2", "pipe_data_entry"),
    "sigact": (0x55344201, "sa_pb2", "sa_entry"),
    "unixsk": (0x54373943, "sk_unix_pb2", "unix_sk_entry"),
    "inetsk": (0x56443851, "sk_inet_pb2", "inet_sk_entry"),
    "packetsk": (0x60454618, "packet_sock_pb2", "packet_sock_entry"),
    "itimers": (0x57464056, "timer_pb2", "itimer_entry"),
    "posix_timers": (0x52603957, "timer_pb2", "posix_timer_entry"),
    "sk_queues": (0x56264026, "sk_packet_pb2", "sk_packet_entry"),
    "utsns": (0x54473203, "utsns_pb2", "utsns_entry"),
    "creds": (0x54023547, "creds_pb2", "creds_entry"),
    "ipc_var": (0x53115007, "ipc_var_pb2", "ipc_var_entry"),
    "ipcns_shm": (0x46283044, "ipc_shm_pb2", "ipc_shm_entry"),
    "ipcns_msg": (0x55453737, "ipc_msg_pb2", "ipc_msg_entry"),
    "ipcns_sem": (0x59573019, "ipc_sem_pb2", "ipc_sem_entry"),
    "reg_files": (0x50363636, "regfile_pb2", "reg_file_entry"),
    "ext_files": (0x59255641, "ext_file_pb2", "ext_file_entry"),
    "fs": (0x51403912, "fs_pb2", "fs_entry"),
    "mm": (0x57492820, "mm_pb2", "mm_entry"),
    "remap_fpath": (0x59133954, "remap_file_path_pb2", "remap_file_path_entry"),
    "ghost_file": (0x52583605, "ghost_file_pb2", "ghost_file_entry"),
    "tcp_stream": (0x51465506, "tcp_stream_pb2", "tcp_stream_entry"),
    "eventfd_file": (0x44523722, "eventfd_pb2", "eventfd_file_entry"),
    "eventpoll_file": (0x45023858, "eventpoll_pb2", "eventpoll_file_entry"),
    "eventpoll_tfd": (0x44433746, "eventpoll_pb2", "eventpoll_tfd_entry"),
    "signalfd": (0x57323820, "signalfd_pb2", "signalfd_entry"),
    "inotify_file": (0x48424431, "fsnotify_pb2", "inotify_file_entry"),
    "inotify_wd": (0x54562009, "fsnotify_pb2", "inotify_wd_entry"),
    "mnts": (0x55563928, "mnt_pb2", "mnt_entry"),
    "netdev": (0x57373951, "netdev_pb2", "net_device_entry"),
    "netns": (0x55933752, "netdev_pb2", "netns_entry"),
    "tty_files": (0x59433025, "tty_pb2", "tty_file_entry"),
    "tty_info": (0x59453036, "tty_pb2", "tty_info_entry"),
    "tty_data": (0x59413026, "tty_pb2", "tty_data_entry"),
    "file_locks": (0x54323616, "file_lock_pb2", "file_lock_entry"),
    "rlimit": (0x57113925, "rlimit_pb2", "rlimit_entry"),
    "fanotify_file": (0x55096122, "fsnotify_pb2", "fanotify_file_entry"),
    "fanotify_mark": (0x56506035, "fsnotify_pb2", "fanotify_mark_entry"),
    "signal": (0x59255647, "siginfo_pb2", "signal_queue_entry"),
    "netlink_sk": (0x58005614, "sk_netlink_pb2", "netlink_sk_entry"),
    "ns_files": (0x61394011, "ns_pb2", "ns_file_entry"),
    "tunfile": (0x57143751, "tun_pb2", "tunfile_entry"),
    "cgroup": (0x59383330, "cgroup_pb2", "cgroup_entry"),
    "timerfd": (0x50493712, "timerfd_pb2", "timerfd_entry"),
    "cpuinfo": (0x61404013, "cpuinfo_pb2", "cpuinfo_entry"),
    "userns": (0x55474906, "userns_pb2", "userns_entry"),
    "seccomp": (0x64413049, "seccomp_pb2", "seccomp_entry"),
    "binfmt_misc": (0x67343323, "binfmt_misc_pb2", "binfmt_misc_entry"),
    "autofs": (0x49353943, "autofs_pb2", "autofs_entry"),
    "files": (0x56303138, "fdinfo_pb2", "file_entry"),
    "memfd_inode": (0x48453499, "memfd_pb2", "memfd_inode_entry"),
    "timens": (0x43114433, "timens_pb2", "timens_entry"),
    "pidns": (0x61157326, "pidns_pb2", "pidns_entry"),
    "bpfmap_file": (0x57506142, "bpfmap_file_pb2", "bpfmap_file_entry"),
    "bpfmap_data": (0x64324033, "bpfmap_data_pb2", "bpfmap_data_entry"),
    "apparmor": (0x59423047, "apparmor_pb2", "apparmor_entry"),
    "stats": (0x57093306, "stats_pb2", "stats_entry"),
    "irmap_cache": (0x57004059, "fh_pb2", "irmap_cache_entry"),
    # criu-py's own: checksums of the image set (images/integrity.py); not in magic.h
    "checksums": (0x51535843, "integrity_pb2", "integrity_file_entry"),
    # criu-py's own: which file each REG entry named (files/identity.py); not in magic.h
    "file_ids": (0x51534649, "file_ident_pb2", "file_ident_entry"),
}
# Kinds whose first entry is of another message (the head).
HEADS = {"pagemap": ("pagemap_pb2", "pagemap_head"),
         "checksums": ("integrity_pb2", "integrity_head"),
         "file_ids": ("file_ident_pb2", "file_ident_head")}
SERVICE_KINDS = frozenset({"stats", "irmap_cache"})
# Images only criu-py writes and reads (upstream tools do not know their magics).
CRIU_PY_IMAGES = frozenset({"criu-py-checksums.img", "criu-py-checksums-ps.img",
                            "criu-py-file-ids.img"})
NO_COMMON_MAGIC = frozenset({"inventory"})
# Raw payload after each entry: kind -> size of the payload that follows `msg` (as CRIU writes it).
PAYLOAD_SIZE = {
    "pipes_data": lambda m: m.bytes,
    "fifo_data": lambda m: m.bytes,
    "sk_queues": lambda m: m.length,
    "tcp_stream": lambda m: m.inq_len + m.outq_len,
    "bpfmap_data": lambda m: m.keys_bytes + m.values_bytes,
    "ipcns_shm": lambda m: (m.size + 3) & ~3,
    "ipcns_sem": lambda m: (m.nsems * 2 + 7) & ~7,
}


def _ipc_msg_payload(msg, data, off):
    """ipcns-msg: qnum messages follow the queue entry, each a framed ipc_msg (mtype, msize) and
    its text padded to 8 bytes."""
    cls = getattr(pb_module("ipc_msg_pb2"), "ipc_msg")
    start = off
    for _ in range(msg.qnum):
        size, = _U32.unpack_from(data, off)
        m = cls()
        m.ParseFromString(bytes(data[off + 4:off + 4 + size]))
        off += 4 + size + ((m.msize + 7) & ~7)
    return off - start


# Payloads whose size needs a look at the bytes: kind -> f(msg, data, offset) -> size.
PAYLOAD_SCAN = {
    "ipcns_msg": _ipc_msg_payload,
    "ghost_file": lambda msg, data, off: len(data) - off,   # the file's contents, to the end
}
_BY_MAGIC = {v[0]: k for k, v in MAGICS.items()}

# File name (without directory) -> kind, after upstream's image-desc.c names. A name is
# looked up by its shape, every run of digits after a dash made N ("core-123.img" ->
# "core-N.img"): one dict lookup instead of ~90 regular expressions compiled at start-up.
_NAME_SHAPES = {
    "inventory.img": "inventory", "pstree.img": "pstree", "core-N.img": "core",
    "ids-N.img": "ids", "mm-N.img": "mm", "pagemap-N.img": "pagemap",
    "pagemap-shmem-N.img": "pagemap", "pages-N.img": RAW, "pages-shmem-N.img": RAW,
    "fdinfo-N.img": "fdinfo", "files.img": "files", "fs-N.img": "fs", "vmas-N.img": "vmas",
    "creds-N.img": "creds", "sigacts-N.img": "sigact", "itimers-N.img": "itimers",
    "posix-timers-N.img": "posix_timers", "rlimit-N.img": "rlimit",
    "signal-s-N.img": "signal", "signal-p-N.img": "signal", "utsns-N.img": "utsns",
    "ipcns-var-N.img": "ipc_var", "ipcns-shm-N.img": "ipcns_shm",
    "ipcns-msg-N.img": "ipcns_msg", "ipcns-sem-N.img": "ipcns_sem", "netns-N.img": "netns",
    "userns-N.img": "userns", "timens-N.img": "timens", "pidns-N.img": "pidns",
    "mountpoints-N.img": "mnts", "netdev-N.img": "netdev",
    "ifaddr-N.img": RAW, "route-N.img": RAW, "route6-N.img": RAW, "rule-N.img": RAW,
    "iptables-N.img": RAW, "ip6tables-N.img": RAW, "nftables-N.img": RAW,
    "netns-ct-N.img": RAW, "netns-exp-N.img": RAW,
    "tmpfs-N.tar.gz.img": RAW, "tmpfs-dev-N.tar.gz.img": RAW,
    "reg-files.img": "reg_files", "ext-files.img": "ext_files", "ns-files.img": "ns_files",
    "eventfd.img": "eventfd_file", "eventpoll.img": "eventpoll_file",
    "eventpoll-tfd.img": "eventpoll_tfd", "signalfd.img": "signalfd",
    "inotify.img": "inotify_file", "inotify-wd.img": "inotify_wd",
    "fanotify.img": "fanotify_file", "fanotify-mark.img": "fanotify_mark",
    "unixsk.img": "unixsk", "inetsk.img": "inetsk", "packetsk.img": "packetsk",
    "netlinksk.img": "netlink_sk", "sk-queues.img": "sk_queues",
    "pipes.img": "pipes", "pipes-data.img": "pipes_data",
    "fifo.img": "fifo", "fifo-data.img": "fifo_data",
    "tty.img": "tty_files", "tty-info.img": "tty_info", "tty-data.img": "tty_data",
    "tunfile.img": "tunfile", "cgroup.img": "cgroup", "timerfd.img": "timerfd",
    "cpuinfo.img": "cpuinfo", "seccomp.img": "seccomp",
    "binfmt-misc.img": "binfmt_misc", "binfmt-misc-N.img": "binfmt_misc",
    "autofs-N.img": "autofs", "memfd.img": "memfd_inode", "bpfmap-file.img": "bpfmap_file",
    "bpfmap-data.img": "bpfmap_data", "apparmor.img": "apparmor",
    "filelocks.img": "file_locks", "remap-fpath.img": "remap_fpath",
    "stats-dump": "stats", "stats-restore": "stats", "irmap-cache.img": "irmap_cache",
    "criu-py-checksums.img": "checksums", "criu-py-checksums-ps.img": "checksums",
    "criu-py-file-ids.img": "file_ids",
}
# Names with a hexadecimal id: prefix -> kind ("ghost-file-1a2b.img").
_HEX_NAMES = {"ghost-file-": "ghost_file", "tcp-stream-": "tcp_stream"}
_DIGIT_RUNS = re.compile(r"(?<=-)[0-9]+")
_HEX_DIGITS = frozenset("0123456789abcdef")

_U32 = struct.Struct("<I")
_U32x2 = struct.Struct("<II")


# remembered: a dump names each file when it writes it, and again when it seals it
@functools.lru_cache(maxsize=1 << 16)
def kind_of(name: str) -> str | None:
    """The image kind a file name stands for (RAW for raw images), None when unknown."""
    base = os.path.basename(name)
    for prefix, kind in _HEX_NAMES.items():
        ident = base[len(prefix):-4]
        if base.startswith(prefix) and base.endswith(".img") and ident \
                and set(ident) <= _HEX_DIGITS:
            return kind
    return _NAME_SHAPES.get(_DIGIT_RUNS.sub("N", base))


def kind_by_magic(magic: int) -> str | None:
    return _BY_MAGIC.get(magic)


def pb_module(module: str):
    """criu_py.images.pb.<module>, imported on first use."""
    return importlib.import_module("criu_py.images.pb." + module)


def message_class(kind: str, head: bool = False):
    """The protobuf class of `kind`'s entries (of its first entry with head=True, pagemap)."""
    if head and kind in HEADS:
        mod, name = HEADS[kind]
    else:
        try:
            _, mod, name = MAGICS[kind]
        except KeyError:
            raise ImageError(f"unknown image kind {kind!r}") from None
    return getattr(pb_module(mod), name)


def entry_class(kind: str, index: int):
    """The class of entry number `index` of a `kind` image."""
    return message_class(kind, head=(index == 0))


def header(kind: str) -> bytes:
    magic = MAGICS[kind][0]
    if kind in NO_COMMON_MAGIC:
        return _U32.pack(magic)
    return _U32x2.pack(SERVICE_MAGIC if kind in SERVICE_KINDS else COMMON_MAGIC, magic)


def _resolve(name_or_kind: str) -> tuple[str | None, str]:
    """(kind or None, label for messages) of a file name or a kind."""
    if name_or_kind in MAGICS or name_or_kind == RAW:
        return name_or_kind, name_or_kind
    return kind_of(name_or_kind), os.path.basename(name_or_kind)


def _parse_header(data, label: str, expect: str | None) -> tuple[str, int]:
    """Check the magic words; return (kind, offset of the first entry)."""
    if len(data) < 4:
        raise ImageError(f"{label}: {'empty file' if not data else 'short read of the magic'}"
                         f" (no image header)")
    first, = _U32.unpack_from(data, 0)
    if first in (COMMON_MAGIC, SERVICE_MAGIC):
        if len(data) < 8:
            raise ImageError(f"{label}: short read of the magic ({len(data)} bytes)")
        magic, = _U32.unpack_from(data, 4)
        off = 8
    else:
        magic, off = first, 4
    kind = kind_by_magic(magic)
    if expect is not None and expect != RAW:
        want = MAGICS[expect][0]
        if kind != expect:
            raise ImageError(f"{label}: bad magic {magic:#010x} (expected {expect} {want:#010x})")
    elif kind is None:
        raise ImageError(f"{label}: unknown magic {magic:#010x}")
    want_first = (None if kind in NO_COMMON_MAGIC else
                  SERVICE_MAGIC if kind in SERVICE_KINDS else COMMON_MAGIC)
    if (off == 4 and want_first is not None) or (off == 8 and first != want_first):
        got = f"{first:#010x}" if off == 8 else "none"
        exp = f"{want_first:#010x}" if want_first is not None else "none"
        raise ImageError(f"{label}: bad first magic {got} for a {kind} image (expected {exp})")
    return kind, off


def iter_frames(data, label: str, off: int, kind: str, payload_size=None, scan=None):
    """Yield (index, message, payload or None) for each framed entry from `off`. The payload
    after an entry is payload_size(msg) bytes, or scan(msg, data, offset) bytes."""
    n = len(data)
    mv = memoryview(data)
    i = 0
    head_cls = message_class(kind, head=True) if kind in HEADS else None
    cls = message_class(kind)
    while off < n:
        if off + 4 > n:
            raise ImageError(f"{label}: truncated entry {i} (short read of its size,"
                             f" {n - off} of 4 bytes)")
        size, = _U32.unpack_from(data, off)
        off += 4
        if off + size > n:
            raise ImageError(f"{label}: truncated entry {i} (size {size}, only {n - off} bytes left)")
        msg = (head_cls if (i == 0 and head_cls is not None) else cls)()
        try:
            msg.ParseFromString(mv[off:off + size])
        except Exception as exc:  # google.protobuf.message.DecodeError and friends
            raise ImageError(f"{label}: entry {i} does not decode as {msg.DESCRIPTOR.name}"
                             f" ({exc})") from None
        off += size
        payload = None
        if payload_size is not None or scan is not None:
            try:
                psize = int(payload_size(msg) if scan is None else scan(msg, data, off))
            except Exception as exc:
                raise ImageError(f"{label}: entry {i}: cannot size its payload ({exc})") from None
            if psize < 0 or off + psize > n:
                raise ImageError(f"{label}: truncated payload of entry {i} ({psize} bytes,"
                                 f" only {n - off} left)")
            payload = bytes(mv[off:off + psize])
            off += psize
        yield i, msg, payload
        i += 1


def decode_bytes(name_or_kind: str, data, payload_size=None, label: str | None = None) -> tuple[str, list]:
    """Decode a whole image. Returns (kind, entries); entries are messages, or (message, payload)
    pairs for kinds that carry payload (PAYLOAD_SIZE, PAYLOAD_SCAN, or a payload_size(msg) given).
    A name of an unknown pattern is decoded by the magic it holds. Errors name `label` (default:
    the file name)."""
    kind, default_label = _resolve(name_or_kind)
    label = label or default_label
    if kind == RAW:
        raise ImageError(f"{label}: raw image, it holds no entries")
    kind, off = _parse_header(data, label, kind)
    psize = payload_size or PAYLOAD_SIZE.get(kind)
    scan = None if payload_size else PAYLOAD_SCAN.get(kind)
    if psize is None and scan is None:
        return kind, [m for _, m, _ in iter_frames(data, label, off, kind)]
    return kind, [(m, p) for _, m, p in iter_frames(data, label, off, kind, psize, scan)]


def _serialize(msg, label: str, i: int) -> bytes:
    try:
        return msg.SerializeToString()
    except Exception as exc:  # missing required fields
        why = str(exc)
        why = why if len(why) <= 160 else why[:157] + "..."
        raise ImageError(f"{label}: entry {i} cannot be encoded ({why})") from None


def encode_file(kind: str, entries, label: str | None = None) -> bytes:
    """The bytes of a `kind` image holding `entries` (messages, or (message, payload) pairs).
    Errors name `label` (default: the kind)."""
    label = label or kind
    if kind not in MAGICS:
        raise ImageError(f"{label}: unknown image kind {kind!r}")
    parts = [header(kind)]
    for i, e in enumerate(entries):
        msg, payload = e if isinstance(e, tuple) else (e, None)
        body = _serialize(msg, label, i)
        parts.append(_U32.pack(len(body)))
        parts.append(body)
        if payload:
            parts.append(payload)
    return b"".join(parts)


def set_str(msg, field: str, value) -> None:
    """Set a string field to a kernel name or path (str, possibly with surrogate escapes
    from os.fsdecode, or bytes) that need not be UTF-8: protobuf refuses such a value,
    but a string field carries any bytes on the wire (CRIU's C writes them that way), so
    it is merged in as raw wire bytes."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    try:
        setattr(msg, field, raw.decode("utf-8"))
    except UnicodeDecodeError:
        number = msg.DESCRIPTOR.fields_by_name[field].number
        msg.ClearField(field)
        msg.MergeFromString(string_field_wire(number, raw))


def get_str(value) -> str:
    """A string field's value as a str: protobuf gives bytes for one that is not UTF-8;
    decoded losslessly (os.fsdecode), so it opens the same file."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def string_field_wire(number: int, raw: bytes) -> bytes:
    """Field `number` holding the bytes `raw` as protobuf writes a string on the wire."""
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pagemap_nr_pages(pe) -> int:
    """Pages of a pagemap_entry: field 5 (4.x) when set, else the 3.x field 2."""
    return pe.nr_pages if pe.HasField("nr_pages") else pe.compat_nr_pages


def set_pagemap_nr_pages(pe, n: int) -> None:
    """Set both count fields, so CRIU 4.x (field 5) and 3.x readers (field 2) agree."""
    pe.nr_pages = n
    pe.compat_nr_pages = n if n < (1 << 32) else 0


def make_private_dir(path: str) -> bool:
    """Create the directory `path` with mode 0700 (whatever the umask) when it is missing,
    its parents as os.makedirs would. An existing directory is never changed. Returns
    whether it was created. Raises OSError."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    # ours: make the mode exact (mkdir's is 0700 minus the umask)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return True


def warn_if_readable(path: str, what: str) -> None:
    """-v2 warning when others (group or world) may read an existing directory that is
    about to hold process memory or logs; its mode is left as the user made it."""
    import stat
    from criu_py.log import log
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s %s is readable by others (mode %04o); its files are 0600", what, path, mode)


def block_crcs(data):
    """The CRC-32C of each 4 KiB block of data (bytes or a buffer; the last block may be
    short), as a cffi uint32_t array (at least one entry): what the checksums of
    images/integrity.py are made of."""
    from criu_py.native import ffi, lib
    size = len(data)
    crcs = ffi.new("uint32_t[]", max(-(-size // 4096), 1))
    if size:
        ptr = ffi.from_buffer(data)
        try:
            lib.cp_crc_blocks(ptr, size, crcs)
        finally:
            ffi.release(ptr)
    return crcs


class ImageDir:
    """A checkpoint directory. Paths are resolved against a directory fd held open.
    create=True makes a missing directory 0700; an existing one keeps its mode.
    crc_on_write=True (a dump's dir, which it seals): write_bytes() notes the block CRCs
    of what it writes, so that the seal need not read those files back. background=True
    (a dump's dir): write_bytes() hands the file to a writer thread (_Writer) and returns;
    whatever reads or lists the dir, or opens a file in it, waits for the writes first,
    and so does finish_writes(), which raises the first failure."""

    def __init__(self, path: str, create: bool = False, crc_on_write: bool = False,
                 background: bool = False):
        self.dirpath = os.fspath(path)
        self.background = background
        self._writer = None
        # name -> (size, CRC-32C of each 4 KiB block) of files whose writer computed
        # them while writing (big pages files, and with crc_on_write every file
        # write_bytes wrote): the seal then needs not read them back
        self.block_crcs = {}
        self.crc_on_write = crc_on_write
        # name -> the entries a writer encoded into it (note_written), while unchanged
        self.written_entries = {}
        # name -> bytes the restore's integrity check read and checked (CheckedBytes):
        # read_bytes hands each out once instead of reading the file again
        self.checked = {}
        if create:
            try:
                created = make_private_dir(self.dirpath)
            except OSError as exc:
                raise ImageError(f"{self.dirpath}: cannot create the images dir ({exc.strerror})") from None
            if not created:
                warn_if_readable(self.dirpath, "images dir")
        try:
            self.dirfd = os.open(self.dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"{self.dirpath}: cannot open the images dir ({exc.strerror})") from None

    def close(self):
        if self._writer is not None:
            self._writer.close()        # what is queued is written; a failure was raised
            self._writer = None         # by finish_writes() or a read, or goes unseen
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"ImageDir({self.dirpath!r})"

    # --- names ---
    def path(self, name: str) -> str:
        return os.path.join(self.dirpath, name)

    def flush(self) -> None:
        """Wait for the files handed to the writer thread; ImageError if one failed."""
        if self._writer is not None:
            self._writer.wait()

    def writing(self) -> bool:
        """Whether the writer thread has files left to write."""
        return self._writer is not None and self._writer.active()

    def finish_writes(self) -> None:
        """flush(), and write synchronously from now on."""
        self.background = False
        if self._writer is not None:
            try:
                self._writer.wait()
            finally:
                self._writer.close()
                self._writer = None

    def exists(self, name: str) -> bool:
        self.flush()
        if name in self.checked:
            return True
        try:
            os.stat(name, dir_fd=self.dirfd)
            return True
        except FileNotFoundError:
            return False

    def list(self) -> list[str]:
        self.flush()
        return sorted(os.listdir(self.dirfd))

    # --- raw ---
    def open_raw(self, name: str, write: bool = False) -> int:
        """An fd on a raw image: read-only, or write (created/truncated, 0600; never
        through a symlink someone left under that name)."""
        flags = os.O_CLOEXEC | ((os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
                                if write else os.O_RDONLY)
        self.flush()
        try:
            fd = os.open(name, flags, 0o600, dir_fd=self.dirfd)
        except OSError as exc:
            raise ImageError(f"{name}: cannot open ({exc.strerror})") from None
        if write:
            self.block_crcs.pop(name, None)      # whatever is written now, not what was
            self.written_entries.pop(name, None)
            os.fchmod(fd, 0o600)
        return fd

    def read_bytes(self, name: str) -> bytes:
        self.flush()
        data = self.checked.pop(name, None)
        if data is not None:
            return data
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.dirfd)
        except FileNotFoundError:
            raise ImageError(f"{name}: missing (no such file in {self.dirpath})") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot open ({exc.strerror})") from None
        try:
            with open(fd, "rb", closefd=True) as f:
                return f.read()
        except OSError as exc:
            raise ImageError(f"{name}: read failed ({exc.strerror})") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.background:
            if self._writer is None:
                self._writer = _Writer(self)
            self.block_crcs.pop(name, None)
            self.written_entries.pop(name, None)
            self._writer.put(name, data if isinstance(data, bytes) else bytes(data))
            return
        fd = self.open_raw(name, write=True)
        try:
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:] if done else data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ImageError(f"{name}: write failed ({exc.strerror})") from None
        self.note_written(name, data)

    def note_written(self, name: str, data, entries=None) -> None:
        """`name` now holds exactly `data` (bytes or a buffer), written through an fd of
        open_raw(write=True) or by write_bytes: with crc_on_write, its block CRCs for
        the seal, and the `entries` encoded in it (the seal reads pagemaps)."""
        if not self.crc_on_write:
            return
        if entries is not None:
            self.written_entries[name] = entries
        else:
            self.written_entries.pop(name, None)
        self.block_crcs[name] = (len(data), block_crcs(data))

    # --- entries ---
    def _kind(self, name: str) -> str:
        kind = kind_of(name)
        if kind is None:
            raise ImageError(f"{name}: not a CRIU image name")
        if kind == RAW:
            raise ImageError(f"{name}: raw image, it holds no entries")
        return kind

    def write_entries(self, name: str, entries) -> None:
        self.write_bytes(name, encode_file(self._kind(name), entries, label=name))

    def write_entries_with_payload(self, name: str, pairs) -> None:
        self.write_bytes(name, encode_file(self._kind(name), [(m, p) for m, p in pairs], label=name))

    def read_entries(self, name: str) -> list:
        kind = self._kind(name)
        data = self.read_bytes(name)
        kind, off = _parse_header(data, name, kind)
        return [m for _, m, _ in iter_frames(data, name, off, kind, PAYLOAD_SIZE.get(kind),
                                             PAYLOAD_SCAN.get(kind))]

    def read_entries_with_payload(self, name: str, payload_size=lambda msg: msg.bytes) -> list:
        kind = self._kind(name)
        data = self.read_bytes(name)
        kind, off = _parse_header(data, name, kind)
        return [(m, p) for _, m, p in iter_frames(data, name, off, kind, payload_size)]

    def read_one(self, name: str):
        entries = self.read_entries(name)
        if len(entries) != 1:
            raise ImageError(f"{name}: expected exactly one entry, found {len(entries)}")
        return entries[0]


class _Writer:
    """The writer thread of an ImageDir(background=True): it takes whatever files are
    queued and writes them in one cp_write_files() call, which runs without the GIL, so
    creating them (most of their cost) overlaps the dump's Python. After the first
    failure nothing more is written, and wait() raises it."""

    def __init__(self, images: ImageDir):
        import threading
        self.images = images
        self.cond = threading.Condition()
        self.queue = []                 # (name, bytes) in the order written
        self.busy = False
        self.stopping = False
        self.error = None               # ImageError of the first failure
        self.thread = threading.Thread(target=self._run, name="image-writer", daemon=True)
        self.thread.start()

    def put(self, name: str, data: bytes) -> None:
        with self.cond:
            if self.error is not None:
                raise self.error
            self.queue.append((name, data))
            self.cond.notify()

    def active(self) -> bool:
        return bool(self.queue) or self.busy

    def wait(self) -> None:
        with self.cond:
            while self.queue or self.busy:
                self.cond.wait()
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                batch, self.queue = self.queue, []
                self.busy = True
            error = ImageError(f"{batch[0][0]}: write failed (image writer)")
            try:
                done, error = self._write(batch)
                for name, data in batch[:done]:
                    self.images.note_written(name, data)
            finally:
                with self.cond:
                    if error is not None:
                        self.error = self.error or error
                        self.queue = []
                    self.busy = False
                    self.cond.notify_all()

    def _write(self, batch) -> tuple:
        """(how many of batch were written, ImageError or None)."""
        try:
            from criu_py.native import ffi, lib
            names = [ffi.new("char[]", os.fsencode(name)) for name, _ in batch]
            bufs = [ffi.from_buffer(data) for _, data in batch]
            failed = ffi.new("long *")
            r = lib.cp_write_files(self.images.dirfd, len(batch), ffi.new("char *[]", names),
                                   ffi.new("char *[]", bufs),
                                   ffi.new("uint64_t[]", [len(data) for _, data in batch]),
                                   failed)
        except Exception as exc:        # noqa: BLE001 - reported by wait()
            return 0, ImageError(f"{batch[0][0]}: write failed ({exc})")
        if r < 0:
            return failed[0], ImageError(f"{batch[failed[0]][0]}: write failed "
                                         f"({os.strerror(-r)})")
        return len(batch), None
