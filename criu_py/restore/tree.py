# How the dumped tree is rebuilt, decided in the restore command before anything is
# forked (every task inherits the plan through fork):
# - who forks whom, and when: sessions are inherited at fork, so a task forks the
#   children that stay in its old session before it calls setsid(); a session or process
#   group whose leader is gone gets a short-lived helper task with the leader's pid, as
#   CRIU does (the helper's children are then reparented to their dumped parent, a
#   child subreaper);
# - which children share their parent's fd table or fs (CLONE_FILES / CLONE_FS);
# - which task opens each resource that several fd tables or address spaces share (an
#   inherited open file description, a pipe, a shared memory object): the lowest common
#   ancestor of its users, before it forks them, so that they inherit the very same one;
# - which private VMAs a child still shares copy-on-write with its parent: the parent
#   maps and fills them before forking, the child keeps the pages that did not change.
from reprlib import recursive_repr

from criu_py.errors import ImageError, Unsupported
from criu_py.proc import Record

ALIVE, ZOMBIE, HELPER = "alive", "zombie", "helper"
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND, CLONE_VFORK = 0x100, 0x200, 0x400, 0x800, 0x4000
NR_VFORK, NR_CLONE = 58, 56


class RTask(Record):
    """One task of the restore tree. img: its TaskImages (None for helpers). Compared
    and hashed by identity (tasks are set members and dict keys)."""
    _fields = ("pid", "kind", "sid", "pgid", "img", "parent", "children", "born_sid", "clone_flags",
               "subreaper", "opens", "premap", "inherits", "exit_code", "in_parent_mm", "mm_child",
               "ctty")
    __eq__ = object.__eq__
    __hash__ = object.__hash__
    __repr__ = recursive_repr()(Record.__repr__)   # parent <-> children cycles

    def __init__(self, pid: int, kind: str, sid: int, pgid: int, img=None,
                 parent: "RTask | None" = None, children: list | None = None,
                 born_sid: int | None = None, clone_flags: int = 0, subreaper: bool = False,
                 opens: list | None = None, premap: list | None = None,
                 inherits: dict | None = None, exit_code: int = 0, in_parent_mm: bool = False,
                 mm_child: "RTask | None" = None, ctty: tuple | None = None):
        self.pid = pid
        self.kind = kind
        self.sid = sid
        self.pgid = pgid
        self.img = img
        self.parent = parent
        self.children = [] if children is None else children
        self.born_sid = born_sid             # the session it must be born in, when not its parent's final one
        self.clone_flags = clone_flags       # CLONE_FILES / CLONE_FS shared with the parent
        self.subreaper = subreaper
        self.opens = [] if opens is None else opens          # resource keys it opens before forking
        self.premap = [] if premap is None else premap       # vma_entry it maps and fills before forking
        self.inherits = {} if inherits is None else inherits  # vma start -> the parent's VMA it inherits
        self.exit_code = exit_code           # zombies
        self.in_parent_mm = in_parent_mm     # runs in its parent's memory: made by the parent's restorer
        self.mm_child = mm_child             # such a child of this task
        self.ctty = ctty                     # (pty index, foreground group, caller's terminal)
                                             # of the session it leads

    @property
    def files_owner(self) -> bool:
        return self.kind == ALIVE and not self.clone_flags & CLONE_FILES

    @property
    def fs_owner(self) -> bool:
        return self.kind == ALIVE and not self.clone_flags & CLONE_FS

    def ancestors(self):
        p = self.parent
        while p is not None:
            yield p
            p = p.parent

    @property
    def required_session(self) -> int | None:
        """The session this task must be born in: its own final one unless it calls
        setsid() (then only what it forks before that matters)."""
        if self.sid != self.pid:
            return self.sid
        return self.born_sid

    def forks_before_setsid(self, child: "RTask") -> bool:
        """A session leader forks the children that need its old session first."""
        return self.sid == self.pid and child.required_session not in (None, self.sid)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


class TreePlan(Record):
    _fields = ("root", "tasks", "resources", "armers", "repairers")

    def __init__(self, root: RTask, tasks: dict, resources: dict | None = None,
                 armers: dict | None = None, repairers: dict | None = None):
        self.root = root
        self.tasks = tasks                   # pid -> RTask (helpers included)
        self.resources = {} if resources is None else resources   # key -> Resource
        self.armers = {} if armers is None else armers   # timerfd files.img id -> pid whose restorer arms it
        # TCP connection files.img id -> pid whose restorer takes it out of repair mode
        self.repairers = {} if repairers is None else repairers

    @property
    def all(self) -> list:
        return list(self.root.walk())

    @property
    def alive(self) -> list:
        return [t for t in self.root.walk() if t.kind == ALIVE]

    @property
    def forked(self) -> list:
        """Every task forked in Python (all but children sharing their parent's memory)."""
        return [t for t in self.root.walk() if not t.in_parent_mm]


class Resource(Record):
    """Something several tasks must get the very same instance of. kind: "file" (one
    files.img id), "pipe" (every files.img id of one pipe_id), "tty" (every end of one
    pty), "shmem" (a shared memory object); ids: the files.img ids or the shmid (shmem)."""
    _fields = ("key", "kind", "ids", "users", "opener")

    def __init__(self, key: tuple, kind: str, ids: list, users: set | None = None,
                 opener: RTask | None = None):
        self.key = key
        self.kind = kind
        self.ids = ids
        self.users = set() if users is None else users   # RTask
        self.opener = opener


def plan_tree(tree, root_sid: int, root_pgid: int) -> TreePlan:
    """The restore tree for TreeImages `tree`. root_sid/root_pgid: the restore
    command's own session and group (what the root inherits)."""
    tasks = {}
    root = None
    for ti in tree.tasks:
        e = ti.pstree
        t = RTask(pid=ti.pid, kind=ZOMBIE if ti.zombie else ALIVE, sid=e.sid, pgid=e.pgid, img=ti)
        if ti.zombie:
            t.exit_code = ti.core.tc.exit_code
        else:
            t.subreaper = bool(ti.core.tc.child_subreaper)
        if root is None:
            root = t
        else:
            t.parent = tasks[e.ppid]
            if t.parent.kind == ZOMBIE:
                raise ImageError(f"pstree.img: pid {t.pid} has the zombie {e.ppid} as its parent")
            t.parent.children.append(t)
        tasks[t.pid] = t
    plan = TreePlan(root=root, tasks=tasks)
    _plan_sessions(plan, root_sid)
    _plan_groups(plan, root_pgid)
    _plan_sharing(plan)
    _plan_resources(plan, tree)
    _plan_armers(plan, tree)
    _plan_cow(plan)
    return plan


def _plan_armers(plan: TreePlan, tree) -> None:
    """Each timerfd is armed by the restorer of the first task (pstree order) whose fd
    table holds it, as late as possible; one held by no table is armed when opened.
    Likewise each TCP connection restored in repair mode is taken out of it."""
    for t in plan.alive:
        if not t.files_owner or t.in_parent_mm:
            continue
        for fi in t.img.fdinfos:
            fe = tree.files[fi.id]
            if fe.HasField("tfd"):
                plan.armers.setdefault(fi.id, t.pid)
            elif fe.HasField("isk") and fe.isk.proto == 6 and fe.isk.dst_port and fe.isk.state != 10:
                plan.repairers.setdefault(fi.id, t.pid)


# ---------------------------------------------------------------- sessions, groups
def _needs_session(x: RTask, sid: int, root_sid: int) -> bool:
    """Make x be in session `sid` at the time it forks a child that needs it."""
    while True:
        if x.sid == sid:
            return True
        if x.sid != x.pid:
            return False          # x never changes its session, and it is another one
        # x calls setsid(); before that it is in the session it was born in
        if x.born_sid not in (None, sid):
            return False
        x.born_sid = sid
        if x.parent is None:
            return sid == root_sid
        x = x.parent


def _plan_sessions(plan: TreePlan, root_sid: int) -> None:
    root = plan.root
    if root.sid != root.pid and root.sid != root_sid:
        raise Unsupported(f"pid {root.pid} was in session {root.sid}, which is neither its "
                          f"own nor this shell's: restore it from that session (--shell-job)")
    for t in list(root.walk()):
        if t is root or t.sid == t.pid or t.sid == t.parent.sid:
            continue
        if _needs_session(t.parent, t.sid, root_sid):
            continue
        # The session leader is gone: a helper with its pid, forked by t's parent, calls
        # setsid() and forks t, then exits; t goes back to its parent, a subreaper.
        p = t.parent
        helper = plan.tasks.get(t.sid)
        if helper is not None and (helper.kind != HELPER or helper.parent is not p):
            raise Unsupported(f"pid {t.pid}: its session {t.sid} cannot be recreated "
                              f"(its leader is not among its ancestors)")
        if not p.subreaper:
            raise Unsupported(f"pid {t.pid}: its session {t.sid} lost its leader and its "
                              f"parent {p.pid} is not a child subreaper")
        if helper is None:
            helper = RTask(pid=t.sid, kind=HELPER, sid=t.sid, pgid=t.sid, parent=p)
            p.children.append(helper)
            plan.tasks[helper.pid] = helper
        p.children.remove(t)
        t.parent = helper
        helper.children.append(t)


def _plan_groups(plan: TreePlan, root_pgid: int) -> None:
    for t in list(plan.root.walk()):
        if t.pgid == t.pid or t.pgid in plan.tasks or t.pgid == root_pgid and t.sid == plan.root.sid:
            continue
        # The group leader is gone: a helper with its pid, forked by t itself (so it is in
        # t's session), makes the group, t joins it, the helper exits and t reaps it.
        helper = RTask(pid=t.pgid, kind=HELPER, sid=t.sid, pgid=t.pgid, parent=t)
        t.children.insert(0, helper)
        plan.tasks[helper.pid] = helper
    for t in plan.root.walk():
        if t.kind == HELPER or t.pgid == t.pid:
            continue
        leader = plan.tasks.get(t.pgid)
        if leader is not None and leader.sid != t.sid:
            raise ImageError(f"pstree.img: pid {t.pid} is in group {t.pgid} of another session")


# ---------------------------------------------------------------- sharing
def _plan_sharing(plan: TreePlan) -> None:
    """CLONE_FILES / CLONE_FS with the parent where the dump saw one fd table or one fs
    for both; sharing between tasks that are not parent and child, and shared memory or
    signal handlers between processes, cannot be recreated."""
    owners = {}
    for t in plan.root.walk():
        if t.kind != ALIVE:
            continue
        ids = t.img.ids
        p = t.parent
        for kind, flag in (("files", CLONE_FILES), ("fs", CLONE_FS), ("vm", 0), ("sighand", 0)):
            value = getattr(ids, f"{kind}_id")
            first = owners.get((kind, value))
            if first is None:
                owners[(kind, value)] = t
                continue
            same_as_parent = p is not None and p.kind == ALIVE and \
                getattr(p.img.ids, f"{kind}_id") == value
            if flag and same_as_parent:
                t.clone_flags |= flag
                continue
            if kind == "vm" and same_as_parent:
                _share_mm(p, t)
                continue
            if kind == "sighand" and same_as_parent and t.in_parent_mm:
                t.clone_flags |= CLONE_SIGHAND
                continue
            what = {"files": "fd table", "fs": "fs (cwd, root, umask)", "vm": "memory",
                    "sighand": "signal handlers"}[kind]
            raise Unsupported(f"pid {t.pid} shares its {what} with pid {first.pid}, which "
                              f"this restore cannot recreate")


def _share_mm(p: RTask, t: RTask) -> None:
    """t runs in p's memory (vfork(), clone(CLONE_VM)): p's restorer makes it, with
    CLONE_VFORK when p was asleep in vfork() for it (its registers show the return with
    t's pid). t can have no children (no Python runs in it to fork them); a vfork parent
    must be single-threaded."""
    gp = p.img.core.thread_info.gpregs
    vfork = gp.ax == t.pid and (gp.orig_ax == NR_VFORK or
                                gp.orig_ax == NR_CLONE and gp.di & CLONE_VFORK)
    if p.mm_child is not None or (vfork and len(p.img.threads) != 1):
        raise Unsupported(f"pid {t.pid} shares its memory with pid {p.pid}, which this "
                          f"restore cannot recreate")
    if t.children:
        raise Unsupported(f"pid {t.pid}, which runs in its parent's memory, has children: "
                          f"not supported")
    t.in_parent_mm, p.mm_child = True, t
    t.clone_flags |= CLONE_VM | (CLONE_VFORK if vfork else 0)


def _lca(tasks) -> RTask:
    tasks = list(tasks)
    chain = [tasks[0]] + list(tasks[0].ancestors())
    common = chain
    for t in tasks[1:]:
        mine = {id(x) for x in [t] + list(t.ancestors())}
        common = [x for x in common if id(x) in mine]
    return common[0]


def _plan_resources(plan: TreePlan, tree) -> None:
    """Who opens what: per resource, the lowest common ancestor of its users. A resource
    another one needs open first (an epoll's targets) counts that one's users as its own,
    so it is opened by the same task or an ancestor; each task opens the ones it needs
    first first. The leader of a session with a controlling pty uses that pty (it takes
    it right after setsid(), before forking the session)."""
    from criu_py.files import ops_by_type
    kinds = ops_by_type()
    res = plan.resources

    def use(key, kind, ident, user):
        r = res.get(key)
        if r is None:
            r = res[key] = Resource(key=key, kind=kind, ids=[])
        if ident not in r.ids:
            r.ids.append(ident)
        r.users.add(user)
        return r

    def key_of(fid):
        return kinds[tree.files[fid].type].resource_key(tree.files[fid], tree)

    for t in plan.alive:
        if t.files_owner:
            for fi in t.img.fdinfos:
                fe = tree.files[fi.id]
                key = key_of(fi.id)
                use(key, key[0], fi.id, t)
                if fe.HasField("memfd"):
                    shmid = t.img.memory.memfd_inodes[fe.memfd.inode_id].shmid
                    use(("shmem", shmid), "shmem", shmid, t)
        for mf in t.img.memory.files.values():
            if mf.shmid is not None:
                use(("shmem", mf.shmid), "shmem", mf.shmid, t)
    # files a resource needs first: resources of their own, used by its users too
    deps = {}
    todo = list(res.values())
    while todo:
        r = todo.pop()
        if r.kind == "shmem":
            continue
        for fid in list(r.ids):
            for dep in kinds[tree.files[fid].type].deps(tree, tree.files[fid]):
                key = key_of(dep)
                d = res.get(key)
                new = d is None or dep not in d.ids or not r.users <= d.users
                for u in r.users:
                    d = use(key, key[0], dep, u)
                deps.setdefault(r.key, set()).add(key)
                if new:
                    todo.append(d)
    for key, ctty in _controlling_ttys(plan, tree).items():
        if key in res:
            res[key].users.add(ctty)
    for r in res.values():
        r.opener = _lca(r.users)
        if r.opener.in_parent_mm:    # no Python runs in it: its parent opens for it
            r.opener = r.opener.parent

    depth = {}

    def level(key, seen=()):
        if key not in depth:
            if key in seen:
                raise ImageError(f"files.img: files that need each other open first ({key})")
            depth[key] = 1 + max((level(k, seen + (key,)) for k in deps.get(key, ())), default=0)
        return depth[key]
    # Shared objects first (the files opened from them need their fd), then by need.
    for r in sorted(res.values(), key=lambda r: (r.kind != "shmem", level(r.key), r.key)):
        r.opener.opens.append(r.key)


def _controlling_ttys(plan: TreePlan, tree) -> dict:
    """The pty resource each session leader takes as its controlling terminal (tty-info
    sid), noted on the task (t.ctty = (pty index, foreground group))."""
    out = {}
    for info in tree.tty_infos.values():
        if info.id % 2 or not info.sid:
            continue
        t = plan.tasks.get(info.sid)
        if t is None or t.kind == ZOMBIE:
            continue
        master = tree.tty_infos.get(info.id + 1)
        t.ctty = (info.pty.index, info.pgrp, master is None)
        out[("tty", info.pty.index)] = t
    return out


# ---------------------------------------------------------------- copy-on-write
def _private(v) -> bool:
    from criu_py import mem as M
    return bool(v.status & (M.VMA_ANON_PRIVATE | M.VMA_FILE_PRIVATE)) and \
        not v.status & (M.VMA_AREA_VDSO | M.VMA_AREA_VVAR | M.VMA_AREA_VSYSCALL) and \
        not v.flags & (M.MAP_GROWSDOWN | M.MAP_HUGETLB) and v.flags & M.MAP_TYPE != M.MAP_DROPPABLE


class _Filled:
    """The address ranges a task's dumped pages cover, merged and sorted once:
    has(start, end) bisects instead of walking every run for every VMA."""

    def __init__(self, memory):
        self.starts, self.ends = [], []
        for a, n in sorted(memory.filled()):
            if self.ends and a <= self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], a + n)
            else:
                self.starts.append(a)
                self.ends.append(a + n)

    def has(self, start: int, end: int) -> bool:
        import bisect
        i = bisect.bisect_right(self.ends, start)      # the first range ending after start
        return i < len(self.starts) and self.starts[i] < end


def _plan_cow(plan: TreePlan) -> None:
    """A child's private VMA with the same bounds, kind and file as one of its parent's
    may still share pages with it: both are premapped (the parent's before the fork),
    and the child keeps the inherited pages whose contents did not change. Only where
    both have dumped pages: otherwise there is nothing to share."""
    from criu_py import mem as M
    filled = {}                     # pid -> _Filled, made once per task

    def has_pages(task, start: int, end: int) -> bool:
        if task.pid not in filled:
            filled[task.pid] = _Filled(task.img.memory)
        return filled[task.pid].has(start, end)
    for t in plan.alive:
        p = t.parent
        if p is None or p.kind != ALIVE or t.in_parent_mm or t.img.mm.exe_file_id != p.img.mm.exe_file_id:
            continue
        theirs = {v.start: v for v in p.img.memory.vmas if _private(v)}
        for v in t.img.memory.vmas:
            pv = theirs.get(v.start)
            if pv is None or not _private(v) or pv.end != v.end:
                continue
            if (v.flags ^ pv.flags) & M.MAP_ANONYMOUS or (v.status ^ pv.status) & M.VMA_FILE_PRIVATE:
                continue
            if v.status & M.VMA_FILE_PRIVATE and (v.shmid != pv.shmid or v.pgoff != pv.pgoff):
                continue
            if not has_pages(t, v.start, v.end) or not has_pages(p, v.start, v.end):
                continue
            t.inherits[v.start] = pv
    for t in plan.alive:
        wanted = set(t.inherits)
        wanted |= {s for c in t.children if c.kind == ALIVE for s in c.inherits}
        t.premap = [v for v in t.img.memory.vmas if v.start in wanted]
