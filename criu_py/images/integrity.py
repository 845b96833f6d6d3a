# Integrity of an image set: the dump's last step writes a checksum of every image file,
# and of every run of pages its pagemaps describe, to criu-py-checksums.img (CRIU framing,
# a magic of its own, a name no upstream tool opens: upstream restores and crit ignore
# it); restore's first step checks them all before anything is read for the restore or
# created, and names the damaged file (and run) in one line. A set without the checksum
# image (written by upstream CRIU, or by a criu-py before this) restores unchecked, said
# at -v3; `restore --no-verify` skips the check. The digests (csrc/digest.c) guard
# against damage, not against someone who can rewrite the checksum image as well.
#
#   seal(images)                  # dump: last step, images is the open ImageDir
#   verify(images_dir, opts)      # restore: first step (everything, then returns)
#   with verifying(images_dir, opts) as pages:   # restore: the image files now;
#       pages.start()                            # the pages files in a thread, once
#       ...                                      # nothing will be forked by us;
#       pages.wait()                             # before the tree runs
#
# Runs are cut in pieces of at most PIECE bytes, each with its own digest, so that a lazy
# restore can check the pages it serves piece by piece (LazyPages) instead of the whole
# file first. `restore --lazy-pages` checks every image but the pages files whole, and of
# the pages files the pieces it reads itself (Deferred); the lazy-pages daemon checks each
# other piece before it copies a byte of it into a task. A page server seals the files it
# wrote into a checksum image of its own, PS_CHECKSUM_IMAGE: a dir holding both (the
# dump's other images copied beside the server's pages) is checked against both.
import contextlib
import os

from criu_py.errors import ImageError
from criu_py.log import log
from criu_py.log import step as log_step

CHECKSUM_IMAGE = "criu-py-checksums.img"
PS_CHECKSUM_IMAGE = "criu-py-checksums-ps.img"      # written by `page-server`
CHECKSUM_IMAGES = (CHECKSUM_IMAGE, PS_CHECKSUM_IMAGE)
# Written into the images dir by a restore (ours or upstream's), not by the dump: no
# damage, and restoring the same images again must work.
AFTER_THE_DUMP = frozenset({"stats-restore"})
PIECE = 1 << 20
ALGORITHM = "crc32c-4k-sum64"
BLOCK = 4096


def _threads() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 4))
    except OSError:
        return 1


def _open_listed(dirfd: int, name: str) -> int:
    """A file the checksum image lists, opened for reading (not through a symlink), or
    ImageError."""
    try:
        return os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dirfd)
    except FileNotFoundError:
        raise ImageError(f"{name}: missing (listed in {CHECKSUM_IMAGE})") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot open ({exc.strerror})") from None


def digest(dirfd: int, name: str, runs=(), threads=None) -> tuple[int, int, list[int]]:
    """(size, digest of the file, [digest of each (offset, length) run]) of one file,
    read through a private mapping."""
    from criu_py.native import lib
    fd = _open_listed(dirfd, name)
    try:
        size = os.fstat(fd).st_size
        return size, *_digests(name, runs, lambda flat, out_runs, out_file: lib.cp_digest_file(
            fd, size, flat, len(runs), out_runs, out_file, threads or _threads()))
    finally:
        os.close(fd)


def _digests_of_crcs(name: str, size: int, crcs, runs=()) -> tuple[int, list[int]]:
    """(digest of the file, [digest of each run]) of a file of `size` bytes from the
    CRC of each of its 4 KiB blocks: the same as digest() would read from it."""
    from criu_py.native import lib
    return _digests(name, runs, lambda flat, out_runs, out_file: lib.cp_digest_crcs(
        crcs, size, flat, len(runs), out_runs, out_file))


def _digests(name: str, runs, compute) -> tuple[int, list[int]]:
    """compute(runs as a flat array, their digests out, the file's out) of csrc/digest.c,
    its -errno as ImageError."""
    from criu_py.native import ffi
    flat = ffi.new("uint64_t[]", [x for run in runs for x in run] or [0])
    out_runs = ffi.new("uint64_t[]", max(len(runs), 1))
    out_file = ffi.new("uint64_t *")
    r = compute(flat, out_runs, out_file)
    if r < 0:
        raise ImageError(f"{name}: cannot checksum ({os.strerror(-r)})")
    return out_file[0], [out_runs[i] for i in range(len(runs))]


def _known_digest(dirfd: int, name: str, runs, known) -> tuple | None:
    """digest() from known = (size, CRC of each 4 KiB block) its writer computed,
    without opening the file: None unless it is still a regular file of that size."""
    import stat
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return None                     # digest() opens it and says what is wrong
    if not stat.S_ISREG(st.st_mode) or st.st_size != known[0]:
        return None
    return known[0], *_digests_of_crcs(name, known[0], known[1], runs)


def _page_runs(images, names=None) -> dict:
    """pages file name -> [(offset, length, pagemap name, vaddr)] of the PE_PRESENT runs
    every pagemap of the set (or of `names`) describes, in file order, cut in pieces of
    at most PIECE bytes."""
    from criu_py.images import PE_PRESENT, kind_of, pagemap_nr_pages
    runs: dict[str, list] = {}
    for name in (images.list() if names is None else names):
        if kind_of(name) != "pagemap":
            continue
        # as the dump encoded it, when it has not been written again since
        entries = getattr(images, "written_entries", {}).get(name) or images.read_entries(name)
        if not entries:
            continue
        pages = f"pages-{entries[0].pages_id}.img"
        off = sum(r[1] for r in runs.get(pages, ()))
        for pe in entries[1:]:
            flags = pe.flags if pe.HasField("flags") else PE_PRESENT
            if flags & PE_PRESENT:
                length = pagemap_nr_pages(pe) * BLOCK
                for piece in range(0, length, PIECE):
                    runs.setdefault(pages, []).append(
                        (off + piece, min(PIECE, length - piece), name, pe.vaddr + piece))
                off += length
    return runs


def seal(images, names=None, image: str = CHECKSUM_IMAGE) -> None:
    """Last step of a dump: checksum every image file in the dir (logs and other files
    that are not images are left out) into `image`. A page server seals only the files
    it wrote (`names`) into PS_CHECKSUM_IMAGE."""
    from criu_py.images import kind_of, pb_module
    with log_step("dump", "seal images (checksums)"):
        pb = pb_module("integrity_pb2")
        names = [n for n in (images.list() if names is None else names)
                 if kind_of(n) is not None and n not in CHECKSUM_IMAGES]
        runs = _page_runs(images, names)
        entries = [pb.integrity_head(algorithm=ALGORITHM, block_size=BLOCK)]
        known = getattr(images, "block_crcs", {})
        from_crcs = 0
        for name in names:
            file_runs = runs.get(name, [])
            offsets = [(o, n) for o, n, _, _ in file_runs]
            got = _known_digest(images.dirfd, name, offsets, known[name]) \
                if name in known else None
            if got is not None:
                from_crcs += 1
            size, whole, parts = got or digest(images.dirfd, name, offsets)
            e = pb.integrity_file_entry(name=name, size=size, digest=whole)
            for (o, n, pagemap, vaddr), d in zip(file_runs, parts):
                e.runs.add(offset=o, length=n, digest=d, pagemap=pagemap, vaddr=vaddr)
            entries.append(e)
        images.write_entries(image, entries)
        log.info("dump: checksums of %d image files in %s", len(entries) - 1, image)
        if from_crcs:
            log.debug("dump: %d of them: digest from the block CRCs computed while they "
                      "were written", from_crcs)


def verify(images_dir: str, opts: dict) -> None:
    """First step of a restore: every image file as the dump wrote it, in the images dir
    and in each dir of its chain of parents (mem/chain.py: pre-dumps are sealed too), or
    ImageError naming the first damaged, missing or added one."""
    with verifying(images_dir, opts) as pages:
        pages.wait()


class PagesCheck:
    """The check of the pages files, in a thread (the digest is C code, which releases
    the GIL) started by start() once the restore has forked the root: a thread alive
    while we clone would be copied holding the GIL or a libc lock into the child,
    which would hang. wait() returns once they are checked (checking them now if
    start() was not called), or raises the ImageError.
    todo: [(ImageDir, integrity_file_entry, where)]. checked: the images dir's other
    files as they were read and checked (CheckedBytes), for the restore to parse instead
    of reading them again."""

    def __init__(self, todo=(), checked=None):
        self.todo = list(todo)
        self.checked = checked          # CheckedBytes, or None (--no-verify, no checksums)
        self.deferred = Deferred()      # lazy: the pieces of pages files checked later
        self.error = None
        self.thread = None
        self.started = False

    def _run(self):
        try:
            for images, e, where in self.todo:
                _check_in(images, e, where, threads=1)
        except BaseException as exc:          # noqa: BLE001 - handed to wait()
            self.error = exc

    def start(self) -> None:
        if self.todo and not self.started:
            import threading
            self.started = True
            self.thread = threading.Thread(target=self._run, name="pages-check", daemon=True)
            self.thread.start()

    def join(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def wait(self) -> None:
        if self.todo and not self.started:
            self.started = True
            self._run()
        self.join()
        if self.error is not None:
            raise self.error
        if self.todo:
            log.info("restore: %d pages files match %s", len(self.todo), CHECKSUM_IMAGE)
            self.todo = []


@contextlib.contextmanager
def verifying(images_dir: str, opts: dict, lazy: bool = False):
    """Check every image file but the pages files now, in the images dir and its chain
    of parents (ImageError naming the first damaged, missing or added one), and the pages
    files in a thread meanwhile; yields the PagesCheck, whose thread is always joined on
    the way out. lazy (restore --lazy-pages): pages files are checked for their size and
    runs only; the PagesCheck's `deferred` checks the pieces the restore reads itself
    once it knows them (the lazy-pages daemon checks the others as it serves them)."""
    from criu_py.images import ImageDir
    from criu_py.mem.chain import close_chain, open_chain
    if opts.get("no_verify"):
        log.info("restore: --no-verify: the images are not checked against %s", CHECKSUM_IMAGE)
        yield PagesCheck()
        return
    with ImageDir(images_dir) as images:
        chain = open_chain(images)
        try:
            deferred = Deferred()
            checked = CheckedBytes(images)
            with log_step("restore", "verify checksums"):
                todo = []
                for i, level in enumerate(chain):
                    where = f" in {level.dirpath}" if i else ""
                    pages, listed = _verify_dir(level, where, whole_pages=not lazy,
                                                keep=None if i else checked.data)
                    todo += pages
                    if lazy and listed is not None:
                        deferred.add(level, listed, f"{level.dirpath}/" if i else "")
            check = PagesCheck(todo, checked if checked.data else None)
            check.deferred = deferred
            try:
                yield check
            except Exception:
                # a damaged pages file is the cause of whatever the planning tripped on
                # (a pages file shorter than its pagemap, ...): name the damage
                try:
                    check.wait()
                except ImageError as damage:
                    raise damage from None
                except Exception:       # noqa: BLE001 - the planning's error stands
                    pass
                raise
            finally:
                check.join()
        finally:
            close_chain(chain)


def listed_files(images, where: str = "") -> dict | None:
    """name -> integrity_file_entry of every file the dir's checksum images list (None
    when it has none); ImageError for an unknown algorithm, a file listed twice, or an
    image file listed nowhere."""
    from criu_py.images import kind_of
    present = [n for n in CHECKSUM_IMAGES if images.exists(n)]
    if not present:
        return None
    listed = {}
    for image in present:
        entries = images.read_entries(image)
        if not entries or entries[0].algorithm != ALGORITHM or entries[0].block_size != BLOCK:
            what = entries[0].algorithm if entries else "no head"
            raise ImageError(f"{image}{where}: unknown checksum algorithm ({what})")
        for e in entries[1:]:
            if e.name in listed:
                raise ImageError(f"{image}{where}: {e.name} is listed twice")
            listed[e.name] = e
    for name in images.list():
        if name in AFTER_THE_DUMP:
            continue
        if kind_of(name) is not None and name not in CHECKSUM_IMAGES and name not in listed:
            raise ImageError(f"{name}{where}: not in {CHECKSUM_IMAGE} (added after the dump)")
    return listed


def _verify_dir(images, where: str, whole_pages: bool = True, keep: dict | None = None) -> tuple:
    """One dir but its pages files: ([(images, entry, where)] of the pages files, to be
    checked, and the dir's listed files, None without checksums); `where` names a parent
    dir in the messages ("" for the images dir). whole_pages=False: the pages files are
    checked here for size and runs only, and none is returned to be checked. keep: a dict
    that gets name -> bytes of each file checked from the bytes read (CheckedBytes)."""
    listed = listed_files(images, where)
    if listed is None:
        log.info("restore: no %s%s (images not written by criu-py): restoring without "
                 "verification", CHECKSUM_IMAGE, where)
        return [], None
    pages = [(images, listed[n], where) for n in sorted(listed) if n.startswith("pages-")]
    for name in sorted(listed):
        if not name.startswith("pages-"):
            data = _check_in(images, listed[name], where)
            if keep is not None and data is not None:
                keep[name] = data
        elif not whole_pages:
            _check_in(images, listed[name], where, whole=False)
    if not whole_pages:
        log.info("restore: %d image files%s match %s (pages files: piece by piece, as "
                 "they are read)", len(listed), where, CHECKSUM_IMAGE)
        return [], listed
    log.info("restore: %d image files%s match %s (%d pages files checked meanwhile)",
             len(listed) - len(pages), where, CHECKSUM_IMAGE, len(pages))
    return pages, listed


class Deferred:
    """The pieces of pages files a lazy restore still has to check: those it reads
    itself, once planned (check_reads)."""

    def __init__(self):
        self.dirs = {}              # (st_dev, st_ino) of a dir -> its listed files

    def add(self, images, listed: dict, where: str = "") -> None:
        st = os.fstat(images.dirfd)
        self.dirs[(st.st_dev, st.st_ino)] = (listed, where)

    def check_reads(self, images, name: str, reads) -> int:
        """Check every piece of pages file `name` of `images` that overlaps one of the
        (offset, length) byte ranges `reads`; returns how many were checked."""
        st = os.fstat(images.dirfd)
        listed, where = self.dirs.get((st.st_dev, st.st_ino), (None, ""))
        if listed is None or name not in listed:
            return 0
        e = listed[name]
        reads = sorted((o, o + n) for o, n in reads if n)
        want = [r for r in e.runs if any(o < r.offset + r.length and r.offset < end
                                         for o, end in reads)]
        if not want:
            return 0
        pages = PageDigests(images, name, e, where)
        try:
            for r in want:
                pages.check(r.offset, r.length)
        finally:
            pages.close()
        return len(want)


class PageDigests:
    """One pages file mapped read-only with the digests of its pieces: check(offset,
    length) checks every piece overlapping that byte range once (a damaged piece is an
    ImageError naming it). What a lazy restore uses instead of checking the whole file
    up front. entry None: the set has no checksums (upstream's images): nothing checked."""

    def __init__(self, images, name: str, entry=None, where: str = ""):
        import mmap
        self.name = name
        self.where = where
        self.runs = sorted((r.offset, r.length, r.digest, r.pagemap, r.vaddr)
                           for r in entry.runs) if entry is not None else None
        self._starts = [r[0] for r in self.runs or ()]
        self.ok = set()              # indexes of the pieces checked so far
        fd = images.open_raw(name)
        try:
            self.size = os.fstat(fd).st_size
            if entry is not None and self.size != entry.size:
                raise ImageError(f"{where}{name}: damaged ({self.size} bytes, the dump "
                                 f"wrote {entry.size})")
            self.map = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if self.size else None
        finally:
            os.close(fd)
        from criu_py.native import ffi
        self.base = int(ffi.cast("uintptr_t", ffi.from_buffer(self.map))) if self.map else 0

    def check(self, offset: int, length: int) -> None:
        import bisect
        if self.runs is None:
            return
        if offset + length > self.size:
            raise ImageError(f"{self.where}{self.name}: {length} bytes at {offset:#x} are "
                             f"past its end")
        from criu_py.native import ffi, lib
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        out = ffi.new("uint64_t *")
        while i < len(self.runs) and self.runs[i][0] < offset + length:
            o, n, dg, pagemap, vaddr = self.runs[i]
            if o + n > offset and i not in self.ok:
                lib.cp_digest_mem(ffi.cast("void *", self.base + o), n, out)
                if out[0] != dg:
                    where = f" ({pagemap} at {vaddr:#x})" if pagemap else ""
                    raise ImageError(f"{self.where}{self.name}: damaged page run at offset "
                                     f"{o:#x}, {n // BLOCK} pages{where}")
                self.ok.add(i)
            i += 1

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


def _check_in(images, e, where: str, threads=None, whole: bool = True) -> bytes | None:
    try:
        return _check(images, e, threads, whole)
    except ImageError as exc:
        if not where:
            raise
        raise ImageError(f"{images.dirpath}/{exc}") from None


def _check(images, e, threads=None, whole: bool = True) -> bytes | None:
    """Check one listed file; a file without page runs (every image but the pages
    files) is read once and checked from those bytes, which are returned."""
    name = e.name
    if os.path.basename(name) != name or name in (".", ".."):
        raise ImageError(f"{CHECKSUM_IMAGE}: bad file name {name!r}")
    if whole and not e.runs:
        return _read_checked(images, e)
    runs = [(r.offset, r.length) for r in e.runs]
    try:
        size = os.stat(name, dir_fd=images.dirfd, follow_symlinks=False).st_size
    except FileNotFoundError:
        raise ImageError(f"{name}: missing (listed in {CHECKSUM_IMAGE})") from None
    if size != e.size:
        raise ImageError(f"{name}: damaged ({size} bytes, the dump wrote {e.size})")
    if any(o % BLOCK or n % BLOCK or o + n > size for o, n in runs) or \
            any(a[0] + a[1] > b[0] for a, b in zip(runs, runs[1:])):
        raise ImageError(f"{CHECKSUM_IMAGE}: bad page runs for {name}")
    if not whole:
        return                          # checked piece by piece as it is read (lazy)
    _, file_digest, parts = digest(images.dirfd, name, runs, threads=threads)
    for r, d in zip(e.runs, parts):
        if d != r.digest:
            where = f" ({r.pagemap} at {r.vaddr:#x})" if r.pagemap else ""
            raise ImageError(f"{name}: damaged page run at offset {r.offset:#x}, "
                             f"{r.length // BLOCK} pages{where}")
    if file_digest != e.digest:
        raise ImageError(f"{name}: damaged (checksum mismatch)")
    return None


def _read_checked(images, e) -> bytes:
    """The bytes of a listed file without page runs, read once and checked against its
    size and digest (the same digest digest() computes, from the bytes in memory)."""
    from criu_py.images import block_crcs
    name = e.name
    fd = _open_listed(images.dirfd, name)
    try:
        size = os.fstat(fd).st_size
        if size != e.size:
            raise ImageError(f"{name}: damaged ({size} bytes, the dump wrote {e.size})")
        chunks, got = [], 0
        while True:                     # to the end: a file grown since is damaged too
            chunk = os.read(fd, max(size - got, 0) + 1)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > size:
                break
    except OSError as exc:
        raise ImageError(f"{name}: read failed ({exc.strerror})") from None
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) != e.size:
        raise ImageError(f"{name}: damaged ({len(data)} bytes, the dump wrote {e.size})")
    if _digests_of_crcs(name, size, block_crcs(data))[0] != e.digest:
        raise ImageError(f"{name}: damaged (checksum mismatch)")
    return data


class CheckedBytes:
    """The files of the images dir as verifying() read and checked them: the restore
    parses these bytes (ImageDir.read_bytes takes them) instead of reading each file a
    second time, so what it parses is exactly what passed the check. Only for an
    ImageDir on the same directory (device and inode of its fd)."""

    def __init__(self, images):
        st = os.fstat(images.dirfd)
        self.dir_id = (st.st_dev, st.st_ino)
        self.data: dict[str, bytes] = {}

    def hand_to(self, images) -> None:
        """Let `images` (an ImageDir on the same dir) read the checked bytes once each."""
        st = os.fstat(images.dirfd)
        if (st.st_dev, st.st_ino) == self.dir_id:
            images.checked = self.data
        self.data = {}
