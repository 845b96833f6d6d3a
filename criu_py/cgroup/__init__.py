# cgroup membership across a checkpoint: dump.py records which cgroups every task lives
# in (cg_set ids in the cores, cgroup.img with the hierarchies, directories and their
# properties), restore.py puts the tasks back through a "yard" of freshly mounted
# hierarchies. This module holds what both halves share: the --manage-cgroups modes, the
# names of hierarchies, and mounting cgroup file systems (ctypes, loaded only when a yard
# or a dump needs it: no native code, and nothing for a restore without cgroups).
import os

from criu_py.errors import CriuError

# --manage-cgroups modes, as CRIU names them; soft is CRIU's default and what a bare
# `--manage-cgroups` means.
MODES = ("none", "props", "soft", "full", "strict", "ignore")
DEFAULT_MODE = "soft"
# The set the dumping tool itself lives in always gets id 1 (inventory.root_cg_set):
# tasks in that set are not moved at restore, they stay where the restore runs.
ROOT_CG_SET = 1


def is_v2(name: str) -> bool:
    """`name` is a hierarchy as /proc/PID/cgroup names it: "" is cgroup2."""
    return name == ""


def contains(cnames, name: str) -> bool:
    """Whether the hierarchy with controllers `cnames` (a controller entry) is the one
    /proc/PID/cgroup calls `name` ("cpu,cpuacct"): every cname is among name's."""
    cnames = list(cnames)
    if cnames == [""]:
        return name == ""
    words = set(name.split(","))
    return bool(cnames) and all(c in words for c in cnames)


def yard_dir(cnames) -> str:
    """The directory of a hierarchy inside a yard, as upstream lays it out: "unified" for
    cgroup2, "systemd" for name=systemd, "cpu,cpuacct" for co-mounted controllers."""
    parts = []
    for c in cnames:
        if c == "":
            parts.append("unified")
        elif c.startswith("name="):
            parts.append(c[5:])
        else:
            parts.append(c)
    return ",".join(parts)


def display(name: str, path: str = "") -> str:
    """How messages name a cgroup: "memory:/a/b", "unified:/a/b"."""
    label = "unified" if name == "" else name
    return f"{label}:{path}" if path else label


def join(path: str, name: str) -> str:
    """Absolute cgroup path `path` + child `name` ("/" + "a" -> "/a")."""
    return path.rstrip("/") + "/" + name if name else path


def rel(path: str) -> str:
    """A cgroup path relative to its hierarchy root ("/a/b" -> "a/b", "/" -> ".")."""
    return path.strip("/") or "."


# ------------------------------------------------------------------ mounting
_libc = None
MS_PRIVATE, MS_REC = 1 << 18, 1 << 14
MNT_DETACH = 2
NR_FSOPEN, NR_FSCONFIG, NR_FSMOUNT = 430, 431, 432
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6


def _c():
    import ctypes
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def _sys(nr: int, *args) -> int:
    """syscall(2) with every argument passed as a full register (ints as longs)."""
    import ctypes
    libc = _c()
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return libc.syscall(ctypes.c_long(nr), *conv)


def _raise(what: str):
    import ctypes
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None):
    import ctypes
    if _c().mount(source.encode(), os.fsencode(target), fstype.encode() if fstype else None,
                  ctypes.c_ulong(flags), data.encode() if data else None) != 0:
        _raise(f"mount {fstype or ''} on {target}")


def umount(target: str, flags: int = MNT_DETACH) -> None:
    if _c().umount2(os.fsencode(target), flags) != 0:
        _raise(f"umount {target}")


def mount_options(name: str) -> tuple[str, str]:
    """(fstype, mount data) to mount the hierarchy /proc/PID/cgroup calls `name`."""
    if name == "":
        return "cgroup2", ""
    if name.startswith("name="):
        return "cgroup", "none," + name
    return "cgroup", name


NR_OPEN_TREE, NR_MOVE_MOUNT = 428, 429
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 1, 4, -100
# Mounting a hierarchy anew costs 10-20 ms for cgroup2 here (the first time in a process);
# opening or cloning a mount the host already has of the whole hierarchy costs ~0.1 ms.
_host = None


def host_mounts() -> dict:
    """{hierarchy name as /proc/self/cgroup says it: mount point} of our mount namespace's
    cgroup mounts that show a whole hierarchy (mount root "/")."""
    global _host
    if _host is None:
        from criu_py.kerndat.cgroups import CGROUP_V1_FLAGS
        from criu_py.kerndat.procfs import read_mountinfo
        names = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                name = line.rstrip("\n").split(":", 2)[1]
                names[frozenset(name.split(","))] = name
        _host = {}
        for m in read_mountinfo():
            if m.root != "/" or m.fstype not in ("cgroup", "cgroup2"):
                continue
            if m.fstype == "cgroup2":
                _host.setdefault("", m.mountpoint)
                continue
            ctl = frozenset(o for o in m.super_options.split(",")
                            if o.startswith("name=") or ("=" not in o and o not in CGROUP_V1_FLAGS))
            if ctl in names:
                _host.setdefault(names[ctl], m.mountpoint)
    return _host


def frozen_cgroup(lines, seen: dict | None = None) -> str | None:
    """Of a task's cgroups (`lines`, proc.read_cgroup of it), the one that freezes it,
    as display() names it, or None: cgroup2's
    cgroup.events says "frozen 1", or a v1 freezer's freezer.state FROZEN or FREEZING. A
    frozen task stops for ptrace, but runs none of the code a dump would inject into it.
    Looked up through the host's mounts (a hierarchy not mounted here is not checked);
    seen caches the answer per cgroup across calls. Our own cgroups are not frozen (we
    run): a tree that shares them costs no lookup."""
    from criu_py import proc
    seen = {} if seen is None else seen
    if not seen:
        seen.update(((line.controllers, line.path), False)
                    for line in proc.read_cgroup(os.getpid()))
    for line in lines:
        if line.controllers == "":
            name = "cgroup.events"
        elif "freezer" in line.controllers.split(","):
            name = "freezer.state"
        else:
            continue
        key = (line.controllers, line.path)
        if key not in seen:
            seen[key] = _freezes(line.controllers, line.path, name)
        if seen[key]:
            return display(*key)
    return None


def _freezes(controllers: str, path: str, name: str) -> bool:
    top = host_mounts().get(controllers)
    if top is None:
        return False
    try:
        with open(os.path.join(top, rel(path), name)) as f:
            text = f.read()
    except OSError:
        return False
    if name == "cgroup.events":
        return "frozen 1" in text.splitlines()
    return text.strip() in ("FROZEN", "FREEZING")


def attach_hierarchy(name: str, where: str) -> None:
    """Mount hierarchy `name` on directory `where`: a clone of the host's mount of it
    when there is one (open_tree + move_mount), else a fresh mount."""
    src = host_mounts().get(name)
    if src is not None:
        fd = _sys(NR_OPEN_TREE, AT_FDCWD, os.fsencode(src), OPEN_TREE_CLONE | os.O_CLOEXEC)
        if fd >= 0:
            try:
                if _sys(NR_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(where),
                        MOVE_MOUNT_F_EMPTY_PATH) == 0:
                    return
            finally:
                os.close(fd)
    fstype, data = mount_options(name)
    mount("none", where, fstype, 0, data or None)


def open_hierarchy(name: str) -> int:
    """A directory fd at the root of hierarchy `name`: the host's mount of it, else a
    mount that appears nowhere (fsopen/fsmount; an older kernel gets a mount in a
    temporary dir, detached at once). The caller closes it; nothing is left behind."""
    src = host_mounts().get(name)
    if src is not None:
        try:
            return os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass
    fstype, data = mount_options(name)
    fsfd = _sys(NR_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC)
    if fsfd < 0:
        import ctypes
        if ctypes.get_errno() in (38, 1):        # ENOSYS (old kernel), EPERM (seccomp)
            return _open_hierarchy_by_mount(fstype, data, name)
        _raise(f"fsopen {fstype}")
    try:
        for word in filter(None, data.split(",")):
            if word == "none":
                continue
            key, eq, value = word.partition("=")
            if eq:
                r = _sys(NR_FSCONFIG, fsfd, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
            else:
                r = _sys(NR_FSCONFIG, fsfd, FSCONFIG_SET_FLAG, key.encode(), None, 0)
            if r < 0:
                _raise(f"{fstype} option {word}")
        if _sys(NR_FSCONFIG, fsfd, FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            _raise(f"mounting {fstype} {data}".rstrip())
        mfd = _sys(NR_FSMOUNT, fsfd, FSMOUNT_CLOEXEC, 0)
        if mfd < 0:
            _raise(f"fsmount {fstype} {data}".rstrip())
        return mfd
    finally:
        os.close(fsfd)


def temp_dir(prefix: str) -> str:
    """A new private directory in $TMPDIR or /tmp (tempfile costs ~10 ms to import)."""
    base = os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = os.path.join(base, f"{prefix}{os.urandom(6).hex()}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _open_hierarchy_by_mount(fstype: str, data: str, name: str) -> int:
    where = temp_dir("criu-py-cgmnt-")
    try:
        mount("none", where, fstype, 0, data or None)
        try:
            return os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            umount(where)
    finally:
        os.rmdir(where)


def hierarchy_error(name: str, exc: OSError) -> CriuError:
    return CriuError(f"cgroup controller {display(name)}: cannot mount its hierarchy "
                     f"({exc.strerror or exc}); this host lacks it or has it mounted "
                     f"with other controllers")
