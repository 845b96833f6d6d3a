# File descriptors, one module per kind (like CRIU's files-*.c with their ops structs).
# Each kind module defines an ops object with a dump half and a restore half; FILE_KINDS
# is the one table the dumper and the restorer consult. Adding a kind: one module, one
# line here, one message in proto/, one test.
#
# Dump side: classify() says which kind an fd is (or refuses it, naming pid, fd and
# kind); FileTable hands out the ids of files.img entries (one per open file
# description, shared by dup'ed fds and by every VMA of one mapped file).
# Restore side: every files.img entry belongs to one resource (resource_key), opened
# once by the lowest common ancestor of the tasks that use it; a kind whose entries
# need other files open first (an epoll and its targets) names them in deps().
import stat

from criu_py.errors import Unsupported
from criu_py.proc import Record

O_CLOEXEC = 0o2000000
FD_CLOEXEC = 1


class FdRef(Record):
    """What the dump knows about one fd of the task before choosing its kind: link is the
    readlink of /proc/PID/fd/N, st the stat of the open file, flags its f_flags from
    fdinfo (O_CLOEXEC included when set), info the whole proc.FdInfo."""
    _fields = ("pid", "fd", "link", "st", "pos", "flags", "mnt_id", "info")


class FileOps:
    """Defaults of a kind's ops object (see the table below)."""
    fd_type = 0
    # late kinds get their files.img ids after every other fd of the tree (an epoll
    # names its targets by theirs)
    late = False
    # modules the restore half imports when it runs in the tasks: the restore loads them
    # once before the first fork when the images hold this kind (else every task would)
    restore_imports = ()

    def claims(self, ref: FdRef) -> bool:
        return False

    def check(self, ctx, ref: FdRef) -> None:
        """Refusals that need more than the kind (called before any image is written)."""

    def resource_key(self, fe, tree=None) -> tuple:
        """The restore resource a files.img entry belongs to (tree: the TreeImages, for
        kinds whose entries group by what other entries say, such as socket pairs)."""
        return ("file", fe.id)

    def deps(self, tree, fe) -> list:
        """files.img ids that must be open before this entry can be (restore)."""
        return []

    def check_image(self, tree, fe, what: str) -> None:
        """Restore: what must hold before anything is created (paths, sizes, ...)."""

    def inherit_name(self, fe) -> str | None:
        """The name by which `restore --inherit-fd fd[N]:NAME` hands this files.img
        entry's file in from the caller, as CRIU names it (None: not possible)."""
        return None


def describe_unsupported(ref: FdRef) -> str:
    """A short name of what an fd is, for refusals: socket, io_uring, bpf-map, ..."""
    link = ref.link
    if link.startswith("socket:"):
        return "socket"
    if link.startswith("anon_inode:"):
        return link[len("anon_inode:"):].strip("[]") or "anon_inode"
    mode = ref.st.st_mode
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISCHR(mode):
        return "character device"
    if link.startswith("/memfd:"):
        return "memfd"
    if link.endswith(" (deleted)"):
        return "deleted file"
    return link or "unknown"


def classify(ref: FdRef) -> str:
    """The FILE_KINDS key for an fd, or Unsupported naming pid, fd and kind."""
    for name, ops in FILE_KINDS.items():
        if ops.claims(ref):
            return name
    raise Unsupported(f"pid {ref.pid} fd {ref.fd}: {describe_unsupported(ref)} "
                      f"({ref.link}) is not supported")


class FileTable:
    """files.img under construction: entries with ids, deduplicated by a key."""

    def __init__(self):
        self.entries = []
        self.stats = {}             # id -> os.stat_result of a REG entry's file
        self._ids = {}

    def lookup(self, key):
        return self._ids.get(key)

    def add(self, key, make_entry) -> int:
        """The id for `key`, creating its file_entry with make_entry(id) the first time."""
        fid = self._ids.get(key)
        if fid is None:
            fid = len(self.entries) + 1
            self._ids[key] = fid
            self.entries.append(make_entry(fid))
        return fid

    def entry(self, fid: int):
        return self.entries[fid - 1]


def fown_entry(msg) -> None:
    """An empty owner (F_SETOWN not used): all zero, as upstream writes it."""
    msg.uid = msg.euid = msg.signum = msg.pid_type = msg.pid = 0


_BY_TYPE = {}


def ops_by_type() -> dict:
    """fd_type (fdinfo/file_entry type) -> ops, for the restore."""
    if not _BY_TYPE:
        _BY_TYPE.update((ops.fd_type, ops) for ops in FILE_KINDS.values())
    return _BY_TYPE


# The table. The kind modules import the names above, so they come last; they load no
# protobuf at import time, which keeps this cheap.
from criu_py.files import (eventfd, eventpoll, fanotify, fifo, inotify, memfd,  # noqa: E402
                           pipe, regular, signalfd, timerfd, tty)
from criu_py.files.sockets import inet, other, unix  # noqa: E402

# kind name -> ops object: claims(ref), check(ctx, ref), dump_fd(ctx, ref) -> files.img
# id, restore_fd(ctx, file_entry, fdinfo_entry) -> fd; fd_type is the fdinfo/file_entry
# type; resource_key, deps, check_image as in FileOps; optional pre_dump(ctx, ref): what
# a pre-dump does early (inotify/fanotify: the watched inodes for the irmap cache).
FILE_KINDS = {"reg": regular.OPS, "pipe": pipe.OPS, "memfd": memfd.OPS, "fifo": fifo.OPS,
              "eventfd": eventfd.OPS, "signalfd": signalfd.OPS, "timerfd": timerfd.OPS,
              "eventpoll": eventpoll.OPS, "tty": tty.OPS, "inotify": inotify.OPS,
              "fanotify": fanotify.OPS, "unixsk": unix.OPS, "inetsk": inet.OPS,
              "socket": other.OPS}          # other sockets: refused; last, it claims them all
