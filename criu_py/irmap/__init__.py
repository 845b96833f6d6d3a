# The irmap: inode -> path. An inotify watch or a fanotify mark names its inode by device,
# inode number and file handle, never by a path, but a restore needs a path to watch
# again. The handle often gives one (open_by_handle_at, then the fd's link); when it does
# not (a disconnected dentry, --force-irmap), the inode is looked for by scanning the
# directories where watched files usually are: the --irmap-scan-path dirs first, then
# upstream CRIU's hints (/etc, /var/spool, /var/log, a few dbus/polkit/udev dirs, and
# "/" itself without its children). Scanning big trees is slow, so what was found is
# cached: pre-dump writes irmap-cache.img into its images dir; a dump loads it (from its
# own images dir, else the parent images dir), revalidates each entry it uses (the path
# must still name the same device and inode) and scans only for what is missing or
# stale. Devices are in the kernel's encoding (major << 20 | minor), as in fdinfo and
# upstream's irmap-cache.img.
import os
import stat
import time

from criu_py.log import log

HINTS = (("/etc", True), ("/var/spool", True), ("/var/log", True),
         ("/usr/share/dbus-1/services", True), ("/usr/share/dbus-1/system-services", True),
         ("/var/lib/polkit-1/localauthority", True), ("/usr/share/polkit-1/actions", True),
         ("/lib/udev", True), ("/", False))
CACHE_IMAGE = "irmap-cache.img"


def kdev(st_dev: int) -> int:
    """A stat st_dev in the kernel's encoding (fdinfo's sdev)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def kdev_text(dev: int) -> str:
    return f"{dev >> 20}:{dev & 0xFFFFF}"


class Irmap:
    """Paths of inodes for one (pre-)dump: the cache, then scans."""

    def __init__(self, scan_paths=(), cache_dirs=()):
        self.scan_paths = [os.path.abspath(p) for p in scan_paths]
        self.cache = {}             # (dev, ino) -> path, loaded: revalidated before use
        self.found = {}             # (dev, ino) -> path, valid now
        self.cache_source = None
        self.scanned = 0            # directory entries looked at
        self.seconds = 0.0
        self.seen = {}              # inode number -> [paths] of every entry walked
        self.walked = set()         # (root, recursive) walked already
        for images in cache_dirs:
            if images is not None and images.exists(CACHE_IMAGE):
                for e in images.read_entries(CACHE_IMAGE):
                    self.cache[(e.dev, e.inode)] = e.path
                self.cache_source = images.dirpath
                log.info("irmap: %d cached paths loaded from %s", len(self.cache),
                         os.path.join(images.dirpath, CACHE_IMAGE))
                break

    def note(self, dev: int, ino: int, path: str) -> None:
        """A path known to be right now (from a file handle): remembered for the cache."""
        self.found[(dev, ino)] = path

    def lookup(self, dev: int, ino: int) -> str | None:
        key = (dev, ino)
        if key in self.found:
            return self.found[key]
        t0 = time.monotonic()
        try:
            path = self.cache.get(key)
            if path is not None:
                if _names(path, dev, ino):
                    log.info("irmap: %s:%#x -> %s (from the cache)", kdev_text(dev), ino, path)
                    self.found[key] = path
                    return path
                log.info("irmap: the cached path %s of %s:%#x is stale: scanning", path,
                         kdev_text(dev), ino)
            path = self._scan(dev, ino)
            if path is not None:
                log.info("irmap: %s:%#x -> %s (scanned %d entries)", kdev_text(dev), ino,
                         path, self.scanned)
                self.found[key] = path
            return path
        finally:
            self.seconds += time.monotonic() - t0

    def _scan(self, dev: int, ino: int) -> str | None:
        """The scan dirs, then the hints, in order: each is walked once (every entry's
        inode number noted), later lookups first look at what was seen."""
        roots = [(r, True) for r in self.scan_paths] + list(HINTS)
        for root, recursive in roots:
            if (root, recursive) not in self.walked:
                self.walked.add((root, recursive))
                self._walk(root, recursive)
            for path in self.seen.get(ino, ()):
                if _names(path, dev, ino):
                    return path
        return None

    def _walk(self, root: str, recursive: bool) -> None:
        """Depth-first from root, without following symlinks, noting the inode number
        readdir gives for every entry (no stat per file: a candidate is checked with
        lstat when asked for). A directory is also noted by its own inode (a mount
        point's readdir inode is the one below it)."""
        try:
            st = os.lstat(root)
        except OSError:
            return
        self.seen.setdefault(st.st_ino, []).append(root)
        if not recursive or not stat.S_ISDIR(st.st_mode):
            return
        todo = [root]
        seen = self.seen
        while todo:
            d = todo.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    self.scanned += 1
                    try:
                        seen.setdefault(e.inode(), []).append(e.path)
                        if e.is_dir(follow_symlinks=False):
                            todo.append(e.path)
                            own = e.stat(follow_symlinks=False).st_ino
                            if own != e.inode():
                                seen.setdefault(own, []).append(e.path)
                    except OSError:
                        continue

    def cache_entries(self) -> list:
        """irmap_cache_entry messages of every path found (for irmap-cache.img)."""
        from criu_py.images.pb import fh_pb2
        out = []
        for (dev, ino), path in sorted(self.found.items()):
            e = fh_pb2.irmap_cache_entry()
            e.dev, e.inode, e.path = dev, ino, path
            out.append(e)
        return out


def _names(path: str, dev: int, ino: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (kdev(st.st_dev), st.st_ino) == (dev, ino)
