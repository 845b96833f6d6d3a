# Image <-> JSON in the shape upstream crit prints: {"magic": "CORE", "entries": [...]}, fields by
# their proto names in field-number order, enums by name, bytes in base64 (MIME lines, as crit), raw
# payload after an entry under "extra". With pretty=True the (criu) field options of opts.proto
# choose the rendering: hex strings, flag names, "major:minor" devices, dictionary names, IP
# addresses. encode accepts both forms back.
import base64
import ipaddress
import os
import quopri
import socket
import struct

from google.protobuf.descriptor import FieldDescriptor as FD

import criu_py.images as img
from criu_py.errors import ImageError

_INT_TYPES = frozenset({FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64,
                        FD.TYPE_SINT32, FD.TYPE_SINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64,
                        FD.TYPE_SFIXED32, FD.TYPE_SFIXED64})
UNKNOWN_KEY = "_unknown"   # fields this schema does not know, base64 of their wire bytes

# Flag names of the (criu).flags maps, as crit renders them.
FLAG_MAPS = {
    "mmap.prot": [("PROT_READ", 0x1), ("PROT_WRITE", 0x2), ("PROT_EXEC", 0x4)],
    "mmap.flags": [("MAP_SHARED", 0x1), ("MAP_PRIVATE", 0x2), ("MAP_ANON", 0x20),
                   ("MAP_GROWSDOWN", 0x100)],
    "mmap.status": [("VMA_AREA_NONE", 0), ("VMA_AREA_REGULAR", 1 << 0), ("VMA_AREA_STACK", 1 << 1),
                    ("VMA_AREA_VSYSCALL", 1 << 2), ("VMA_AREA_VDSO", 1 << 3),
                    ("VMA_AREA_HEAP", 1 << 5), ("VMA_FILE_PRIVATE", 1 << 6),
                    ("VMA_FILE_SHARED", 1 << 7), ("VMA_ANON_SHARED", 1 << 8),
                    ("VMA_ANON_PRIVATE", 1 << 9), ("VMA_AREA_SYSVIPC", 1 << 10),
                    ("VMA_AREA_SOCKET", 1 << 11), ("VMA_AREA_VVAR", 1 << 12),
                    ("VMA_AREA_AIORING", 1 << 13), ("VMA_UNSUPP", 1 << 31)],
    "rfile.flags": [("O_WRONLY", 0o1), ("O_RDWR", 0o2), ("O_CREAT", 0o100), ("O_EXCL", 0o200),
                    ("O_NOCTTY", 0o400), ("O_TRUNC", 0o1000), ("O_APPEND", 0o2000),
                    ("O_NONBLOCK", 0o4000), ("O_DSYNC", 0o10000), ("FASYNC", 0o20000),
                    ("O_DIRECT", 0o40000), ("O_LARGEFILE", 0o100000), ("O_DIRECTORY", 0o200000),
                    ("O_NOFOLLOW", 0o400000), ("O_NOATIME", 0o1000000), ("O_CLOEXEC", 0o2000000)],
    "pmap.flags": [("PE_PARENT", 1 << 0), ("PE_LAZY", 1 << 1), ("PE_PRESENT", 1 << 2)],
    "seals.flags": [("F_SEAL_SEAL", 0x1), ("F_SEAL_SHRINK", 0x2), ("F_SEAL_GROW", 0x4),
                    ("F_SEAL_WRITE", 0x8), ("F_SEAL_FUTURE_WRITE", 0x10)],
}
# (criu).dict maps: dictionary -> field name -> {value: name}.
DICT_MAPS = {
    "gen": {"task_state": {1: "Alive", 3: "Zombie", 6: "Stopped"}},
    "sk": {
        "family": {1: "UNIX", 2: "INET", 10: "INET6", 16: "NETLINK", 17: "PACKET"},
        "type": {1: "STREAM", 2: "DGRAM", 3: "RAW", 5: "SEQPACKET", 10: "PACKET"},
        "state": {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
                  6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN"},
        "proto": {0: "IP", 6: "TCP", 17: "UDP", 136: "UDPLITE"},
    },
}
_MINORBITS = 20  # the kernel's dev_t layout in images (new encoding)

_opts_cache: dict = {}


def _opts(field):
    """The (criu) options of a field as a small tuple, cached per descriptor."""
    key = field.full_name
    got = _opts_cache.get(key)
    if got is None:
        ext = img.pb_module("opts_pb2").criu
        o = field.GetOptions().Extensions[ext]
        got = (o.hex, o.ipadd, o.flags, o.dev, o.odev, o.dict, o.conv)
        _opts_cache[key] = got
    return got


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii")


def unb64(text) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, got {type(text).__name__}")
    return base64.decodebytes(text.encode("ascii"))


def _flags_str(value: int, fmap) -> str:
    names = [n for n, bit in fmap if value & bit]
    rest = value & ~sum(bit for _, bit in fmap)
    if rest:
        names.append(f"{rest:#x}")
    return " | ".join(names)


def _flags_val(text: str, fmap) -> int:
    if text.strip() == "":
        return 0
    byname = dict(fmap)
    total = 0
    for part in text.split("|"):
        part = part.strip()
        total |= byname[part] if part in byname else int(part, 0)
    return total


def _dev_str(value: int, old: bool) -> str:
    if old:
        return f"{os.major(value)}:{os.minor(value)}"
    return f"{value >> _MINORBITS}:{value & ((1 << _MINORBITS) - 1)}"


def _dev_val(text: str, old: bool) -> int:
    major, minor = (int(x) for x in text.split(":"))
    return os.makedev(major, minor) if old else (major << _MINORBITS) | minor


def _ip_str(words) -> str:
    if len(words) == 1:
        return ipaddress.IPv4Address(socket.ntohl(words[0])).compressed
    v = 0
    for w in words[:4]:
        v = (v << 32) | socket.ntohl(w)
    return ipaddress.IPv6Address(v).compressed


def _ip_words(text: str) -> list[int]:
    a = ipaddress.ip_address(text)
    if a.version == 4:
        return [socket.htonl(int(a))]
    v = int(a)
    return [socket.htonl((v >> (32 * k)) & 0xFFFFFFFF) for k in (3, 2, 1, 0)]


def _unknown_bytes(msg) -> bytes:
    """Wire bytes of the fields of `msg` (this level only) that the schema does not know."""
    bare = type(msg)()
    bare.CopyFrom(msg)
    for fd, _ in bare.ListFields():
        bare.ClearField(fd.name)
    return bare.SerializePartialToString()


def _scalar_to_json(field, value, pretty: bool, is_hex: bool):
    t = field.type
    if t == FD.TYPE_BYTES:
        return quopri.encodestring(value).decode("latin-1") if _opts(field)[6] == "unix_name" \
            else b64(value)
    if t == FD.TYPE_ENUM:
        ev = field.enum_type.values_by_number.get(value)
        return ev.name if ev is not None else value
    if t in _INT_TYPES and pretty:
        hx, _, flags, dev, odev, dct, _ = _opts(field)
        if is_hex or hx:
            return f"{value:#x}" if value >= 0 else f"-{-value:#x}"
        if dev:
            return _dev_str(value, odev)
        if flags:
            fmap = FLAG_MAPS.get(flags)
            return _flags_str(value, fmap) if fmap is not None else f"{value:#x}"
        if dct:
            return DICT_MAPS.get(dct, {}).get(field.name, {}).get(value, value)
    if t == FD.TYPE_STRING and isinstance(value, bytes):
        # a proto2 string holding bytes that are not UTF-8 (a Linux path): lossless in JSON
        # as a str with lone surrogates (json writes them "\udcXX"); encode restores them
        return value.decode("utf-8", "surrogateescape")
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE, FD.TYPE_BOOL, FD.TYPE_STRING) or t in _INT_TYPES:
        return value
    raise ImageError(f"field {field.full_name}: unsupported type {t}")


def _raw_string_field(field, value: str) -> bytes | None:
    """Wire bytes of a string field whose JSON text carries non-UTF-8 bytes (surrogate
    escapes): the protobuf setter refuses them, parsing a proto2 string accepts them.
    None when the text is plain Unicode."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
    from criu_py.images import string_field_wire
    return string_field_wire(field.number, raw)


def msg_to_dict(msg, pretty: bool = False, is_hex: bool = False) -> dict:
    out = {}
    for field, value in msg.ListFields():
        hx = is_hex or (pretty and _opts(field)[0])
        if field.is_repeated:
            if pretty and _opts(field)[1] and field.type in _INT_TYPES and len(value):
                out[field.name] = [_ip_str(list(value))]
            elif field.type == FD.TYPE_MESSAGE:
                out[field.name] = [msg_to_dict(v, pretty, hx) for v in value]
            else:
                out[field.name] = [_scalar_to_json(field, v, pretty, hx) for v in value]
        elif field.type == FD.TYPE_MESSAGE:
            out[field.name] = msg_to_dict(value, pretty, hx)
        else:
            out[field.name] = _scalar_to_json(field, value, pretty, hx)
    raw = _unknown_bytes(msg) if _has_unknown(msg) else b""
    if raw:
        out[UNKNOWN_KEY] = b64(raw)
    return out


def _has_unknown(msg) -> bool:
    from google.protobuf import unknown_fields
    return len(unknown_fields.UnknownFieldSet(msg)) > 0


def _scalar_from_json(field, value, where: str):
    t = field.type
    if t == FD.TYPE_BYTES:
        if _opts(field)[6] == "unix_name":
            return quopri.decodestring(value.encode("latin-1"))
        return unb64(value)
    if t == FD.TYPE_ENUM:
        if isinstance(value, str):
            ev = field.enum_type.values_by_name.get(value)
            if ev is None:
                raise ValueError(f"{where}: {value!r} is not a value of {field.enum_type.name}")
            return ev.number
        return int(value)
    if t in _INT_TYPES:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, str):
            _, _, flags, dev, odev, dct, _ = _opts(field)
            if dev and ":" in value:
                return _dev_val(value, odev)
            if flags and flags in FLAG_MAPS:
                return _flags_val(value, FLAG_MAPS[flags])
            if dct:
                rev = {v: k for k, v in DICT_MAPS.get(dct, {}).get(field.name, {}).items()}
                if value in rev:
                    return rev[value]
            return int(value, 0)
        if isinstance(value, float) and value != int(value):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if t == FD.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if t == FD.TYPE_STRING:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return float(value)
    raise ValueError(f"{where}: unsupported type {t}")


def dict_to_msg(d, msg, where: str = ""):
    """Fill `msg` from a crit-style dict (plain or pretty). ValueError names the bad spot."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or msg.DESCRIPTOR.name}: expected an object, got {type(d).__name__}")
    fields = msg.DESCRIPTOR.fields_by_name
    for key, value in d.items():
        here = f"{where}.{key}" if where else key
        if key == UNKNOWN_KEY:
            msg.MergeFromString(unb64(value))
            continue
        field = fields.get(key)
        if field is None:
            raise ValueError(f"{here}: no such field in {msg.DESCRIPTOR.name}")
        try:
            if field.is_repeated:
                if not isinstance(value, list):
                    raise ValueError(f"{here}: expected a list")
                target = getattr(msg, key)
                if field.type == FD.TYPE_MESSAGE:
                    for i, v in enumerate(value):
                        dict_to_msg(v, target.add(), f"{here}[{i}]")
                elif _opts(field)[1] and value and isinstance(value[0], str) and field.type in _INT_TYPES:
                    target.extend(_ip_words(value[0]))
                elif field.type == FD.TYPE_STRING:
                    for i, v in enumerate(value):
                        v = _scalar_from_json(field, v, f"{here}[{i}]")
                        raw = _raw_string_field(field, v)
                        if raw is None:
                            target.append(v)
                        else:
                            msg.MergeFromString(raw)
                else:
                    target.extend(_scalar_from_json(field, v, f"{here}[{i}]") for i, v in enumerate(value))
            elif field.type == FD.TYPE_MESSAGE:
                sub = getattr(msg, key)
                sub.SetInParent()
                dict_to_msg(value, sub, here)
            else:
                v = _scalar_from_json(field, value, here)
                raw = _raw_string_field(field, v) if field.type == FD.TYPE_STRING else None
                if raw is None:
                    setattr(msg, key, v)
                else:
                    msg.ClearField(key)
                    msg.MergeFromString(raw)
        except (TypeError, ValueError, OverflowError, KeyError, AttributeError,
                UnicodeError) as exc:
            text = str(exc)
            raise ValueError(text if text.startswith(here) else f"{here}: {text}") from None
    return msg


# --- payload ("extra") after entries, per kind, as crit shows it ---

def _extra_to_json(kind: str, msg, payload: bytes):
    if kind == "tcp_stream":
        return {"inq": b64(payload[:msg.inq_len]), "outq": b64(payload[msg.inq_len:])}
    if kind == "ipcns_shm":
        return b64(payload[:msg.size])
    if kind == "ipcns_sem":
        return list(struct.unpack_from(f"<{msg.nsems}H", payload))
    if kind == "ipcns_msg":
        out, off = [], 0
        cls = img.pb_module("ipc_msg_pb2").ipc_msg
        for _ in range(msg.qnum):
            size, = struct.unpack_from("<I", payload, off)
            m = cls()
            m.ParseFromString(payload[off + 4:off + 4 + size])
            off += 4 + size
            out.append(msg_to_dict(m))
            out.append(b64(payload[off:off + m.msize]))
            off += (m.msize + 7) & ~7
        return out
    return b64(payload)


def _extra_from_json(kind: str, msg, extra) -> bytes:
    if kind == "tcp_stream":
        return unb64(extra["inq"]) + unb64(extra["outq"])
    if kind == "ipcns_shm":
        data = unb64(extra)[:msg.size]
        return data + b"\0" * (((msg.size + 3) & ~3) - len(data))
    if kind == "ipcns_sem":
        if len(extra) != msg.nsems:
            raise ValueError(f"{len(extra)} semaphore values for nsems {msg.nsems}")
        raw = struct.pack(f"<{msg.nsems}H", *extra)
        return raw + b"\0" * (((len(raw) + 7) & ~7) - len(raw))
    if kind == "ipcns_msg":
        parts = []
        cls = img.pb_module("ipc_msg_pb2").ipc_msg
        for i in range(0, len(extra), 2):
            m = dict_to_msg(extra[i], cls())
            body = m.SerializeToString()
            data = unb64(extra[i + 1])[:m.msize]
            parts += [struct.pack("<I", len(body)), body, data,
                      b"\0" * (((m.msize + 7) & ~7) - len(data))]
        return b"".join(parts)
    return unb64(extra)


def _ghost_to_json(msg, payload: bytes, pretty: bool) -> list:
    head = msg_to_dict(msg, pretty)
    if not msg.chunks:
        head["extra"] = b64(payload)
        return [head]
    out, off = [head], 0
    cls = img.pb_module("ghost_file_pb2").ghost_chunk_entry
    while off < len(payload):
        size, = struct.unpack_from("<I", payload, off)
        c = cls()
        c.ParseFromString(payload[off + 4:off + 4 + size])
        off += 4 + size
        d = msg_to_dict(c, pretty)
        d["extra"] = b64(payload[off:off + c.len])
        off += c.len
        out.append(d)
    return out


def _ghost_from_json(entries: list):
    head = dict(entries[0])
    msg = dict_to_msg({k: v for k, v in head.items() if k != "extra"},
                      img.message_class("ghost_file")(), "entries[0]")
    if not msg.chunks:
        return [(msg, unb64(head.get("extra", "")))]
    cls = img.pb_module("ghost_file_pb2").ghost_chunk_entry
    parts = []
    for i, e in enumerate(entries[1:], 1):
        c = dict_to_msg({k: v for k, v in e.items() if k != "extra"}, cls(), f"entries[{i}]")
        body = c.SerializeToString()
        parts += [struct.pack("<I", len(body)), body, unb64(e.get("extra", ""))]
    return [(msg, b"".join(parts))]


# --- whole images ---

def image_to_json(kind: str, entries, pretty: bool = False) -> dict:
    """decode_bytes() output -> {"magic": NAME, "entries": [...]}."""
    out = []
    if kind == "ghost_file":
        msg, payload = entries[0]
        out = _ghost_to_json(msg, payload, pretty)
    else:
        for e in entries:
            if isinstance(e, tuple):
                msg, payload = e
                d = msg_to_dict(msg, pretty)
                d["extra"] = _extra_to_json(kind, msg, payload)
            else:
                d = msg_to_dict(e, pretty)
            out.append(d)
    return {"magic": kind.upper(), "entries": out}


def json_to_image(doc, label: str) -> bytes:
    """{"magic": NAME, "entries": [...]} -> image bytes. ImageError names `label` and the spot."""
    if not isinstance(doc, dict) or "magic" not in doc or "entries" not in doc:
        raise ImageError(f"{label}: not a crit image document (needs \"magic\" and \"entries\")")
    name = doc["magic"]
    kind = name.lower() if isinstance(name, str) else None
    if kind not in img.MAGICS:
        raise ImageError(f"{label}: unknown magic {name!r}")
    entries = doc["entries"]
    if not isinstance(entries, list):
        raise ImageError(f"{label}: \"entries\" is not a list")
    try:
        if kind == "ghost_file":
            built = _ghost_from_json(entries) if entries else []
        else:
            built = []
            for i, e in enumerate(entries):
                where = f"entries[{i}]"
                if not isinstance(e, dict):
                    raise ValueError(f"{where}: expected an object")
                body = {k: v for k, v in e.items() if k != "extra"}
                msg = dict_to_msg(body, img.entry_class(kind, i)(), where)
                if kind in img.PAYLOAD_SIZE or kind in img.PAYLOAD_SCAN:
                    if "extra" not in e:
                        raise ValueError(f"{where}: missing \"extra\" (the entry's payload)")
                    try:
                        built.append((msg, _extra_from_json(kind, msg, e["extra"])))
                    except (TypeError, ValueError, KeyError, struct.error) as exc:
                        raise ValueError(f"{where}.extra: {exc}") from None
                else:
                    built.append(msg)
    except ValueError as exc:
        raise ImageError(f"{label}: {exc}") from None
    return img.encode_file(kind, built, label=label)
