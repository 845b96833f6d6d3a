# The dump half of cgroups: for each task, its cgroup on every hierarchy (a "set", one id
# per distinct combination, the id going into the task's core), and for each hierarchy the
# directory tree under the tasks' cgroups with the properties of every directory, written
# to cgroup.img as CRIU does. The hierarchies are read through mounts of our own that
# appear in no mount table (see cgroup.open_hierarchy), or through --cgroup-yard.
import errno
import os
import stat

from criu_py import cgroup as cg
from criu_py.errors import DumpError, from_oserror
from criu_py.log import log

LLONG_MAX = (1 << 63) - 1
# A property that cannot be read for one of these reasons is left out (the kernel has the
# file but not the feature behind it), others fail the dump.
SKIP_READ_ERRORS = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV, errno.ENXIO)


class Controller:
    """One hierarchy: its controllers as cg_controller_entry.cnames and the directories
    saved from it (absolute path -> Dir)."""

    def __init__(self, cnames: list[str]):
        self.cnames = cnames
        self.dirs: dict[str, "Dir"] = {}
        self.threaded = False

    @property
    def name(self) -> str:
        return ",".join(self.cnames)


class Dir:
    __slots__ = ("path", "st", "props")

    def __init__(self, path, st, props):
        self.path, self.st, self.props = path, st, props


def dump_cgroups(pids, opts: dict, images, threads: dict | None = None,
                 known: dict | None = None) -> dict:
    """The cg_set id of every task in `pids` (and of every thread in `threads`, {pid:
    [tid]}), as {pid or tid: id}. Writes cgroup.img unless every task lives in the cgroups
    of criu-py itself (as upstream: then there is nothing to restore). known: {pid:
    proc.read_cgroup(pid)} already read."""
    from criu_py import proc
    from criu_py.cgroup.props import PropsConfig
    config = PropsConfig(opts.get("cgroup_props"), opts.get("cgroup_props_file"),
                         opts.get("cgroup_dump_controller") or ())
    d = CgroupDump(config, opts)
    d.add_set(_members(proc.read_cgroup(os.getpid()), config), walk=False)   # id 1: ours
    for line in proc.read_cgroup(os.getpid()):
        if not config.skip(line.controllers) and not line.controllers.startswith("name="):
            d.controllers.append(Controller(line.controllers.split(",")))
    out = {}
    try:
        for pid in pids:
            lines = (known or {}).get(pid) or proc.read_cgroup(pid)
            out[pid] = d.add_set(_members(lines, config), who=f"pid {pid}")
            for tid in (threads or {}).get(pid, ()):
                if tid != pid:
                    out[tid] = d.add_set(_members(proc.read_cgroup(pid, tid), config),
                                         who=f"thread {tid}")
    finally:
        d.close()
    if len(d.sets) > 1:
        images.write_entries("cgroup.img", [d.entry()])
        log.info("cgroups: %d set(s) besides ours, %d directories", len(d.sets) - 1,
                 sum(len(c.dirs) for c in d.controllers))
    else:
        log.info("cgroups: every task lives in criu-py's own cgroups, nothing to dump")
    return out


def _members(lines, config) -> tuple:
    """(name, path) of every hierarchy not filtered out, sorted by name as CRIU does."""
    return tuple(sorted((line.controllers, line.path) for line in lines
                        if not config.skip(line.controllers)))


class CgroupDump:
    def __init__(self, config, opts):
        self.config = config
        self.walk = (opts.get("manage_cgroups") or cg.DEFAULT_MODE) != "ignore"
        self.yard = opts.get("cgroup_yard")
        self.roots = parse_roots(opts.get("cgroup_root") or ())
        self.sets: dict[tuple, int] = {}
        self.controllers: list[Controller] = []
        self._fds: dict[str, int] = {}

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def add_set(self, members: tuple, walk: bool = True, who: str = "") -> int:
        found = self.sets.get(members)
        if found is not None:
            return found
        sid = self.sets[members] = len(self.sets) + 1
        log.debug("cgroups: set %d (%s): %s", sid, who or "criu-py",
                  " ".join(f"{cg.display(n, p)}" for n, p in members))
        if walk:
            for name, path in members:
                self.collect(self.controller(name, who), name, path)
        return sid

    def controller(self, name: str, who: str) -> Controller:
        for c in self.controllers:
            if cg.contains(c.cnames, name):
                return c
        if name.startswith("name="):
            c = Controller([name])
            self.controllers.append(c)
            return c
        raise DumpError(f"{who}: cgroup controller {cg.display(name)} is not in criu-py's "
                        f"own /proc/self/cgroup")

    def hierarchy_fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            if self.yard:
                where = os.path.join(self.yard, cg.yard_dir(name.split(",")))
                try:
                    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    raise DumpError(f"--cgroup-yard: cannot open {where}: {exc.strerror}") from None
            else:
                try:
                    fd = cg.open_hierarchy(name)
                except OSError as exc:
                    raise cg.hierarchy_error(name, exc) from None
            self._fds[name] = fd
        return fd

    def collect(self, ctrl: Controller, name: str, path: str) -> None:
        """Save `path` and everything below it (the root given by --cgroup-root instead,
        when one names this hierarchy)."""
        if not self.walk:
            return
        root = root_for(self.roots, ctrl.cnames) or path
        if root in ctrl.dirs:
            return
        self._walk(ctrl, self.hierarchy_fd(name), root, top=True)

    def _walk(self, ctrl: Controller, hfd: int, path: str, top: bool = False) -> None:
        try:
            dfd = os.open(cg.rel(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=hfd)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not top:
                return                                  # removed while we walked
            raise DumpError(f"cgroup {cg.display(ctrl.name, path)}: {exc.strerror}") from None
        try:
            if path not in ctrl.dirs:
                st = os.fstat(dfd)
                names = set(os.listdir(dfd))
                ctrl.dirs[path] = Dir(path, st, self.read_props(ctrl, dfd, path, names))
            subdirs = sorted(e.name for e in os.scandir(dfd) if e.is_dir(follow_symlinks=False))
        finally:
            os.close(dfd)
        for sub in subdirs:
            self._walk(ctrl, hfd, cg.join(path, sub))

    def read_props(self, ctrl: Controller, dfd: int, path: str, names: set) -> list:
        if ctrl.cnames == [""]:
            enabled = _read(dfd, "cgroup.controllers").split() if "cgroup.controllers" in names else []
            wanted = [p for c in enabled for p in self.config.props_of(c)]
            wanted += _global(True)
        else:
            wanted = [p for c in ctrl.cnames for p in self.config.props_of(c)]
            wanted += _global(False)
        out = []
        for prop in _expand(wanted, names):
            try:
                fd = os.open(prop, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise _read_error(ctrl, path, prop, exc) from None
            try:
                st = os.fstat(fd)
                if prop in ("cgroup.procs", "tasks"):
                    value = ""                          # only its permissions count
                else:
                    value = _read_fd(fd)
            except OSError as exc:
                if exc.errno in SKIP_READ_ERRORS:
                    log.info("cgroups: %s: %s not readable (%s), left out",
                             cg.display(ctrl.name, path), prop, exc.strerror)
                    continue
                raise _read_error(ctrl, path, prop, exc) from None
            finally:
                os.close(fd)
            value = normalize(prop, value)
            if prop == "tasks" or (prop == "cgroup.type" and value == "threaded"):
                ctrl.threaded = True
            out.append((prop, value, st))
        return out

    # -------------------------------------------------------------- the image
    def entry(self):
        from criu_py.images.pb import cgroup_pb2
        e = cgroup_pb2.cgroup_entry()
        for members, sid in sorted(self.sets.items(), key=lambda kv: kv[1]):
            if sid == cg.ROOT_CG_SET:
                continue
            s = e.sets.add()
            s.id = sid
            for name, path in members:
                m = s.ctls.add()
                m.name, m.path = name, path
        for ctrl in self.controllers:
            c = e.controllers.add()
            c.cnames.extend(ctrl.cnames)
            c.is_threaded = ctrl.threaded
            children = {}
            for path in sorted(ctrl.dirs):
                children.setdefault(_parent(path, ctrl.dirs), []).append(path)
            for path in children.get(None, ()):
                _fill_dir(c.dirs.add(), ctrl.dirs, children, path, "")
        return e


def _global(v2: bool) -> list[str]:
    from criu_py.cgroup.props import GLOBAL_V1, GLOBAL_V2
    return GLOBAL_V2 if v2 else GLOBAL_V1


def _expand(wanted: list[str], names: set) -> list[str]:
    import fnmatch
    out, seen = [], set()
    for pattern in wanted:
        if any(ch in pattern for ch in "*?["):
            found = sorted(fnmatch.filter(names, pattern))
        else:
            found = [pattern] if pattern in names else []
        for name in found:
            if name not in seen:
                seen.add(name)
                out.append(name)
    return out


def _read_fd(fd: int) -> str:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks).decode(errors="surrogateescape")
        chunks.append(chunk)


def _read(dfd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_error(ctrl, path, prop, exc):
    return from_oserror(exc, f"cgroup {cg.display(ctrl.name, path)}: reading {prop}")


def normalize(prop: str, value: str) -> str:
    """A property's text as CRIU saves it: without the final newline, a number at or
    beyond LLONG_MAX as -1, memory.oom_control as its oom_kill_disable flag."""
    if value.endswith("\n"):
        value = value[:-1]
    if prop == "memory.oom_control":
        for line in value.splitlines():
            key, _, flag = line.partition(" ")
            if key == "oom_kill_disable":
                return flag.strip()
        return value
    digits = value.lstrip()
    sign = digits[:1] if digits[:1] in "+-" else ""
    digits = digits[len(sign):]
    n = len(digits) - len(digits.lstrip("0123456789"))
    if n and sign != "-" and int(digits[:n]) >= LLONG_MAX:
        return "-1"
    return value


def _parent(path: str, dirs: dict) -> str | None:
    """The nearest saved ancestor of `path`."""
    while path != "/":
        path = os.path.dirname(path)
        if path in dirs:
            return path
    return None


def _fill_dir(e, dirs: dict, children: dict, path: str, parent: str) -> None:
    d = dirs[path]
    e.dir_name = path.lstrip("/") if not parent else os.path.relpath(path, parent)
    _perms(e.dir_perms, d.st)
    for name, value, st in d.props:
        p = e.properties.add()
        p.name, p.value = name, value
        _perms(p.perms, st)
    for child in children.get(path, ()):
        _fill_dir(e.children.add(), dirs, children, child, path)


def _perms(e, st) -> None:
    e.mode, e.uid, e.gid = st.st_mode, st.st_uid, st.st_gid


# ------------------------------------------------------------------ --cgroup-root
def parse_roots(values) -> list[tuple[str | None, str]]:
    """--cgroup-root [controller:]/path values -> [(controller or None, path)]. The path
    must be absolute; "" (or "unified") as controller means cgroup2."""
    from criu_py.errors import CriuError
    out = []
    for value in values:
        ctl, sep, path = value.partition(":")
        if not sep:
            ctl, path = None, value
        if not path.startswith("/"):
            raise CriuError(f"--cgroup-root {value}: the new root must be an absolute path")
        path = "/" + "/".join(p for p in path.split("/") if p)
        if any(p in (".", "..") for p in path.split("/")):
            raise CriuError(f"--cgroup-root {value}: '.' and '..' are not allowed")
        out.append(("" if ctl == "unified" else ctl, path))
    return out


def root_for(roots, cnames) -> str | None:
    """The new root --cgroup-root gives hierarchy `cnames`: the last option naming one
    of its controllers, else the last one without a controller."""
    chosen = None
    for ctl, path in roots:
        if ctl is not None and _names_hierarchy(ctl, cnames):
            chosen = path
    if chosen is None:
        for ctl, path in roots:
            if ctl is None:
                chosen = path
    return chosen


def _names_hierarchy(ctl: str, cnames) -> bool:
    if list(cnames) == [""]:
        return ctl == ""
    return bool(ctl) and any(c in ctl.split(",") for c in cnames)
