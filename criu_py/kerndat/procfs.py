# The few /proc files the kernel-facts probes read about criu-py itself, one function per
# file returning named fields. Kept apart from criu_py.proc (the dump's parsers) because a
# cached kdat load runs these on every start and must import nothing heavy.
import os
from collections import namedtuple

Mapping = namedtuple("Mapping", "start end perms offset dev inode path")
CgroupLine = namedtuple("CgroupLine", "hierarchy controllers path")
MountInfo = namedtuple("MountInfo", "mount_id parent_id dev root mountpoint fstype source super_options")

NS_NAMES = ("cgroup", "ipc", "mnt", "net", "pid", "pid_for_children", "time",
            "time_for_children", "user", "uts")


def read_sysctl(name: str) -> str:
    """The text of /proc/sys/<name> ("kernel/pid_max"), stripped."""
    with open(f"/proc/sys/{name}") as f:
        return f.read().strip()


def read_maps(pid: str = "self") -> list[Mapping]:
    """/proc/PID/maps as Mappings (path is '' for anonymous memory)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            start, end = fields[0].split("-")
            out.append(Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16),
                               fields[3], int(fields[4]),
                               fields[5].rstrip("\n") if len(fields) > 5 else ""))
    return out


def _read_text(path: str) -> str:
    # os.open/os.read: a cached kdat load reads these on every start, and the io stack
    # of open() costs more than the read.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks).decode(errors="surrogateescape")
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_status(pid: str = "self") -> dict[str, str]:
    """/proc/PID/status as {key: value text}."""
    out = {}
    for line in _read_text(f"/proc/{pid}/status").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def read_cgroup(pid: str = "self") -> tuple:
    """/proc/PID/cgroup as CgroupLines (hierarchy 0 with no controllers is cgroup2)."""
    out = []
    for line in _read_text(f"/proc/{pid}/cgroup").splitlines():
        hier, controllers, path = line.split(":", 2)
        out.append(CgroupLine(int(hier), controllers, path))
    return tuple(out)


def read_mountinfo(pid: str = "self") -> list[MountInfo]:
    """/proc/PID/mountinfo as MountInfos (octal escapes in paths decoded)."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf = left.split()
            rf = right.split()
            out.append(MountInfo(int(lf[0]), int(lf[1]), lf[2], _unescape(lf[3]),
                                 _unescape(lf[4]), rf[0], rf[1] if len(rf) > 1 else "",
                                 rf[2] if len(rf) > 2 else ""))
    return out


def read_namespaces(pid: str = "self") -> dict[str, int]:
    """{namespace name: inode} from the /proc/PID/ns/ links (absent kinds left out)."""
    from criu_py.proc import read_ns_ids
    return read_ns_ids(pid, NS_NAMES)


def _unescape(path: str) -> str:
    if "\\" not in path:
        return path
    return path.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")
