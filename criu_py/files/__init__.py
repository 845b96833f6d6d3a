# File descriptors, one module per kind (like CRIU's files-*.c with their ops structs).
# Each kind module defines an ops object with a dump half and a restore half; FILE_KINDS
# is the one table the dumper and the restorer consult. Adding a kind: one module, one
# line here, one message in proto/, one test.
#
# Dump side: classify() says which kind an fd is (or refuses it, naming pid, fd and
# kind); FileTable hands out the ids of files.img entries (one per open file
# description, shared by dup'ed fds and by every VMA of one mapped file).
import stat

from criu_py.errors import Unsupported
from criu_py.proc import Record

O_CLOEXEC = 0o2000000
FD_CLOEXEC = 1


class FdRef(Record):
    """What the dump knows about one fd of the task before choosing its kind: link is the
    readlink of /proc/PID/fd/N, st the stat of the open file, flags its f_flags from
    fdinfo (O_CLOEXEC included when set)."""
    _fields = ("pid", "fd", "link", "st", "pos", "flags", "mnt_id", "fdinfo_extra")


def describe_unsupported(ref: FdRef) -> str:
    """A short name of what an fd is, for refusals: socket, eventfd, ..."""
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


def fown_entry(msg) -> None:
    """An empty owner (F_SETOWN not used): all zero, as upstream writes it."""
    msg.uid = msg.euid = msg.signum = msg.pid_type = msg.pid = 0


# The table. The kind modules import the names above, so they come last; they load no
# protobuf at import time, which keeps this cheap.
from criu_py.files import memfd, pipe, regular  # noqa: E402

# kind name -> ops object: claims(ref), check(ref), dump_fd(ctx, ref) -> files.img id,
# restore_fd(ctx, file_entry, fdinfo_entry) -> fd; fd_type is the fdinfo/file_entry type.
FILE_KINDS = {"reg": regular.OPS, "pipe": pipe.OPS, "memfd": memfd.OPS}
