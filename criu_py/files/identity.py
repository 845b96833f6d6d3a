# Is the file a restore opens or maps the one that was dumped? Restore runs as root and
# opens files by the names in the images, so a damaged or crafted image must not make
# it open, map or write some other file. The dump records, for every REG entry (open
# files, mapped files, the exe, cwd and root):
#   - mode and size in reg_file_entry, and the ELF build-id in its field 11, computed as
#     upstream CRIU does (so upstream checks our images and we check theirs);
#   - device, inode and mtime in criu-py-file-ids.img (a criu-py image, with the boot id).
# Restore checks each file before anything is created (check_path, one line naming the
# file) and again on the descriptor it really opened (check_opened: same device and
# inode as checked), so a file swapped in between is refused too:
#   - always: the mode, and the size when recorded (as upstream: not for write-only
#     O_APPEND files);
#   - same boot: device and inode must match;
#   - another boot or host, or images without criu-py-file-ids.img (upstream's): for
#     files the task did not open for writing, the mtime and the build-id.
import os
import stat
import struct

from criu_py.errors import ImageError

IDENT_IMAGE = "criu-py-file-ids.img"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
NT_GNU_BUILD_ID = 3
_MAX_ELF_HEADERS = 1 << 20     # program headers and notes are read from the first 1 MiB


def boot_id() -> str:
    with open(BOOT_ID_PATH) as f:
        return f.read().strip()


# ---------------------------------------------------------------- ELF build-id

def elf_build_id(fd: int, size: int) -> bytes | None:
    """The NT_GNU_BUILD_ID note of an ELF file (the first one in a PT_NOTE segment, as
    upstream looks for it), or None for a file that is not ELF or has none."""
    if size < 52:
        return None
    head = os.pread(fd, 64, 0)
    if head[:4] != b"\x7fELF" or head[5] != 1:       # little-endian only (x86)
        return None
    if head[4] == 2:
        if len(head) < 64:
            return None
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        ph_fmt, want = "<IIQQQQQQ", 56
    elif head[4] == 1:
        phoff, = struct.unpack_from("<I", head, 28)
        phentsize, phnum = struct.unpack_from("<HH", head, 42)
        ph_fmt, want = "<IIIIIIII", 32
    else:
        return None
    if phentsize < want or not phnum or phoff + phentsize * phnum > min(size, _MAX_ELF_HEADERS):
        return None
    table = os.pread(fd, phentsize * phnum, phoff)
    for i in range(phnum):
        ph = struct.unpack_from(ph_fmt, table, i * phentsize)
        if head[4] == 2:
            p_type, p_offset, p_filesz = ph[0], ph[2], ph[5]
        else:
            p_type, p_offset, p_filesz = ph[0], ph[1], ph[4]
        if p_type != 4 or p_offset + p_filesz > min(size, _MAX_ELF_HEADERS):   # PT_NOTE
            continue
        found = _build_id_note(os.pread(fd, p_filesz, p_offset))
        if found is not None:
            return found
    return None


def _build_id_note(notes: bytes) -> bytes | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
        desc = pos + 12 + (namesz + 3) // 4 * 4
        nxt = desc + (descsz + 3) // 4 * 4
        if ntype == NT_GNU_BUILD_ID:
            if not 0 < descsz <= 512 or desc + descsz > len(notes):
                return None
            return notes[desc:desc + descsz]
        pos = nxt
    return None


def build_id_words(raw: bytes) -> list[int]:
    """reg_file_entry.build_id: the id's bytes as little-endian u32 words, zero padded
    (upstream copies the bytes into a uint32_t array)."""
    raw = raw + b"\0" * (-len(raw) % 4)
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


# ---------------------------------------------------------------- dump

def record(reg, st: os.stat_result, read_from: str | None) -> None:
    """Fill the build-id of a REG entry for a regular file the task did not open for
    writing only (a file being written is no library); read_from opens the very file
    (/proc/PID/fd/N, /proc/PID/map_files/...), else its name."""
    if not stat.S_ISREG(st.st_mode) or written(reg.flags) or st.st_size < 52:
        return
    try:
        fd = os.open(read_from or reg.name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return                          # size and mode still identify it
    try:
        raw = elf_build_id(fd, st.st_size)
    except OSError:
        raw = None
    finally:
        os.close(fd)
    if raw:
        reg.build_id.extend(build_id_words(raw))


def write_image(images, files) -> None:
    """criu-py-file-ids.img: the boot id, then (id, dev, ino, mtime, flags) of each REG
    entry of the FileTable `files` whose file was stat'ed (files.stats)."""
    from criu_py.images import pb_module
    pb = pb_module("file_ident_pb2")
    entries = [pb.file_ident_head(boot_id=boot_id())]
    for fe in files.entries:
        st = files.stats.get(fe.id)
        if st is not None and fe.HasField("reg"):
            entries.append(pb.file_ident_entry(id=fe.id, dev=st.st_dev, ino=st.st_ino,
                                               mtime_ns=st.st_mtime_ns, flags=fe.reg.flags))
    images.write_entries(IDENT_IMAGE, entries)


# ---------------------------------------------------------------- restore

def written(flags: int) -> bool:
    return flags & os.O_ACCMODE != os.O_RDONLY


class FileChecks:
    """The restore side: what the dump recorded about each REG entry, and the (dev, ino)
    of each file that passed, for the check on the opened descriptor."""

    def __init__(self, images):
        self.same_boot = False
        self.idents = {}                # files.img id -> file_ident_entry
        self.passed = {}                # files.img id -> (st_dev, st_ino) checked
        if images.exists(IDENT_IMAGE):
            entries = images.read_entries(IDENT_IMAGE)
            if entries:
                try:
                    self.same_boot = entries[0].boot_id == boot_id()
                except OSError:
                    self.same_boot = False
                self.idents = {e.id: e for e in entries[1:]}

    def check_path(self, fe, path: str, what: str) -> None:
        """The file at `path` must be the one REG entry fe named at dump (see the top)."""
        try:
            st = os.stat(path)
        except OSError:
            raise ImageError(f"{what}: {path} does not exist on this system") from None
        self.check_stat(fe, path, st, what, None)

    def opened_for_writing(self, fe) -> bool:
        """Whether the dumped task had REG entry fe's file open for writing. With
        criu-py's images both records (files.img and criu-py-file-ids.img) must say so: a
        flipped bit in one is refused rather than believed."""
        ident = self.idents.get(fe.id)
        if ident is not None and written(fe.reg.flags) != written(ident.flags):
            raise ImageError(f"files.img and {IDENT_IMAGE} disagree on how file id {fe.id} "
                             f"({fe.reg.name}) was opened")
        return written(fe.reg.flags)

    def check_stat(self, fe, path: str, st: os.stat_result, what: str, fd: int | None) -> None:
        r = fe.reg
        if r.HasField("mode") and r.mode and st.st_mode != r.mode:
            raise ImageError(f"{what}: {path} has mode {st.st_mode:o}, the dump saw {r.mode:o}")
        self.opened_for_writing(fe)
        ident = self.idents.get(fe.id)
        same_boot = ident is not None and self.same_boot
        if same_boot and (st.st_dev, st.st_ino) != (ident.dev, ident.ino):
            raise ImageError(f"{what}: {path} is another file than the one dumped "
                             f"(device/inode {st.st_dev:#x}/{st.st_ino}, the dump saw "
                             f"{ident.dev:#x}/{ident.ino})")
        if stat.S_ISREG(st.st_mode):
            if r.HasField("size") and st.st_size != r.size:
                raise ImageError(f"{what}: {path} has size {st.st_size}, the dump saw {r.size}")
            if not same_boot and not written(r.flags):
                if ident is not None and ident.HasField("mtime_ns") \
                        and st.st_mtime_ns != ident.mtime_ns:
                    raise ImageError(f"{what}: {path} was modified since the dump (mtime differs)")
                if len(r.build_id):
                    self._check_build_id(r, path, st, what, fd)
        self.passed[fe.id] = (st.st_dev, st.st_ino)

    def _check_build_id(self, r, path: str, st, what: str, fd: int | None) -> None:
        own = fd is None
        try:
            if own:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            raw = elf_build_id(fd, st.st_size)
        except OSError as exc:
            raise ImageError(f"{what}: cannot read the build-id of {path} "
                             f"({exc.strerror})") from None
        finally:
            if own and fd is not None:
                os.close(fd)
        if raw is None or build_id_words(raw) != list(r.build_id):
            raise ImageError(f"{what}: {path} has another build-id than the file dumped")

    def check_opened(self, fe, fd: int, path: str, what: str) -> None:
        """The descriptor restore opened must be the file check_path passed."""
        st = os.fstat(fd)
        want = self.passed.get(fe.id)
        if want is None:
            self.check_stat(fe, path, st, what, fd)
        elif (st.st_dev, st.st_ino) != want:
            raise ImageError(f"{what}: {path} was replaced while the restore ran")
