# The restore half of cgroups: the "yard". Entering it reads cgroup.img, mounts a private
# tmpfs in a temporary directory with every needed hierarchy mounted inside (or uses the
# --cgroup-yard the user prepared), keeps it open as one fd, creates the missing cgroups
# and writes the properties that must precede the tasks, all per --manage-cgroups. Tasks
# then move themselves in through that fd (it survives fork) before they fork children;
# apply_properties() writes the rest once every task is restored and before any runs.
# Leaving it unmounts the yard; after a failure it also removes the cgroups it created.
import errno
import os
import time

from criu_py import cgroup as cg
from criu_py.errors import ImageError, RestoreError
from criu_py.log import log


class Dir:
    """A saved cgroup directory: absolute path in its hierarchy, perms (mode, uid, gid),
    properties [(name, value, perms or None)], children."""
    __slots__ = ("path", "perms", "props", "children")

    def __init__(self, path, perms, props, children):
        self.path, self.perms, self.props, self.children = path, perms, props, children


class Hierarchy:
    """One cg_controller_entry: where it sits in the yard and its saved directories."""

    def __init__(self, cnames: list[str], threaded: bool, heads: list[Dir]):
        self.cnames, self.threaded, self.heads = cnames, threaded, heads
        self.dir = cg.yard_dir(cnames)
        self.v2 = cnames == [""]
        self.mounted = False

    @property
    def name(self) -> str:
        return ",".join(self.cnames)

    def rel(self, path: str, leaf: str | None = None) -> str:
        """Path of cgroup `path` (or of its file `leaf`) relative to the yard."""
        out = self.dir + ("/" + path.strip("/") if path.strip("/") else "")
        return out + "/" + leaf if leaf else out


class Yard:
    """Context manager; see the module comment. `move(pid, cg_set)` and
    `move_thread(tid, cg_set)` may be called from forked children (they only write to
    files under the yard fd, `self.fd`); the rest runs in the restore process."""

    def __init__(self, opts: dict, images):
        from criu_py.cgroup.dump import parse_roots
        self.mode = opts.get("manage_cgroups") or cg.DEFAULT_MODE
        self.user_yard = opts.get("cgroup_yard")
        self.roots = parse_roots(opts.get("cgroup_root") or ())
        self.images = images
        self.active = False
        self.fd = -1
        self.path = None
        self.root_set = cg.ROOT_CG_SET
        self.hierarchies: list[Hierarchy] = []
        self.sets: dict[int, list] = {}         # id -> [(Hierarchy, member name, path)]
        self.created: list[tuple] = []          # (Hierarchy, path), in creation order
        self.late: list[tuple] = []             # (Hierarchy, Dir, [props]) for apply_properties
        self._mounts: list[str] = []            # what we mounted, to unmount
        self._tmpdir = None
        self._own: dict[str, str] = {}          # our cgroups: member name -> path
        self._plans: dict = {}

    # -------------------------------------------------------------- enter / exit
    def __enter__(self):
        if self.mode == "ignore" or not self.images.exists("cgroup.img"):
            return self
        entries = self.images.read_entries("cgroup.img")
        if not entries:
            return self
        inv = self.images.read_one("inventory.img")
        if inv.HasField("root_cg_set"):
            self.root_set = inv.root_cg_set
        self._load(entries[0])
        if not self.sets:
            return self
        self._rewrite_roots()
        try:
            self._mount()
            for h in self.hierarchies:
                if h.mounted:
                    for d in h.heads:
                        self._prepare(h, d, self._needed(d))
                    for _, name, path in (m for s in self.sets.values() for m in s if m[0] is h):
                        self._ensure(h, path, set())
        except BaseException:
            self._teardown(failed=True)
            raise
        self.active = True
        for s in self.sets:
            self._plan(s, self.root_set, False)       # forked children only write
        log.info("cgroups: yard %s ready (mode %s), %d cgroup(s) created", self.path,
                 self.mode, len(self.created))
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.fd >= 0 or self._mounts:
            self._teardown(failed=exc_type is not None)
        return False

    def _teardown(self, failed: bool) -> None:
        if failed:
            for h, path in reversed(self.created):
                self._rmdir(h, path)
            self.created.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for where in reversed(self._mounts):
            try:
                cg.umount(where)
            except OSError as exc:
                log.warning("cgroups: cannot unmount %s: %s", where, exc.strerror)
            if where != self._tmpdir:
                _rmdir_quiet(where)
        self._mounts.clear()
        if self._tmpdir:
            _rmdir_quiet(self._tmpdir)
            self._tmpdir = None
        self.active = False

    def _rmdir(self, h: Hierarchy, path: str) -> None:
        for _ in range(100):              # a killed task may take a moment to leave
            try:
                os.rmdir(h.rel(path), dir_fd=self.fd)
                log.info("cgroups: removed %s", cg.display(h.name, path))
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cgroups: cannot remove %s: %s", cg.display(h.name, path),
                                exc.strerror)
                    return
            time.sleep(0.01)
        log.warning("cgroups: cannot remove %s: busy", cg.display(h.name, path))

    # -------------------------------------------------------------- the image
    def _load(self, e) -> None:
        for c in e.controllers:
            cnames = list(c.cnames)
            if not cnames:
                raise ImageError("cgroup.img: a controller entry names no controller")
            heads = [self._dir(de, None) for de in c.dirs]
            self.hierarchies.append(Hierarchy(cnames, bool(c.is_threaded), heads))
        for s in e.sets:
            if s.id == 0 or s.id in self.sets:
                raise ImageError(f"cgroup.img: bad or repeated set id {s.id}")
            members = []
            for m in s.ctls:
                h = next((h for h in self.hierarchies if cg.contains(h.cnames, m.name)), None)
                if h is None:
                    raise ImageError(f"cgroup.img: set {s.id}: no controller entry for "
                                     f"{cg.display(m.name)}")
                members.append((h, m.name, _clean_path(m.path, f"set {s.id}")))
            self.sets[s.id] = members

    def _dir(self, de, parent: str | None) -> Dir:
        name = de.dir_name.strip("/") if parent is None else de.dir_name
        if parent is not None and not name:
            raise ImageError("cgroup.img: a directory without a name")
        path = _clean_path(("/" + name) if parent is None else cg.join(parent, name),
                           "a directory")
        props = []
        for p in de.properties:
            if not p.name or "/" in p.name or p.name in (".", ".."):
                raise ImageError(f"cgroup.img: bad property name {p.name!r} in {path}")
            props.append((p.name, p.value, _perms(p.perms) if p.HasField("perms") else None))
        perms = _perms(de.dir_perms) if de.HasField("dir_perms") else None
        return Dir(path, perms, props, [self._dir(c, path) for c in de.children])

    def _rewrite_roots(self) -> None:
        """--cgroup-root: the saved tree of each hierarchy (from the common ancestor of its
        top directories) goes under the new root; set members follow."""
        from criu_py.cgroup.dump import root_for
        for h in self.hierarchies:
            new = root_for(self.roots, h.cnames)
            if new is None:
                continue
            paths = [d.path for d in h.heads] or \
                    [p for s in self.sets.values() for hh, _, p in s if hh is h]
            if not paths:
                continue
            old = _common(paths)
            log.info("cgroups: %s: %s -> %s", cg.display(h.name), old, new)
            for d in h.heads:
                _move_tree(d, old, new)
            for members in self.sets.values():
                for i, (hh, name, path) in enumerate(members):
                    if hh is h and _under(path, old):
                        members[i] = (hh, name, _reroot(path, old, new))

    # -------------------------------------------------------------- mounting
    def _has_work(self, h: Hierarchy) -> bool:
        """Whether the yard needs hierarchy `h`: some task goes elsewhere than where the
        restore runs, or a saved directory is not a hierarchy's root (roots get nothing
        written). Skipping the others saves a mount each."""
        own = self._own_cgroups()
        if any(hh is h and own.get(name) != path
               for s in self.sets.values() for hh, name, path in s):
            return True
        return any(d.path != "/" or d.children for d in h.heads)

    def _mount(self) -> None:
        used = {id(h) for s in self.sets.values() for h, _, _ in s
                if self._has_work(h)}
        if self.user_yard:
            self.path = self.user_yard
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise RestoreError(f"--cgroup-yard {self.path}: {exc.strerror}") from None
        else:
            self.path = self._tmpdir = cg.temp_dir("criu-py-cgyard-")
            try:
                cg.mount("none", self.path, "tmpfs", 0, "mode=700")
            except OSError as exc:
                raise RestoreError(f"cgroup yard: cannot mount a tmpfs on {self.path}: "
                                   f"{exc.strerror}") from None
            self._mounts.append(self.path)
            cg.mount("none", self.path, None, cg.MS_PRIVATE)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for h in self.hierarchies:
            if id(h) not in used:
                continue
            where = os.path.join(self.path, h.dir)
            if self.user_yard and os.path.isdir(where):
                h.mounted = True
                continue
            os.mkdir(where, 0o700)
            try:
                cg.attach_hierarchy(h.name, where)
            except OSError as exc:
                _rmdir_quiet(where)
                raise RestoreError(str(cg.hierarchy_error(h.name, exc))) from None
            self._mounts.append(where)
            h.mounted = True
        log.debug("cgroups: yard %s: %s", self.path, ", ".join(h.dir for h in self.hierarchies
                                                              if h.mounted))

    # -------------------------------------------------------------- directories
    def _needed(self, d: Dir) -> set:
        """v2 controllers the directory uses (its files' prefixes, and what it enables
        for its children): a parent the restore creates must enable them."""
        out = set()
        for name, value, _ in d.props:
            prefix = name.split(".", 1)[0]
            if name == "cgroup.subtree_control":
                out.update(w.lstrip("+") for w in value.split())
            elif prefix != "cgroup" and name not in ("tasks", "notify_on_release"):
                out.add(prefix)
        return out

    def _ensure(self, h: Hierarchy, path: str, needed: set) -> bool:
        """Make `path` exist (and every missing parent); True when `path` itself was
        made. Parents made here enable `needed` (v2). Refused in none/props modes."""
        made = False
        cur = "/"
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            cur = cg.join(cur, part)
            rel = h.rel(cur)
            try:
                os.stat(rel, dir_fd=self.fd)
                made = False
                continue
            except FileNotFoundError:
                pass
            if self.mode in ("none", "props"):
                raise RestoreError(f"cgroup {cg.display(h.name, cur)} does not exist "
                                   f"(--manage-cgroups={self.mode} creates none)")
            try:
                os.mkdir(rel, 0o755, dir_fd=self.fd)
            except OSError as exc:
                raise RestoreError(f"cgroup {cg.display(h.name, cur)}: cannot create it: "
                                   f"{exc.strerror}") from None
            self.created.append((h, cur))
            log.info("cgroups: created %s", cg.display(h.name, cur))
            made = True
            if h.v2 and needed and i < len(parts) - 1:
                self._write(h, cur, "cgroup.subtree_control", " ".join(sorted(needed)))
        return made

    def _prepare(self, h: Hierarchy, d: Dir, needed: set) -> None:
        from criu_py.cgroup.props import EARLY, LATE_TOO
        made = self._ensure(h, d.path, needed)
        root = d.path == "/"
        if made:
            self._chperm(h, d.path, None, d.perms)
            for name, value, perms in d.props:
                if name in EARLY:
                    self._write_early(h, d.path, name, value)
                self._chperm(h, d.path, name, perms)
            late = [p for p in d.props if p[0] not in EARLY]
        elif root:
            late = []
        elif self.mode == "strict":
            self._compare(h, d)
            self._chperm(h, d.path, None, d.perms)
            late = []
        elif self.mode in ("full", "props"):
            self._chperm(h, d.path, None, d.perms)
            late = [p for p in d.props if p[0] not in EARLY or p[0] in LATE_TOO]
        else:                                        # soft, none: leave it as it is
            if self.mode == "soft":
                self._chperm(h, d.path, None, d.perms)
            late = []
        from criu_py.cgroup.props import MEMBERSHIP
        late = [p for p in late if p[0] not in MEMBERSHIP]
        if late:
            self.late.append((h, d, late))
        for child in d.children:
            self._prepare(h, child, set())

    def _compare(self, h: Hierarchy, d: Dir) -> None:
        """strict: a cgroup that exists must hold what the images say."""
        from criu_py.cgroup.dump import normalize
        from criu_py.cgroup.props import MEMBERSHIP
        for name, value, _ in d.props:
            if name in MEMBERSHIP:
                continue
            try:
                now = normalize(name, self._read(h, d.path, name))
            except OSError as exc:
                raise RestoreError(f"cgroup {cg.display(h.name, d.path)}: cannot read {name}: "
                                   f"{exc.strerror}") from None
            same = sorted(now.split()) == sorted(value.split()) if name == "cgroup.subtree_control" \
                else now == value
            if not same:
                raise RestoreError(f"cgroup {cg.display(h.name, d.path)} exists with {name} "
                                   f"{now!r}, the images have {value!r} "
                                   f"(--manage-cgroups=strict)")

    # -------------------------------------------------------------- properties
    def apply_properties(self) -> None:
        """The properties not written at creation (limits and the like), parents first.
        Call once every task is restored and before any of them runs on."""
        if not self.active:
            return
        t0 = time.monotonic()
        n = 0
        for h, d, props in self.late:
            for name, value, perms in props:
                self._write_late(h, d.path, name, value)
                self._chperm(h, d.path, name, perms)
                n += 1
        log.info("cgroups: %d properties written in %.2f ms", n, (time.monotonic() - t0) * 1e3)

    def _write_early(self, h, path, name, value) -> None:
        if name == "memory.swappiness" and value == "60":
            return
        if name == "memory.oom_control" and value == "0":
            return
        if name == "devices.list":
            self._write(h, path, "devices.deny", "a")
            if value:
                for line in value.splitlines():
                    self._write(h, path, "devices.allow", line)
            return
        if name == "cgroup.type" and value != "threaded":
            return
        self._write_late(h, path, name, value)

    def _write_late(self, h, path, name, value) -> None:
        from criu_py.cgroup.props import BY_LINE
        if name == "cgroup.subtree_control":
            now = set(self._read(h, path, name).split())
            want = set(value.split())
            change = [f"-{c}" for c in sorted(now - want)] + [f"+{c}" for c in sorted(want - now)]
            if change:
                self._write(h, path, name, " ".join(change))
            return
        if name == "cgroup.type" and value != "threaded":
            return
        if name == "net_prio.ifpriomap":
            for line in value.splitlines():
                if line.split()[-1:] != ["0"]:
                    self._write(h, path, name, line, tolerate=True)
            return
        if name in BY_LINE:
            for line in value.splitlines():
                self._write(h, path, name, line)
            return
        self._write(h, path, name, value)

    def _write(self, h, path, name, value, tolerate: bool = False) -> None:
        log.debug("cgroups: %s: %s = %r", cg.display(h.name, path), name, value)
        try:
            fd = os.open(h.rel(path, name), os.O_WRONLY | os.O_CLOEXEC, dir_fd=self.fd)
            try:
                os.write(fd, value.encode(errors="surrogateescape"))
            finally:
                os.close(fd)
        except OSError as exc:
            if name == "memory.kmem.limit_in_bytes" and exc.errno == errno.EOPNOTSUPP:
                return                          # gone from cgroup v1 in newer kernels
            if tolerate:
                log.warning("cgroups: %s: %s = %r: %s", cg.display(h.name, path), name, value,
                            exc.strerror)
                return
            raise RestoreError(f"cgroup {cg.display(h.name, path)}: cannot set {name} to "
                               f"{value!r}: {exc.strerror}") from None

    def _read(self, h, path, name) -> str:
        fd = os.open(h.rel(path, name), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            return os.read(fd, 1 << 20).decode(errors="surrogateescape")
        finally:
            os.close(fd)

    def _chperm(self, h, path, name, perms) -> None:
        """Owner and mode as saved, when they differ (never on a hierarchy's root)."""
        if perms is None or path == "/" and name is None:
            return
        mode, uid, gid = perms
        try:
            fd = os.open(h.rel(path, name), os.O_RDONLY | os.O_CLOEXEC | os.O_PATH, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT and name is not None:
                return
            raise RestoreError(f"cgroup {cg.display(h.name, path)}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            where = f"/proc/self/fd/{fd}"
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.chown(where, uid, gid)
            if st.st_mode & 0o7777 != mode & 0o7777:
                os.chmod(where, mode & 0o7777)
        except OSError as exc:
            raise RestoreError(f"cgroup {cg.display(h.name, path)}: cannot restore the owner "
                               f"and mode of {name or 'the directory'}: {exc.strerror}") from None
        finally:
            os.close(fd)

    # -------------------------------------------------------------- moving tasks
    def _plan(self, cg_set: int, current: int | None, threads: bool) -> list:
        """Files to write to move a task (or thread) from set `current` into `cg_set`:
        one per hierarchy where the two differ."""
        key = (cg_set, current, threads)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        members = self._members_list(cg_set)
        here = self._members(current)
        plan = []
        for h, name, path in members:
            if here.get(name) == path:
                continue
            if threads:
                if not h.threaded:
                    continue
                leaf = "cgroup.threads" if h.v2 else "tasks"
            else:
                leaf = "cgroup.procs"
            plan.append((h.rel(path, leaf), cg.display(name, path)))
        self._plans[key] = plan
        return plan

    def _own_cgroups(self) -> dict:
        if not self._own:
            from criu_py import proc
            self._own = {line.controllers: line.path for line in proc.read_cgroup(os.getpid())}
        return self._own

    def _members_list(self, cg_set: int) -> list:
        """[(Hierarchy, name, path)] of a set; the root set is where the restore runs."""
        if cg_set == self.root_set and cg_set not in self.sets:
            out = []
            for name, path in self._own_cgroups().items():
                h = next((h for h in self.hierarchies if h.mounted and cg.contains(h.cnames, name)),
                         None)
                if h is not None:
                    out.append((h, name, path))
            return out
        members = self.sets.get(cg_set)
        if members is None:
            raise RestoreError(f"cgroup set {cg_set} is not in cgroup.img")
        return members

    def _members(self, cg_set: int) -> dict:
        if cg_set == self.root_set and cg_set not in self.sets:
            return self._own_cgroups()
        return {name: path for _, name, path in self.sets.get(cg_set, ())}

    def move(self, pid: int, cg_set: int, parent_set: int | None = None) -> None:
        """Move process `pid` (0: the caller) into set `cg_set`, from the set of its
        parent (`parent_set`; None: the restore process's own cgroups). Call in the task
        right after it is forked and before it forks children, so that they are born in
        place."""
        current = self.root_set if parent_set is None else parent_set
        if not self.active or not cg_set or cg_set == current:
            return
        for rel, what in self._plan(cg_set, current, False):
            self._put(rel, pid, what, "pid")

    def move_thread(self, tid: int, cg_set: int, process_set: int) -> None:
        """Move thread `tid` into set `cg_set` on the hierarchies that place threads one by
        one (v1, v2 threaded); its process is already in `process_set`."""
        if not self.active or not cg_set or cg_set == process_set:
            return
        for rel, what in self._plan(cg_set, process_set, True):
            self._put(rel, tid, what, "thread")

    def _put(self, rel: str, pid: int, what: str, kind: str) -> None:
        try:
            fd = os.open(rel, os.O_WRONLY | os.O_CLOEXEC, dir_fd=self.fd)
            try:
                os.write(fd, str(pid).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise RestoreError(f"cannot move {kind} {pid or os.getpid()} into cgroup {what}: "
                               f"{exc.strerror}") from None


def open_yard(opts: dict, images) -> Yard:
    """The yard for a restore: `with open_yard(opts, images) as yard: ...`."""
    return Yard(opts, images)


def task_cg_set(core) -> int:
    """The set a task's core names (thread_core.cg_set as upstream 4.2 writes it, else
    tc.cg_set); 0 when none."""
    if core.HasField("thread_core") and core.thread_core.HasField("cg_set"):
        return core.thread_core.cg_set
    if core.HasField("tc") and core.tc.HasField("cg_set"):
        return core.tc.cg_set
    return 0


# ------------------------------------------------------------------ paths
def _clean_path(path: str, what: str) -> str:
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or any(p in (".", "..") for p in parts):
        raise ImageError(f"cgroup.img: {what}: bad cgroup path {path!r}")
    return "/" + "/".join(parts)


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def _reroot(path: str, old: str, new: str) -> str:
    rest = path[len(old):] if old != "/" else path
    return "/" + "/".join(p for p in (new + "/" + rest).split("/") if p)


def _move_tree(d: Dir, old: str, new: str) -> None:
    d.path = _reroot(d.path, old, new)
    for c in d.children:
        _move_tree(c, old, new)


def _common(paths: list[str]) -> str:
    split = [[p for p in path.split("/") if p] for path in paths]
    out = []
    for parts in zip(*split):
        if any(p != parts[0] for p in parts):
            break
        out.append(parts[0])
    return "/" + "/".join(out)


def _perms(p) -> tuple:
    return (p.mode, p.uid, p.gid)


def _rmdir_quiet(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
