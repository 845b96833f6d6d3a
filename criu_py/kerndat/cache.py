# The kdat cache file: probed kernel facts kept for the rest of the boot, so criu-py does
# not re-probe on every start. Layout: a 16-byte header (magic, format, payload length,
# crc32 of the payload, little-endian u32s) then one kdat_entry protobuf (proto/kdat.proto).
# The entry records the boot id, kernel release, criu-py version and the probing euid; a
# file of ours that disagrees with the running system on any of them, or is short,
# corrupt, a symlink, or unsafe (not owned by our euid - root for root - or writable by
# group or others) is stale: it is unlinked and replaced. A file criu-py did not write (it
# does not start with our magic: upstream CRIU's raw struct with 0x57023458, or anything
# else a path may name) is never removed nor replaced: the run goes on uncached. The
# default file is /run/criu-py.kdat, beside upstream's /run/criu.kdat, which has another
# format and which upstream deletes as stale when it finds ours there. Saving is atomic
# (unique O_EXCL temporary file + rename) and never leaves the temporary behind. A cached
# load imports neither cffi nor protobuf (the small wire decoder below reads the entry);
# only writing imports the generated kdat_pb2.
import errno
import os
import stat
import struct
import zlib
from collections import namedtuple

from criu_py.kerndat.facts import FACT_KIND, FACT_NAMES, LIST_KINDS, KerndatFacts
from criu_py.log import log

MAGIC = 0x5444_4B43          # "CKDT" read as little-endian bytes
FORMAT = 1                   # bump on any incompatible change of the payload's meaning
HEADER = struct.Struct("<IIII")
UPSTREAM_MAGIC = 0x57023458  # first word of upstream CRIU's kdat file (a raw C struct)
DEFAULT_PATH = "/run/criu-py.kdat"
FILE_NAME = "criu-py.kdat"
ENV_PATH = "CRIU_PY_KDAT"    # overrides the path; "none" turns the cache off
NO_CACHE = "none"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
TMP_SUFFIX = ".tmp"
MAX_SIZE = 1 << 20

CacheKey = namedtuple("CacheKey", "boot_id kernel_release criu_py_version euid")
Location = namedtuple("Location", "path reason")   # path None: no cache, reason says why


def current_key(boot_id_path: str = BOOT_ID_PATH, kernel_release: str | None = None,
                version: str | None = None, euid: int | None = None) -> CacheKey:
    """What a cache must match to be valid now. The arguments exist for tests."""
    with open(boot_id_path) as f:
        boot_id = f.read().strip()
    if version is None:
        from criu_py import __version__
        version = f"{__version__}+{probe_fingerprint()}"
    return CacheKey(boot_id, kernel_release or os.uname().release, version,
                    os.geteuid() if euid is None else euid)


_fingerprint = None


def probe_fingerprint() -> str:
    """crc32 of the probe code: a changed probe (a fix, a new fact) makes every cache it
    wrote stale even when the version number stays the same (upstream uses its build time)."""
    global _fingerprint
    if _fingerprint is None:
        here = os.path.dirname(os.path.abspath(__file__))
        crc = 0
        for name in ("probes.py", "facts.py", "cgroups.py", "procfs.py"):
            with open(os.path.join(here, name), "rb") as f:
                crc = zlib.crc32(f.read(), crc)
        _fingerprint = f"{crc:08x}"
    return _fingerprint


def _dir_writable(directory: str) -> bool:
    return bool(directory) and os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


def resolve_location(explicit: str | None = None, environ=os.environ) -> Location:
    """Where the cache lives: the explicit path (option), else $CRIU_PY_KDAT, else
    /run/criu-py.kdat when /run is writable, else $XDG_RUNTIME_DIR/criu-py.kdat, else
    nowhere."""
    chosen = explicit if explicit is not None else environ.get(ENV_PATH) or None
    if chosen is not None:
        if chosen == NO_CACHE:
            return Location(None, "the kdat cache is turned off")
        path = os.path.abspath(chosen)
        if _dir_writable(os.path.dirname(path)):
            return Location(path, "")
        return Location(None, f"{os.path.dirname(path)} is not writable")
    if _dir_writable(os.path.dirname(DEFAULT_PATH)):
        return Location(DEFAULT_PATH, "")
    runtime_dir = environ.get("XDG_RUNTIME_DIR", "")
    if _dir_writable(runtime_dir):
        return Location(os.path.join(os.path.abspath(runtime_dir), FILE_NAME), "")
    why = f"{runtime_dir} is not writable" if runtime_dir else "XDG_RUNTIME_DIR is unset"
    return Location(None, f"{os.path.dirname(DEFAULT_PATH)} is not writable and {why}")


# ------------------------------------------------------------------ facts <-> protobuf

def _pb():
    from criu_py.images.pb import kdat_pb2
    return kdat_pb2


# The kdat_entry schema (proto/kdat.proto) as the reader needs it: field number -> (name,
# kind). Reading decodes the protobuf wire format here instead of importing protobuf,
# which alone costs more (~20 ms) than probing the kernel; writing uses kdat_pb2, and a
# test checks this table against kdat_pb2's descriptor.
_AREA = {1: ("name", "string"), 2: ("size", "uint"), 3: ("offset", "sint")}
_SYMBOL = {1: ("name", "string"), 2: ("offset", "uint")}
_XFEATURE = {1: ("bit", "uint"), 2: ("size", "uint"), 3: ("offset", "uint")}
_CGROUP = {1: ("controllers", "string"), 2: ("mountpoint", "string")}
_MAP_ENTRY = {1: ("key", "string"), 2: ("value", "string")}
ENTRY_SCHEMA = {
    1: ("boot_id", "string"), 2: ("kernel_release", "string"), 3: ("criu_py_version", "string"),
    4: ("probed_euid", "uint"), 5: ("probed_at", "double"), 6: ("probe_seconds", "double"),
    7: ("probe_errors", _MAP_ENTRY),
    10: ("page_size", "uint"), 11: ("task_size", "uint"), 12: ("mmap_min_addr", "uint"),
    13: ("zero_pfn", "uint"), 14: ("pagemap_pfn", "bool"), 15: ("pagemap_exclusive", "bool"),
    16: ("pagemap_file", "bool"), 17: ("soft_dirty", "bool"), 18: ("pagemap_scan", "bool"),
    19: ("pagemap_scan_categories", "uint"), 20: ("shmem_dev", "uint"),
    21: ("prctl_mm_map", "bool"),
    30: ("dev_userfaultfd", "bool"), 31: ("uffd_syscall", "bool"),
    32: ("unprivileged_uffd", "bool"), 33: ("uffd_features", "uint"),
    34: ("uffd_ioctls", "uint"), 35: ("uffd_missing", "bool"), 36: ("uffd_wp", "bool"),
    37: ("uffd_dirty_tracking", "bool"),
    40: ("pid_max", "uint"), 41: ("last_cap", "uint"), 42: ("clone3_set_tid", "bool"),
    43: ("pidfd_open", "bool"), 44: ("pidfd_getfd", "bool"), 45: ("kcmp", "bool"),
    46: ("nspid", "bool"), 47: ("rseq", "bool"), 48: ("ptrace_rseq_conf", "bool"),
    49: ("ptrace_xstate_size", "uint"), 50: ("time_ns", "bool"), 51: ("memfd", "bool"),
    52: ("memfd_hugetlb", "bool"),
    60: ("vdso_areas", _AREA), 61: ("vdso_symbols", _SYMBOL), 62: ("vdso_sha256", "string"),
    63: ("map_vdso", "bool"),
    70: ("xsave_size", "uint"), 71: ("xsave_max_size", "uint"), 72: ("xfeatures_mask", "uint"),
    73: ("xfeatures_supported", "uint"), 74: ("xsave_instructions", "uint"),
    75: ("xfeatures", _XFEATURE),
    80: ("cgroup_v1", _CGROUP), 81: ("cgroup2_mount", "string"), 82: ("cgroup_mnt_ns", "uint"),
    83: ("cgroup2_controllers", "string"), 84: ("cgroup_controllers", "string"),
}
REQUIRED = ("boot_id", "kernel_release", "criu_py_version", "probed_euid")
_DOUBLE = struct.Struct("<d")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode_message(buf: bytes, schema: dict) -> dict:
    """Protobuf wire format -> {name: value}; repeated sub-messages become lists of dicts.
    Unknown fields are skipped (a newer writer's additions); raises ValueError/IndexError
    on malformed input. Written for speed: this is most of a cached load."""
    out, pos, end = {}, 0, len(buf)
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value = buf[pos]
            if value < 0x80:
                pos += 1
            else:
                value, pos = _varint(buf, pos)
        elif wire == 2:
            size = buf[pos]
            if size < 0x80:
                pos += 1
            else:
                size, pos = _varint(buf, pos)
            value = buf[pos:pos + size]
            pos += size
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end")
        field = schema.get(tag >> 3)
        if field is None:
            continue
        name, kind = field
        if wire != (2 if kind.__class__ is dict else _WIRE[kind]):
            raise ValueError(f"field {name}: wire type {wire}")
        if kind == "uint":
            out[name] = value
        elif kind == "bool":
            out[name] = value != 0
        elif kind == "string":
            out[name] = value.decode()
        elif kind.__class__ is dict:
            sub = out.get(name)
            if sub is None:
                sub = out[name] = []
            sub.append(decode_message(value, kind))
        elif kind == "sint":
            out[name] = (value >> 1) ^ -(value & 1)
        else:
            out[name] = _DOUBLE.unpack(value)[0]
    return out


_WIRE = {"uint": 0, "bool": 0, "sint": 0, "double": 1, "string": 2}


def to_bytes(facts: KerndatFacts, key: CacheKey) -> bytes:
    """The whole file content for these facts under this key."""
    entry = _pb().kdat_entry(boot_id=key.boot_id, kernel_release=key.kernel_release,
                             criu_py_version=key.criu_py_version, probed_euid=key.euid,
                             probed_at=facts.probed_at, probe_seconds=facts.probe_seconds)
    entry.probe_errors.update(facts.probe_errors)
    for name in FACT_NAMES:
        value = getattr(facts, name)
        if FACT_KIND[name] in LIST_KINDS:
            field = getattr(entry, name)
            for item in value:
                field.add(**item._asdict())
        else:
            setattr(entry, name, value)
    payload = entry.SerializeToString()
    return HEADER.pack(MAGIC, FORMAT, len(payload), zlib.crc32(payload)) + payload


class Stale(Exception):
    """The cache file cannot be used; str() says why."""


def from_bytes(data: bytes, key: CacheKey) -> KerndatFacts:
    """Facts from a whole file's content, or raise Stale."""
    if len(data) < HEADER.size:
        raise Stale(f"short file ({len(data)} bytes)")
    magic, fmt, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Stale(f"bad magic {magic:#x}")
    if fmt != FORMAT:
        raise Stale(f"format {fmt}, expected {FORMAT}")
    payload = data[HEADER.size:]
    if len(payload) != length:
        raise Stale(f"payload of {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload) != crc:
        raise Stale("checksum mismatch")
    try:
        entry = decode_message(payload, ENTRY_SCHEMA)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise Stale(f"undecodable ({exc})") from None
    missing = [name for name in REQUIRED if name not in entry]
    if missing:
        raise Stale(f"undecodable (no {missing[0]})")
    found = CacheKey(*(entry[name] for name in REQUIRED))
    for field, want, have in zip(CacheKey._fields, key, found):
        if want != have:
            raise Stale(f"{field} {have!r}, now {want!r}")
    errors = {e.get("key", ""): e.get("value", "") for e in entry.pop("probe_errors", ())}
    for name, record in LIST_KINDS.items():
        if name in entry:
            entry[name] = tuple(record(*(item.get(f, _ZERO[f]) for f in record._fields))
                                for item in entry[name])
    return KerndatFacts(probe_errors=errors, **entry)


# proto2 defaults of the sub-message fields, for a writer that left one out.
_ZERO = {"name": "", "size": 0, "offset": 0, "bit": 0, "controllers": "", "mountpoint": ""}


# ------------------------------------------------------------------ the file

def _unsafe_owner(st: os.stat_result, euid: int) -> str:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != euid:
        return f"owned by uid {st.st_uid}, not {euid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def not_ours(first_bytes: bytes, st: os.stat_result) -> str:
    """Why a file is not one criu-py wrote ('' when it is): criu-py never removes or
    replaces such a file."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if len(first_bytes) < 4:
        return f"a {len(first_bytes)}-byte file without criu-py's magic"
    magic = struct.unpack_from("<I", first_bytes)[0]
    if magic == UPSTREAM_MAGIC:
        return "upstream CRIU's kdat file"
    if magic != MAGIC:
        return f"not a criu-py kdat file (magic {magic:#010x})"
    return ""


def foreign_file(path: str) -> str:
    """'' when nothing is at `path` or it is a criu-py kdat file (or a symlink, which is
    replaced, never followed); else why it must be left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return "" if exc.errno == errno.ELOOP else exc.strerror
    try:
        st = os.fstat(fd)
        head = os.read(fd, 4) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)
    return not_ours(head, st)


_said_foreign = set()


def _leave_foreign(path: str, why: str) -> None:
    """Say once per path (at -v2) that the cache is not used there, and why."""
    if path not in _said_foreign:
        _said_foreign.add(path)
        log.warning("kdat: %s is %s: left as it is, probing without a cache", path, why)


def read_cache(path: str, key: CacheKey) -> KerndatFacts | None:
    """The cached facts, or None when there is no usable file: none, one of ours that was
    stale (then it is gone), or one criu-py did not write (left untouched)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _stale(path, "a symlink, not followed")
        log.warning("kdat: cannot read %s: %s", path, exc.strerror)
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, min(st.st_size, MAX_SIZE) + 1) if stat.S_ISREG(st.st_mode) else b""
    finally:
        os.close(fd)
    foreign = not_ours(data[:4], st)
    if foreign:
        _leave_foreign(path, foreign)
        return None
    unsafe = _unsafe_owner(st, key.euid)
    if not unsafe and st.st_size > MAX_SIZE:
        unsafe = f"{st.st_size} bytes, more than a kdat file ever holds"
    if unsafe:
        return _stale(path, unsafe)
    try:
        return from_bytes(data, key)
    except Stale as exc:
        return _stale(path, str(exc))


def _stale(path: str, why: str) -> None:
    log.warning("Stale %s file", path)
    log.info("kdat: %s: %s", path, why)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.info("kdat: cannot unlink %s: %s", path, exc.strerror)
    return None


def save_cache(path: str, data: bytes) -> bool:
    """Write `data` to `path` atomically: a temporary file unique to this saver (pid +
    random) created O_EXCL|O_NOFOLLOW, written whole, renamed over `path` (rename replaces a
    symlink itself, never its target). The temporary never outlives a failure. Returns
    whether the file was written; losing a race is not an error. A file criu-py did not
    write at `path` is never replaced."""
    foreign = foreign_file(path)
    if foreign:
        _leave_foreign(path, foreign)
        return False
    _remove_orphans(path)
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        log.info("kdat: %s exists: another criu-py saves, leaving it to that one", tmp)
        return False
    except OSError as exc:
        log.warning("kdat: cannot create %s: %s", tmp, exc.strerror)
        return False
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, path)
        tmp = None
        return True
    except OSError as exc:
        log.warning("kdat: cannot save %s: %s", path, exc.strerror)
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _remove_orphans(path: str) -> None:
    """Delete temporary files of savers that died before renaming (their pid is gone)."""
    directory, base = os.path.split(path)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(base + ".") and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[len(base) + 1:].split(".")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join(directory, name))
                log.info("kdat: removed %s left by dead saver %s", name, pid)
            except OSError:
                pass


def drop_cache(path: str) -> bool:
    """Remove the cache file (a symlink there is removed, its target untouched).
    Returns whether there was one. A file criu-py did not write is refused (CriuError)."""
    foreign = foreign_file(path)
    if foreign:
        from criu_py.errors import CriuError
        raise CriuError(f"{path} is {foreign}; criu-py removes only its own cache files")
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
