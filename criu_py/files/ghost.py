# Deleted files ("ghost files", as CRIU calls them): a file open or mapped by the tree
# after its last name was removed. Its contents go into ghost-file-ID.img (a
# ghost_file_entry with owner, mode, times and size, then the bytes: raw for small
# files, as (offset, length) chunks of the allocated ranges for files of 12 KiB and
# more, as upstream writes them) and remap-fpath.img maps the files.img REG entry to it.
# --ghost-limit caps the allocated size of each one (default 1 MiB, as CRIU). A deleted
# directory a task holds open or has as its cwd (a shell left in a dir `rm -rf` took)
# is a ghost too: an entry with its owner, mode and times, no contents.
# Restore: the restore command recreates each ghost before the tree is forked, at its
# old path when that is free (else beside it, as PATH.cr.ID.ghost), with its owner,
# mode, contents and times (a directory with the missing directories above it, as
# upstream does); the tasks open and map it like any file, and once every task has done
# so the name is removed again, so the files are unlinked once more (directories, and
# the ones made above them, once every task has made its cwd: restore.remove_ghosts).
import os
import struct

from criu_py.errors import ImageError, RestoreError, Unsupported
from criu_py.log import log
from criu_py.proc import Record

DEFAULT_LIMIT = 1 << 20
CHUNKS_FROM = 3 * 4096                      # upstream's GHOST_CHUNKS_THRESH
REMAP_GHOST = 1
SEEK_DATA, SEEK_HOLE = 3, 4
DELETED = " (deleted)"


class Ghost(Record):
    """One deleted inode of the dump: its ghost id, stat, and where the dumper reads it."""
    _fields = ("id", "st", "open_path", "path")


def parse_size(text: str) -> int:
    """--ghost-limit's value: a number with an optional K, M or G suffix (as CRIU)."""
    text = str(text).strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    try:
        return int(text[:-1] if mult > 1 else text) * mult
    except ValueError:
        raise Unsupported(f"bad --ghost-limit {text!r}: a size like 1048576, 512K, 1M or 2G") from None


def live_path(link: str) -> str:
    return link[:-len(DELETED)] if link.endswith(DELETED) else link


def is_deleted(link: str, st: os.stat_result) -> bool:
    return link.endswith(DELETED) or st.st_nlink == 0


def note(ctx, fid: int, link: str, st: os.stat_result, open_path: str, what: str) -> None:
    """files.img entry `fid` names a deleted file: dump its contents once per inode and
    map the entry to them (remap-fpath.img)."""
    import stat
    dump = ctx.dump if hasattr(ctx, "dump") else ctx
    if st.st_nlink:
        raise Unsupported(f"{what}: {link} was removed but the file has other names: not "
                          f"supported")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise Unsupported(f"{what}: deleted {link} is not a regular file: not supported")
    limit = dump.opts.get("ghost_limit")
    limit = DEFAULT_LIMIT if limit is None else parse_size(limit)
    used = st.st_blocks * 512
    if used > limit:
        raise Unsupported(f"{what}: deleted file {live_path(link)} holds {used} bytes, more "
                          f"than --ghost-limit {limit}")
    key = (st.st_dev, st.st_ino)
    g = dump.ghosts.get(key)
    if g is None:
        g = dump.ghosts[key] = Ghost(id=len(dump.ghosts) + 1, st=st, open_path=open_path,
                                     path=live_path(link))
    if fid not in dump.remaps:
        dump.remaps[fid] = g.id


def _ranges(fd: int, size: int) -> list[tuple[int, int]]:
    out, off = [], 0
    while off < size:
        try:
            data = os.lseek(fd, off, SEEK_DATA)
        except OSError:
            break
        if data >= size:
            break
        hole = min(os.lseek(fd, data, SEEK_HOLE), size)
        out.append((data, hole - data))
        off = hole
    return out


def _read_at(fd: int, off: int, n: int) -> bytes:
    chunks = []
    while n:
        b = os.pread(fd, min(n, 1 << 20), off)
        if not b:
            raise OSError(5, "file shrank while it was read")
        chunks.append(b)
        off += len(b)
        n -= len(b)
    return b"".join(chunks)


def write_images(dump) -> None:
    """ghost-file-ID.img for every ghost, remap-fpath.img for the entries using them."""
    import stat
    from criu_py.errors import from_oserror
    from criu_py.images.pb import ghost_file_pb2, remap_file_path_pb2
    for g in dump.ghosts.values():
        st = g.st
        e = ghost_file_pb2.ghost_file_entry()
        e.uid, e.gid, e.mode = st.st_uid, st.st_gid, st.st_mode
        e.dev, e.ino = st.st_dev, st.st_ino
        e.atim.tv_sec, e.atim.tv_usec = int(st.st_atime), st.st_atime_ns // 1000 % 1_000_000
        e.mtim.tv_sec, e.mtim.tv_usec = int(st.st_mtime), st.st_mtime_ns // 1000 % 1_000_000
        if stat.S_ISDIR(st.st_mode):
            dump.images.write_entries_with_payload(f"ghost-file-{g.id:x}.img", [(e, b"")])
            log.info("ghost directory %d: %s", g.id, g.path)
            continue
        try:
            fd = os.open(g.open_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, f"opening the deleted file {g.path}") from None
        try:
            if st.st_size >= CHUNKS_FROM:
                e.chunks = True
                e.size = st.st_size
                parts = []
                for off, n in _ranges(fd, st.st_size):
                    c = ghost_file_pb2.ghost_chunk_entry()
                    c.len, c.off = n, off
                    raw = c.SerializeToString()
                    parts += [struct.pack("<I", len(raw)), raw, _read_at(fd, off, n)]
                payload = b"".join(parts)
            else:
                payload = _read_at(fd, 0, st.st_size)
        finally:
            os.close(fd)
        dump.images.write_entries_with_payload(f"ghost-file-{g.id:x}.img", [(e, payload)])
        log.info("ghost file %d: %s, %d bytes", g.id, g.path, st.st_size)
    entries = []
    for orig, gid in sorted(dump.remaps.items()):
        r = remap_file_path_pb2.remap_file_path_entry()
        r.orig_id, r.remap_id, r.remap_type = orig, gid, REMAP_GHOST
        entries.append(r)
    if entries:
        dump.images.write_entries("remap-fpath.img", entries)


# ---------------------------------------------------------------- restore
def load_remaps(images) -> dict:
    """remap-fpath.img: files.img REG id -> ghost id (only ghosts are supported)."""
    if not images.exists("remap-fpath.img"):
        return {}
    out = {}
    for r in images.read_entries("remap-fpath.img"):
        kind = r.remap_type if r.HasField("remap_type") else REMAP_GHOST
        gid = r.remap_id & ~(1 << 31)            # old images flag ghosts in the id
        if kind != REMAP_GHOST:
            raise Unsupported(f"remap-fpath.img: file {r.orig_id} is remapped by kind "
                              f"{kind} (link or procfs remaps are not supported)")
        out[r.orig_id] = gid
    return out


def read_ghost(images, gid: int):
    """(ghost_file_entry, [(offset, bytes)]) of one ghost image."""
    from criu_py.images.pb import ghost_file_pb2
    name = f"ghost-file-{gid:x}.img"
    if not images.exists(name):
        raise ImageError(f"{name}: missing (a deleted file of the dump)")
    from criu_py.images import PAYLOAD_SCAN, _parse_header, iter_frames
    data = images.read_bytes(name)
    kind, off = _parse_header(data, name, "ghost_file")
    (_, e, payload), = iter_frames(data, name, off, kind, scan=PAYLOAD_SCAN["ghost_file"])
    payload = bytes(payload)
    if not e.chunks:
        return e, [(0, payload)]
    parts, off = [], 0
    while off < len(payload):
        if off + 4 > len(payload):
            raise ImageError(f"{name}: truncated chunk")
        n, = struct.unpack_from("<I", payload, off)
        c = ghost_file_pb2.ghost_chunk_entry()
        try:
            c.ParseFromString(payload[off + 4:off + 4 + n])
        except Exception:
            raise ImageError(f"{name}: damaged chunk at {off}") from None
        off += 4 + n
        if off + c.len > len(payload):
            raise ImageError(f"{name}: chunk at {c.off} is cut short")
        parts.append((c.off, payload[off:off + c.len]))
        off += c.len
    return e, parts


def create(images, gid: int, path: str) -> list[str]:
    """Recreate ghost `gid` (deleted file or directory `path`): at path if free, else
    beside it. Returns what was made, to be removed in reverse order, the ghost last (a
    directory: with the missing directories above it)."""
    import stat
    e, parts = read_ghost(images, gid)
    where = path
    if os.path.lexists(where):
        where = f"{path}.cr.{gid:x}.ghost"
    if stat.S_ISDIR(e.mode):
        return _create_dir(e, gid, path, where)
    try:
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RestoreError(f"cannot recreate the deleted file {path} at {where}: "
                           f"{exc.strerror}") from None
    try:
        for off, data in parts:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        size = e.size if e.HasField("size") else sum(len(d) for _, d in parts)
        os.ftruncate(fd, size)
        os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode & 0o7777)
        if e.HasField("mtim"):
            os.utime(fd, ns=(e.atim.tv_sec * 10**9 + e.atim.tv_usec * 1000,
                             e.mtim.tv_sec * 10**9 + e.mtim.tv_usec * 1000))
    except OSError as exc:
        os.close(fd)
        os.unlink(where)
        raise RestoreError(f"cannot recreate the deleted file {path}: {exc.strerror}") from None
    os.close(fd)
    log.info("ghost file %d recreated at %s", gid, where)
    return [where]


def _create_dir(e, gid: int, path: str, where: str) -> list[str]:
    """mkdir -p of a ghost directory (owner, mode and times of the deleted one); on a
    failure nothing made is left."""
    made = []
    missing, up = [], os.path.dirname(where)
    while up and up != "/" and not os.path.lexists(up):
        missing.append(up)
        up = os.path.dirname(up)
    try:
        for d in reversed(missing):
            os.mkdir(d, 0o700)
            made.append(d)
        os.mkdir(where, 0o700)
        made.append(where)
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, e.mode & 0o7777)
            if e.HasField("mtim"):
                os.utime(fd, ns=(e.atim.tv_sec * 10**9 + e.atim.tv_usec * 1000,
                                 e.mtim.tv_sec * 10**9 + e.mtim.tv_usec * 1000))
        finally:
            os.close(fd)
    except OSError as exc:
        remove_dirs(made)
        raise RestoreError(f"cannot recreate the deleted directory {path} at {where}: "
                           f"{exc.strerror}") from None
    log.info("ghost directory %d recreated at %s", gid, where)
    return made


def remove_dirs(made: list[str]) -> None:
    """Remove directories _create_dir made, deepest first (what fails stays)."""
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            pass
