# Reading and checking every image a restore needs, before anything is created: the
# restore either has a complete, consistent picture of the tree (every process, thread,
# fd table, mapping and shared object) or stops with one line naming the file and the
# problem.
from criu_py.errors import ImageError, Unsupported
from criu_py.proc import Record

TASK_ALIVE, TASK_DEAD, TASK_STOPPED = 1, 2, 3


class TaskImages(Record):
    """Everything read from the images dir for one process. Zombies have only pstree
    and a core (its exit status)."""
    _fields = ("pid", "pstree", "core", "threads", "ids", "mm", "fs", "fdinfos", "memory", "zombie")

    def __init__(self, pid: int, pstree, core, threads: list | None = None, ids=None, mm=None,
                 fs=None, fdinfos: list | None = None, memory=None, zombie: bool = False):
        self.pid = pid
        self.pstree = pstree
        self.core = core                   # the leader's (or the zombie's) core
        self.threads = [] if threads is None else threads   # (tid, core) in pstree order, leader first
        self.ids = ids
        self.mm = mm
        self.fs = fs
        self.fdinfos = [] if fdinfos is None else fdinfos
        self.memory = memory               # mem.restore.MemoryPlan
        self.zombie = zombie

    @property
    def tids(self) -> list[int]:
        return [tid for tid, _ in self.threads]

    @property
    def stopped(self) -> bool:
        """Dumped in a group stop (SIGSTOP, a Ctrl-Z'ed job): restored stopped."""
        return not self.zombie and self.core.tc.task_state == TASK_STOPPED


class TreeImages(Record):
    """The whole dump: processes in pstree order (root first), files.img, pipe data,
    the shared memory objects (by shmid) and memfd inodes every process may use."""
    _fields = ("images", "tasks", "files", "pipe_data", "shared", "memfd_inodes", "chain", "checks",
               "fifo_data", "fifo_data_owner", "remaps", "ghost_paths", "tty_infos", "file_locks",
               "epoll_targets", "inventory", "unix_sockets", "inet_sockets")

    def __init__(self, images, tasks: list, files: dict, pipe_data: dict | None = None,
                 shared: dict | None = None, memfd_inodes: dict | None = None,
                 chain: list | None = None, checks=None, fifo_data: dict | None = None,
                 fifo_data_owner: dict | None = None, remaps: dict | None = None,
                 ghost_paths: dict | None = None, tty_infos: dict | None = None,
                 file_locks: list | None = None, epoll_targets: dict | None = None,
                 inventory=None, unix_sockets=None, inet_sockets=None):
        self.images = images               # criu_py.images.ImageDir
        self.tasks = tasks
        self.inherited = frozenset()       # names of the files --inherit-fd hands in
        self.files = files                 # file id -> file_entry
        self.pipe_data = {} if pipe_data is None else pipe_data   # pipe_id -> (bytes, pipe size)
        self.shared = {} if shared is None else shared            # shmid -> shmem_restore.SharedObject
        self.memfd_inodes = {} if memfd_inodes is None else memfd_inodes
        self.chain = [] if chain is None else chain               # [images, parent, ...] (mem.chain)
        self.checks = checks               # files.identity.FileChecks: is each file the dumped one
        self.fifo_data = {} if fifo_data is None else fifo_data   # fifo inode -> (bytes, pipe size)
        # fifo inode -> the entry that refills it
        self.fifo_data_owner = {} if fifo_data_owner is None else fifo_data_owner
        self.remaps = {} if remaps is None else remaps            # REG id of a deleted file -> ghost id
        # ghost id -> where the restore made it
        self.ghost_paths = {} if ghost_paths is None else ghost_paths
        self.tty_infos = {} if tty_infos is None else tty_infos   # tty_info id -> tty_info_entry
        self.file_locks = [] if file_locks is None else file_locks   # file_lock_entry
        # epoll id -> [(target id, tfd entry)]
        self.epoll_targets = {} if epoll_targets is None else epoll_targets
        self.inventory = inventory         # inventory_entry
        self.unix_sockets = unix_sockets   # files.sockets.unix.UnixImages, when first asked for
        self.inet_sockets = inet_sockets   # files.sockets.inet.InetImages, when first asked for
        self.by_pid = {t.pid: t for t in self.tasks}

    @property
    def root(self) -> TaskImages:
        return self.tasks[0]

    @property
    def pid(self) -> int:
        return self.tasks[0].pid

    def task(self, pid: int) -> TaskImages:
        return self.by_pid[pid]

    def reg_path(self, file_id: int) -> str:
        """Where to open a REG entry's file: its name, or the recreated ghost's path."""
        from criu_py.images import get_str
        gid = self.remaps.get(file_id)
        if gid is not None and gid in self.ghost_paths:
            return self.ghost_paths[gid]
        return get_str(self.files[file_id].reg.name)

    def reg(self, file_id: int, what: str):
        fe = self.files.get(file_id)
        if fe is None or not fe.HasField("reg"):
            raise ImageError(f"files.img: no regular file with id {file_id} (needed for {what})")
        return fe.reg

    def path(self, file_id: int, what: str) -> str:
        """The path of a REG entry, as a str that opens it (os.fsdecode of its bytes)."""
        from criu_py.images import get_str
        return get_str(self.reg(file_id, what).name)

    def check_file(self, file_id: int, what: str) -> None:
        """The file REG entry file_id names must exist and be the one dumped (once per
        entry; files/identity.py). A deleted file is made from its ghost image instead;
        one the caller hands in (--inherit-fd) is whatever the caller gives."""
        self.reg(file_id, what)
        if file_id in self.checks.passed or file_id in self.remaps:
            return
        from criu_py.files.regular import OPS
        if OPS.inherit_name(self.files[file_id]) not in self.inherited:
            _check_path(self, file_id, what)

    def check_opened(self, file_id: int, fd: int, what: str) -> None:
        """The descriptor opened for REG entry file_id is the file check_file passed."""
        if file_id not in self.remaps:
            self.checks.check_opened(self.files[file_id], fd, self.path(file_id, what), what)

    def close(self) -> None:
        from criu_py.mem.chain import close_chain
        close_chain(self.chain)
        self.images.close()


def load(images_dir: str, lazy: bool = False, checked=None,
         inherited: frozenset = frozenset()) -> TreeImages:
    """lazy: restore --lazy-pages (each process's memory plan leaves its lazy ranges to
    the lazy-pages daemon). checked: integrity.CheckedBytes, the files as the integrity
    check read them (parsed from those bytes rather than read again). inherited: the
    names of the files the caller hands in (--inherit-fd), which must all be there."""
    from criu_py.images import ImageDir
    images = ImageDir(images_dir)
    try:
        if checked is not None:
            checked.hand_to(images)
        tree = _load(images, lazy, inherited)
    except BaseException:
        images.close()
        raise
    images.checked = {}             # what the planning did not read: not kept for the fork
    return tree


def _load(images, lazy: bool = False, inherited: frozenset = frozenset()) -> TreeImages:
    from criu_py.files.identity import FileChecks
    from criu_py.mem import shmem_restore
    from criu_py.mem.chain import open_chain
    inventory = images.read_one("inventory.img")
    entries = images.read_entries("pstree.img")
    if not entries:
        raise ImageError("pstree.img: no tasks")
    check_pstree(entries)
    from criu_py.files import ghost
    files = {fe.id: fe for fe in images.read_entries("files.img")}
    tree = TreeImages(images=images, tasks=[], files=files, checks=FileChecks(images),
                      inventory=inventory)
    tree.inherited = inherited
    _check_inherited(files, inherited)
    tree.chain = open_chain(images)
    tree.memfd_inodes = shmem_restore.memfd_inodes(images)
    tree.remaps = ghost.load_remaps(images)
    if images.exists("tty-info.img"):
        tree.tty_infos = {e.id: e for e in images.read_entries("tty-info.img")}
    if images.exists("fifo-data.img"):
        for e, data in images.read_entries_with_payload("fifo-data.img"):
            tree.fifo_data[e.pipe_id] = (data, e.size if e.HasField("size") else 0)
    for fid in sorted(files):
        if files[fid].HasField("fifo"):
            tree.fifo_data_owner.setdefault(files[fid].fifo.pipe_id, fid)
    if images.exists("filelocks.img"):
        tree.file_locks = images.read_entries("filelocks.img")
    fdinfo_cache = {}
    for e in entries:
        tree.tasks.append(_load_task(images, tree, e, fdinfo_cache, lazy))
    tree.by_pid = {t.pid: t for t in tree.tasks}
    if images.exists("pipes-data.img"):
        for e, data in images.read_entries_with_payload("pipes-data.img"):
            tree.pipe_data[e.pipe_id] = (data, e.size if e.HasField("size") else 0)
    if tree.root.zombie:
        raise ImageError(f"core-{tree.pid}.img: the root task is a zombie")
    return tree


def check_pstree(entries) -> None:
    """Unique pids and tids; every ppid names an earlier process (the root's is 0)."""
    seen_pids, seen_tids = set(), set()
    for i, e in enumerate(entries):
        if e.pid <= 0 or e.pid in seen_pids:
            raise ImageError(f"pstree.img: bad or repeated pid {e.pid}")
        if i == 0 and e.ppid != 0:
            pass      # the root's ppid is whatever it was: the restore command replaces it
        elif i and e.ppid not in seen_pids:
            raise ImageError(f"pstree.img: pid {e.pid} has parent {e.ppid}, which is not "
                             f"an earlier task of the tree")
        threads = list(e.threads) or [e.pid]
        if threads == [0]:
            threads = [e.pid]          # upstream's zombies: no thread ids
        if e.pid not in threads:
            raise ImageError(f"pstree.img: pid {e.pid} is not among its own threads")
        for tid in threads:
            if tid <= 0 or tid in seen_tids:
                raise ImageError(f"pstree.img: bad or repeated thread id {tid}")
            seen_tids.add(tid)
        seen_pids.add(e.pid)


def _load_task(images, tree: TreeImages, e, fdinfo_cache: dict, lazy: bool = False) -> TaskImages:
    from criu_py.mem.restore import plan_memory
    pid = e.pid
    core = images.read_one(f"core-{pid}.img")
    if core.mtype != 1 or not core.HasField("tc"):
        raise ImageError(f"core-{pid}.img: not an x86_64 task core")
    if core.tc.task_state == TASK_DEAD:
        return TaskImages(pid=pid, pstree=e, core=core, zombie=True)
    if core.tc.task_state not in (TASK_ALIVE, TASK_STOPPED):
        raise Unsupported(f"core-{pid}.img: task state {core.tc.task_state} is not supported")
    tids = [pid] + [tid for tid in e.threads if tid != pid]
    threads = [(pid, core)]
    for tid in tids[1:]:
        threads.append((tid, images.read_one(f"core-{tid}.img")))
    for tid, c in threads:
        if c.mtype != 1 or not c.HasField("thread_info"):
            raise ImageError(f"core-{tid}.img: not an x86_64 thread core")
        if c.thread_info.gpregs.HasField("mode") and c.thread_info.gpregs.mode != 1:
            raise Unsupported(f"core-{tid}.img: 32-bit tasks are not supported")
    ids = images.read_one(f"ids-{pid}.img")
    mm = images.read_one(f"mm-{pid}.img")
    fs = images.read_one(f"fs-{pid}.img")
    if ids.files_id not in fdinfo_cache:
        fdinfo_cache[ids.files_id] = _load_fdinfo(images, tree, ids.files_id)
    t = TaskImages(pid=pid, pstree=e, core=core, threads=threads, ids=ids, mm=mm, fs=fs,
                   fdinfos=fdinfo_cache[ids.files_id])
    tree.check_file(fs.cwd_id, f"pid {pid}: cwd")
    tree.check_file(fs.root_id, f"pid {pid}: root")
    tree.check_file(mm.exe_file_id, f"pid {pid}: the executable")
    stacks = None
    if lazy:
        from criu_py.lazy.ranges import stack_addrs_of
        stacks = stack_addrs_of(mm, [c for _, c in threads])
    t.memory = plan_memory(images, pid, mm, tree.files, tree.shared, tree.memfd_inodes,
                           tree.checks, chain=tree.chain, lazy_stacks=stacks)
    for mf in t.memory.files.values():
        if mf.path is not None:
            tree.check_file(mf.file_id, f"pid {pid}: a mapping")
    return t


def _check_inherited(files: dict, inherited: frozenset) -> None:
    """Every name given with --inherit-fd is a file of the dump (a typo must not go
    unnoticed: the task would get a file of its own instead)."""
    if not inherited:
        return
    from criu_py.files import ops_by_type
    kinds = ops_by_type()
    names = {kinds[fe.type].inherit_name(fe) for fe in files.values() if fe.type in kinds}
    for name in sorted(inherited - names):
        raise ImageError(f"--inherit-fd: no file of the dump is {name!r} (CRIU's names: "
                         f"pipe:[INODE], socket:[INODE], or a regular file's path without its "
                         f"first '/')")


def _load_fdinfo(images, tree: TreeImages, files_id: int) -> list:
    from criu_py.files import ops_by_type
    kinds = ops_by_type()
    name = f"fdinfo-{files_id}.img"
    fdinfos = images.read_entries(name) if images.exists(name) else []
    seen = set()
    for fi in fdinfos:
        if fi.fd in seen:
            raise ImageError(f"{name}: fd {fi.fd} appears twice")
        seen.add(fi.fd)
        fe = tree.files.get(fi.id)
        if fe is None:
            raise ImageError(f"{name}: fd {fi.fd} names file id {fi.id}, missing from files.img")
        ops = kinds.get(fe.type)
        if ops is None:
            from criu_py.images.pb import fdinfo_pb2
            kind = fdinfo_pb2.fd_types.Name(fe.type) if fe.type in fdinfo_pb2.fd_types.values() else fe.type
            raise Unsupported(f"{name}: fd {fi.fd} is of kind {kind}, which restore "
                              f"does not support")
        ops.check_image(tree, fe, f"fd {fi.fd}")
    return fdinfos


def _check_path(tree: TreeImages, file_id: int, what: str) -> None:
    tree.checks.check_path(tree.files[file_id], tree.path(file_id, what), what)
