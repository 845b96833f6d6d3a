# Incremental dumps: the pages of a process may live in a chain of image dirs. A dump
# made with --prev-images-dir links to the previous one with a `parent` symlink (as
# upstream CRIU does) and marks the pages it did not write again PE_PARENT: their data
# is in the parent's pagemap-PID.img + pages-N.img, as data (PE_PRESENT) or, again,
# PE_PARENT further up. This module reads such chains: which dirs, and for every page
# range of a pagemap, which file and offset hold its bytes. Restore, `crit x` and
# make-lazy all resolve pages through it, so they agree on what a chain means.
import bisect
import os

from criu_py.errors import ImageError

PARENT_LINK = "parent"
MAX_CHAIN = 64            # deeper chains are refused (and so are loops)


def open_parent(images):
    """The ImageDir the `parent` link of `images` names (relative links are resolved
    from the images dir, as upstream does), or None when there is no link."""
    from criu_py.images import ImageDir
    try:
        target = os.readlink(PARENT_LINK, dir_fd=images.dirfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ImageError(f"{images.dirpath}/{PARENT_LINK}: cannot read the link "
                         f"({exc.strerror})") from None
    path = target if os.path.isabs(target) else os.path.join(images.dirpath, target)
    try:
        return ImageDir(path)
    except ImageError:
        raise ImageError(f"{images.dirpath}/{PARENT_LINK}: names {target}, which is not "
                         f"an images dir") from None


def open_chain(images) -> list:
    """[images, its parent, the parent's parent, ...]; the caller closes all but the
    first. Loops and chains deeper than MAX_CHAIN are an ImageError."""
    chain = [images]
    seen = {_ident(images)}
    try:
        while True:
            parent = open_parent(chain[-1])
            if parent is None:
                return chain
            chain.append(parent)
            ident = _ident(parent)
            if ident in seen:
                raise ImageError(f"{parent.dirpath}: the chain of parent images loops")
            if len(chain) > MAX_CHAIN:
                raise ImageError(f"{images.dirpath}: more than {MAX_CHAIN} parent images")
            seen.add(ident)
    except BaseException:
        close_chain(chain)
        raise


def close_chain(chain: list) -> None:
    for d in chain[1:]:
        d.close()


def _ident(images) -> tuple:
    st = os.fstat(images.dirfd)
    return st.st_dev, st.st_ino


class Level:
    """One pagemap of a chain: its entries as sorted (start, end, flags, offset in the
    pages file or -1), the pages file's name and the dir."""

    def __init__(self, images, name: str, head, entries: list, page_size: int):
        from criu_py.images import PE_PARENT, PE_PRESENT, pagemap_nr_pages
        self.images = images
        self.name = name
        self.pages_name = f"pages-{head.pages_id}.img"
        self.spans = []
        off = 0
        for pe in entries:
            n = pagemap_nr_pages(pe)
            flags = pe.flags if pe.HasField("flags") else PE_PRESENT
            if pe.HasField("in_parent") and pe.in_parent:
                flags |= PE_PARENT
            start, end = pe.vaddr, pe.vaddr + n * page_size
            if not n or start % page_size:
                raise ImageError(f"{name}: bad entry at {start:#x} ({n} pages)")
            if self.spans and start < self.spans[-1][1]:
                raise ImageError(f"{name}: entry at {start:#x} overlaps or precedes the one before")
            if flags & PE_PRESENT:
                self.spans.append((start, end, flags, off))
                off += end - start
            else:
                self.spans.append((start, end, flags, -1))
        self.present_bytes = off
        self._starts = [s for s, _, _, _ in self.spans]

    def pieces(self, start: int, end: int):
        """(lo, hi, flags, offset of lo or -1) of the entries meeting [start, end), in
        order; gaps (no entry) are left out."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.spans):
            s, e, flags, off = self.spans[i]
            if s >= end:
                break
            if e > start:
                lo, hi = max(s, start), min(e, end)
                yield lo, hi, flags, (off + lo - s) if off >= 0 else -1
            i += 1

    def cover_array(self, start: int = 0):
        """(uint64_t[] of merged [start, end) pairs of every entry, data or parent, from
        the one meeting `start` on; their count), for csrc/track.c."""
        from criu_py.native import ffi
        if not hasattr(self, "_cover"):
            merged = []
            for s, e, _, _ in self.spans:
                if merged and merged[-1][1] == s:
                    merged[-1][1] = e
                else:
                    merged.append([s, e])
            self._cover = ffi.new("uint64_t[]", [x for m in merged for x in m] or [0, 0])
            self._cover_n = len(merged)
            self._cover_ends = [e for _, e in merged]
        i = bisect.bisect_right(self._cover_ends, start)
        return self._cover + 2 * i, self._cover_n - i

    def covered(self, start: int, end: int) -> bool:
        """Whether every page of [start, end) has an entry (data or parent)."""
        pos = start
        for lo, hi, _, _ in self.pieces(start, end):
            if lo > pos:
                return False
            pos = hi
        return pos >= end


def read_level(images, name: str, page_size: int) -> Level | None:
    """The pagemap `name` of `images` as a Level; None when the dir has no such file."""
    if not images.exists(name):
        return None
    entries = images.read_entries(name)
    if not entries:
        raise ImageError(f"{name}: no pagemap head")
    return Level(images, name, entries[0], entries[1:], page_size)


class Chain:
    """The pagemaps of one process along a chain of dirs (loaded on first use)."""

    def __init__(self, dirs: list, pagemap_name: str, page_size: int):
        self.dirs = dirs
        self.pagemap_name = pagemap_name
        self.page_size = page_size
        self._levels = {}

    def level(self, depth: int) -> Level:
        lv = self._levels.get(depth)
        if lv is None:
            if depth >= len(self.dirs):
                raise ImageError(f"{self.dirs[0].dirpath}: pages live in parent images, but "
                                 f"the chain of parents ends after {len(self.dirs) - 1}")
            d = self.dirs[depth]
            lv = read_level(d, self.pagemap_name, self.page_size)
            if lv is None:
                raise ImageError(f"{d.dirpath}/{self.pagemap_name}: missing "
                                 f"(pages of {self.dirs[0].dirpath} live there)")
            try:
                size = os.stat(lv.pages_name, dir_fd=d.dirfd).st_size
            except OSError as exc:
                raise ImageError(f"{d.dirpath}/{lv.pages_name}: cannot open ({exc.strerror})") from None
            if size != lv.present_bytes:
                raise ImageError(f"{d.dirpath}/{lv.pages_name}: holds {size} bytes, "
                                 f"{self.pagemap_name} describes {lv.present_bytes}")
            self._levels[depth] = lv
        return lv

    def resolve(self, start: int, end: int, depth: int = 1) -> list:
        """Where the bytes of [start, end) are, starting at dir `depth` (1: the parent):
        [(lo, hi, depth, offset)] in address order. Every page must be found as data
        somewhere up the chain."""
        from criu_py.images import PE_PRESENT
        out = []
        lv = self.level(depth)
        pos = start
        for lo, hi, flags, off in lv.pieces(start, end):
            if lo > pos:
                break
            if flags & PE_PRESENT:
                out.append((lo, hi, depth, off))
            else:
                out += self.resolve(lo, hi, depth + 1)
            pos = hi
        if pos < end:
            raise ImageError(f"{lv.images.dirpath}/{lv.name}: no pages for {pos:#x}-{end:#x}, "
                             f"which a child image says live there")
        return out
