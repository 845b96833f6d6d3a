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
#   with verifying(images_dir, opts) as pages:   # restore: the image files now, the
#       ...                                      # pages files meanwhile in a thread;
#       pages.wait()                             # before the tree runs
import contextlib
import os

from criu_py.errors import ImageError
from criu_py.log import log
from criu_py.log import step as log_step

CHECKSUM_IMAGE = "criu-py-checksums.img"
ALGORITHM = "crc32c-4k-sum64"
BLOCK = 4096


def _threads() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 4))
    except OSError:
        return 1


def digest(dirfd: int, name: str, runs=(), known=None, threads=None) -> tuple[int, int, list[int]]:
    """(size, digest of the file, [digest of each (offset, length) run]) of one file;
    known: (size, CRC of each block) its writer computed, used when the file still has
    that size (else the file is read)."""
    from criu_py.native import ffi, lib
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dirfd)
    except FileNotFoundError:
        raise ImageError(f"{name}: missing (listed in {CHECKSUM_IMAGE})") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot open ({exc.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        flat = ffi.new("uint64_t[]", [x for run in runs for x in run] or [0])
        out_runs = ffi.new("uint64_t[]", max(len(runs), 1))
        out_file = ffi.new("uint64_t *")
        if known is not None and known[0] == size:
            r = lib.cp_digest_crcs(known[1], size, flat, len(runs), out_runs, out_file)
            log.debug("%s: digest from the block CRCs computed while it was written", name)
        else:
            r = lib.cp_digest_file(fd, size, flat, len(runs), out_runs, out_file,
                                   threads or _threads())
    finally:
        os.close(fd)
    if r < 0:
        raise ImageError(f"{name}: cannot checksum ({os.strerror(-r)})")
    return size, out_file[0], [out_runs[i] for i in range(len(runs))]


def _page_runs(images) -> dict:
    """pages file name -> [(offset, length, pagemap name, vaddr)] of the PE_PRESENT runs
    every pagemap of the set describes, in file order."""
    from criu_py.images import PE_PRESENT, kind_of, pagemap_nr_pages
    runs: dict[str, list] = {}
    for name in images.list():
        if kind_of(name) != "pagemap":
            continue
        entries = images.read_entries(name)
        if not entries:
            continue
        pages = f"pages-{entries[0].pages_id}.img"
        off = sum(r[1] for r in runs.get(pages, ()))
        for pe in entries[1:]:
            flags = pe.flags if pe.HasField("flags") else PE_PRESENT
            if flags & PE_PRESENT:
                length = pagemap_nr_pages(pe) * BLOCK
                runs.setdefault(pages, []).append((off, length, name, pe.vaddr))
                off += length
    return runs


def seal(images) -> None:
    """Last step of a dump: checksum every image file in the dir (logs and other files
    that are not images are left out) into CHECKSUM_IMAGE."""
    from criu_py.images import kind_of, pb_module
    with log_step("dump", "seal images (checksums)"):
        pb = pb_module("integrity_pb2")
        runs = _page_runs(images)
        entries = [pb.integrity_head(algorithm=ALGORITHM, block_size=BLOCK)]
        for name in images.list():
            if kind_of(name) is None or name == CHECKSUM_IMAGE:
                continue
            file_runs = runs.get(name, [])
            size, whole, parts = digest(images.dirfd, name, [(o, n) for o, n, _, _ in file_runs],
                                        getattr(images, "block_crcs", {}).get(name))
            e = pb.integrity_file_entry(name=name, size=size, digest=whole)
            for (o, n, pagemap, vaddr), d in zip(file_runs, parts):
                e.runs.add(offset=o, length=n, digest=d, pagemap=pagemap, vaddr=vaddr)
            entries.append(e)
        images.write_entries(CHECKSUM_IMAGE, entries)
        log.info("dump: checksums of %d image files in %s", len(entries) - 1, CHECKSUM_IMAGE)


def verify(images_dir: str, opts: dict) -> None:
    """First step of a restore: every image file as the dump wrote it, in the images dir
    and in each dir of its chain of parents (mem/chain.py: pre-dumps are sealed too), or
    ImageError naming the first damaged, missing or added one."""
    with verifying(images_dir, opts) as pages:
        pages.wait()


class PagesCheck:
    """The check of the pages files, running in a thread (the digest is C code, which
    releases the GIL) while the restore reads the other images (checked already) and
    plans; wait() returns once they are checked, or raises the ImageError.
    todo: [(ImageDir, integrity_file_entry, where)]."""

    def __init__(self, todo=()):
        self.todo = list(todo)
        self.error = None
        self.thread = None
        if self.todo:
            import threading
            self.thread = threading.Thread(target=self._run, name="pages-check", daemon=True)
            self.thread.start()

    def _run(self):
        try:
            for images, e, where in self.todo:
                _check_in(images, e, where, threads=1)
        except BaseException as exc:          # noqa: BLE001 - handed to wait()
            self.error = exc

    def join(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error
        if self.todo:
            log.info("restore: %d pages files match %s", len(self.todo), CHECKSUM_IMAGE)
            self.todo = []


@contextlib.contextmanager
def verifying(images_dir: str, opts: dict):
    """Check every image file but the pages files now, in the images dir and its chain
    of parents (ImageError naming the first damaged, missing or added one), and the pages
    files in a thread meanwhile; yields the PagesCheck, whose thread is always joined on
    the way out."""
    from criu_py.images import ImageDir
    from criu_py.mem.chain import close_chain, open_chain
    if opts.get("no_verify"):
        log.info("restore: --no-verify: the images are not checked against %s", CHECKSUM_IMAGE)
        yield PagesCheck()
        return
    with ImageDir(images_dir) as images:
        chain = open_chain(images)
        try:
            with log_step("restore", "verify checksums"):
                todo = []
                for i, level in enumerate(chain):
                    todo += _verify_dir(level, f" in {level.dirpath}" if i else "")
            check = PagesCheck(todo)
            try:
                yield check
            except Exception:
                # a damaged pages file is the cause of whatever the planning tripped on
                # (a pages file shorter than its pagemap, ...): name the damage
                check.join()
                if check.error is not None:
                    raise check.error from None
                raise
            finally:
                check.join()
        finally:
            close_chain(chain)


def _verify_dir(images, where: str) -> list:
    """One dir but its pages files, which are returned as [(images, entry, where)] to be
    checked; `where` names a parent dir in the messages ("" for the images dir)."""
    from criu_py.images import kind_of
    if not images.exists(CHECKSUM_IMAGE):
        log.info("restore: no %s%s (images not written by criu-py): restoring without "
                 "verification", CHECKSUM_IMAGE, where)
        return []
    entries = images.read_entries(CHECKSUM_IMAGE)
    if not entries or entries[0].algorithm != ALGORITHM or entries[0].block_size != BLOCK:
        what = entries[0].algorithm if entries else "no head"
        raise ImageError(f"{CHECKSUM_IMAGE}{where}: unknown checksum algorithm ({what})")
    listed = {e.name: e for e in entries[1:]}
    for name in images.list():
        if kind_of(name) is not None and name != CHECKSUM_IMAGE and name not in listed:
            raise ImageError(f"{name}{where}: not in {CHECKSUM_IMAGE} (added after the dump)")
    pages = [(images, listed[n], where) for n in sorted(listed) if n.startswith("pages-")]
    for name in sorted(listed):
        if not name.startswith("pages-"):
            _check_in(images, listed[name], where)
    log.info("restore: %d image files%s match %s (%d pages files checked meanwhile)",
             len(listed) - len(pages), where, CHECKSUM_IMAGE, len(pages))
    return pages


def _check_in(images, e, where: str, threads=None) -> None:
    try:
        _check(images, e, threads)
    except ImageError as exc:
        if not where:
            raise
        raise ImageError(f"{images.dirpath}/{exc}") from None


def _check(images, e, threads=None) -> None:
    name = e.name
    if os.path.basename(name) != name or name in (".", ".."):
        raise ImageError(f"{CHECKSUM_IMAGE}: bad file name {name!r}")
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
    _, whole, parts = digest(images.dirfd, name, runs, threads=threads)
    for r, d in zip(e.runs, parts):
        if d != r.digest:
            where = f" ({r.pagemap} at {r.vaddr:#x})" if r.pagemap else ""
            raise ImageError(f"{name}: damaged page run at offset {r.offset:#x}, "
                             f"{r.length // BLOCK} pages{where}")
    if whole != e.digest:
        raise ImageError(f"{name}: damaged (checksum mismatch)")
