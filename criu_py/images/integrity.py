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
#   verify(images_dir, opts)      # restore: first step
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


def digest(dirfd: int, name: str, runs=()) -> tuple[int, int, list[int]]:
    """(size, digest of the file, [digest of each (offset, length) run]) of one file."""
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
        r = lib.cp_digest_file(fd, size, flat, len(runs), out_runs, out_file, _threads())
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
            size, whole, parts = digest(images.dirfd, name, [(o, n) for o, n, _, _ in file_runs])
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
    from criu_py.images import ImageDir
    from criu_py.mem.chain import close_chain, open_chain
    if opts.get("no_verify"):
        log.info("restore: --no-verify: the images are not checked against %s", CHECKSUM_IMAGE)
        return
    with log_step("restore", "verify checksums"), ImageDir(images_dir) as images:
        chain = open_chain(images)
        try:
            for i, level in enumerate(chain):
                _verify_dir(level, f" in {level.dirpath}" if i else "")
        finally:
            close_chain(chain)


def _verify_dir(images, where: str) -> None:
    """One dir; `where` names a parent dir in the messages ("" for the images dir)."""
    from criu_py.images import kind_of
    if not images.exists(CHECKSUM_IMAGE):
        log.info("restore: no %s%s (images not written by criu-py): restoring without "
                 "verification", CHECKSUM_IMAGE, where)
        return
    entries = images.read_entries(CHECKSUM_IMAGE)
    if not entries or entries[0].algorithm != ALGORITHM or entries[0].block_size != BLOCK:
        what = entries[0].algorithm if entries else "no head"
        raise ImageError(f"{CHECKSUM_IMAGE}{where}: unknown checksum algorithm ({what})")
    listed = {e.name: e for e in entries[1:]}
    for name in images.list():
        if kind_of(name) is not None and name != CHECKSUM_IMAGE and name not in listed:
            raise ImageError(f"{name}{where}: not in {CHECKSUM_IMAGE} (added after the dump)")
    for name in sorted(listed, key=lambda n: (n.startswith("pages-"), n)):
        try:
            _check(images, listed[name])
        except ImageError as exc:
            if not where:
                raise
            raise ImageError(f"{images.dirpath}/{exc}") from None
    log.info("restore: %d image files%s match %s", len(listed), where, CHECKSUM_IMAGE)


def _check(images, e) -> None:
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
    _, whole, parts = digest(images.dirfd, name, runs)
    for r, d in zip(e.runs, parts):
        if d != r.digest:
            where = f" ({r.pagemap} at {r.vaddr:#x})" if r.pagemap else ""
            raise ImageError(f"{name}: damaged page run at offset {r.offset:#x}, "
                             f"{r.length // BLOCK} pages{where}")
    if whole != e.digest:
        raise ImageError(f"{name}: damaged (checksum mismatch)")
