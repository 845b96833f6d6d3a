# Where the lazy-pages daemon finds the bytes of each lazy page, and how it knows they are
# the ones the dump wrote. For a process of DIR, every page of its lazy ranges is, by
# DIR's pagemap:
#   - PE_PRESENT: in DIR's own pages file (a full dump restored with --lazy-pages);
#   - PE_PARENT: up DIR's chain of `parent` links (incremental dumps, mem/chain.py);
#   - PE_LAZY alone: in the lazy source - the dir DIR's `lazy-source` link names (what
#     `crit make-lazy` writes), looked up there the same way (its own pages, its parents,
#     its own lazy source) - or, with `lazy-pages --page-server`, at the page server of the
#     dump (`dump --lazy-pages`), asked for by address;
#   - no entry: nothing was dumped there (zeros): not brought, a fault there gets a zero page.
# Each piece of a pages file is checked against the digests of its dir's checksum images
# the first time a byte of it is used (images/integrity.py PageDigests); the small images
# the daemon reads (pstree, core, ids, mm, pagemaps) are checked whole when it starts.
# Pages from a page server carry a digest of their own (pageserver/).
import os

from criu_py.errors import ImageError

REMOTE = -1
LAZY_SOURCE = "lazy-source"


class FileSource:
    """One pages file, mapped read-only, checked piece by piece."""

    def __init__(self, images, name: str, entry, where: str):
        from criu_py.images.integrity import PageDigests
        self.images = images
        self.name = name
        self.digests = PageDigests(images, name, entry, where)
        self.base = self.digests.base
        self.size = self.digests.size

    def address(self, offset: int, length: int) -> int:
        """Where bytes [offset, offset + length) are in our memory, once checked."""
        self.digests.check(offset, length)
        return self.base + offset

    def close(self) -> None:
        self.digests.close()


class Dir:
    """One images dir of the lookup: its pagemaps (read once), its parent and lazy
    source (opened on first use) and its checksums."""

    def __init__(self, images, where: str, verify: bool = True):
        from criu_py.images import integrity
        self.images = images
        self.where = where
        self.listed = integrity._verify_dir(images, f" in {images.dirpath}" if where else "",
                                            whole_pages=False)[1] if verify else None
        self.levels = {}
        self._parent = self._source = None
        self._parent_done = self._source_done = False

    def level(self, pid: int, page_size: int):
        from criu_py.mem.chain import read_level
        lv = self.levels.get(pid)
        if lv is None:
            name = f"pagemap-{pid}.img"
            lv = read_level(self.images, name, page_size)
            if lv is None:
                raise ImageError(f"{self.where}{name}: missing (lazy pages of pid {pid} "
                                 f"live there)")
            self.levels[pid] = lv
        return lv


class Lookup:
    """Resolves the lazy ranges of DIR's processes into segments [start, end, source,
    offset]: source an index into self.files (offset in that pages file), or REMOTE
    (offset: the page's address in the dumped task, what the page server is asked for)."""

    def __init__(self, images, page_size: int, remote: bool, verify: bool = True):
        self.page_size = page_size
        self.remote = remote
        self.verify = verify
        self.root = Dir(images, "", verify)
        self.dirs = {self._ident(images): self.root}
        self.files = []                  # FileSource
        self._file_index = {}

    @staticmethod
    def _ident(images) -> tuple:
        st = os.fstat(images.dirfd)
        return st.st_dev, st.st_ino

    def _open_dir(self, path: str, what: str):
        from criu_py.images import ImageDir
        try:
            images = ImageDir(path)
        except ImageError:
            raise ImageError(f"{what} names {path}, which is not an images dir") from None
        ident = self._ident(images)
        if ident in self.dirs:
            images.close()
            return self.dirs[ident]
        if len(self.dirs) > 64:
            raise ImageError(f"{path}: more than 64 images dirs (a loop of parent or "
                             f"lazy-source links?)")
        d = Dir(images, f"{images.dirpath}/", self.verify)
        self.dirs[ident] = d
        return d

    def _link(self, d: Dir, link: str):
        try:
            target = os.readlink(link, dir_fd=d.images.dirfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageError(f"{d.images.dirpath}/{link}: cannot read the link "
                             f"({exc.strerror})") from None
        path = target if os.path.isabs(target) else os.path.join(d.images.dirpath, target)
        return self._open_dir(path, f"{d.images.dirpath}/{link}")

    def parent(self, d: Dir):
        if not d._parent_done:
            from criu_py.mem.chain import PARENT_LINK
            d._parent, d._parent_done = self._link(d, PARENT_LINK), True
        return d._parent

    def source(self, d: Dir):
        if not d._source_done:
            d._source, d._source_done = self._link(d, LAZY_SOURCE), True
        return d._source

    def _file(self, d: Dir, name: str) -> int:
        key = (id(d), name)
        i = self._file_index.get(key)
        if i is None:
            entry = d.listed.get(name) if d.listed is not None else None
            if d.listed is not None and entry is None:
                raise ImageError(f"{d.where}{name}: not in the checksum image")
            self.files.append(FileSource(d.images, name, entry, d.where))
            i = self._file_index[key] = len(self.files) - 1
        return i

    def segments(self, pid: int, ranges: list) -> list:
        """The pages to bring of pid's lazy ranges, as merged segments in address order."""
        out = []
        for start, end in ranges:
            self._resolve(self.root, pid, start, end, out, top=True, depth=0)
        merged = []
        for s in sorted(out):
            last = merged[-1] if merged else None
            if last and last[1] == s[0] and last[2] == s[2] and \
                    last[3] + (last[1] - last[0]) == s[3]:
                last[1] = s[1]
            else:
                merged.append(list(s))
        return merged

    def _resolve(self, d: Dir, pid: int, start: int, end: int, out: list, top: bool,
                 depth: int) -> None:
        from criu_py.images import PE_LAZY, PE_PARENT, PE_PRESENT
        if depth > 128:
            raise ImageError(f"pages {start:#x}-{end:#x} of pid {pid}: too many links to follow")
        lv = d.level(pid, self.page_size)
        pos = start
        for lo, hi, flags, off in lv.pieces(start, end):
            if lo > pos and not top:
                break                    # a hole where a child image says there is data
            pos = hi
            if flags & PE_PRESENT:
                out.append((lo, hi, self._file(d, lv.pages_name), off))
            elif flags & PE_PARENT:
                parent = self.parent(d)
                if parent is None:
                    raise ImageError(f"{d.where}pagemap-{pid}.img: pages at {lo:#x} live in a "
                                     f"parent image, but {d.images.dirpath} has no parent link")
                self._resolve(parent, pid, lo, hi, out, False, depth + 1)
            elif flags & PE_LAZY:
                if self.remote and d is self.root:
                    out.append((lo, hi, REMOTE, lo))
                    continue
                src = self.source(d)
                if src is None:
                    raise ImageError(f"{d.where}pagemap-{pid}.img: pages at {lo:#x} are lazy, "
                                     f"but {d.images.dirpath} names no lazy source (a "
                                     f"`lazy-source` link) and no --page-server was given")
                self._resolve(src, pid, lo, hi, out, False, depth + 1)
        if pos < end and not top:
            raise ImageError(f"{d.where}pagemap-{pid}.img: no pages for {pos:#x}-{end:#x}, "
                             f"which a lazy or child image says live there")

    def close(self) -> None:
        for f in self.files:
            f.close()
        for d in self.dirs.values():
            d.images.close()
