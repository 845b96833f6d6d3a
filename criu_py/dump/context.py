# Everything one dump collects, handed from step to step: DumpContext for the whole tree
# (the images dir, files.img ids, shared memory objects, pipe data, which all tasks
# share), ProcDump per process and ThreadDump per thread. ProcDump also offers the
# services the kind modules (files/, mem/) need from "the task being dumped": its pid and
# pidfd, files.img ids, and "is this fd the same open file as that one" (kcmp across
# every process of the tree, so an inherited description is one files.img entry).
import os

from criu_py.files import FdRef, FileTable
from criu_py.proc import Record


class FdPlan(Record):
    """One fd of the task: its FdRef, its FILE_KINDS kind and its files.img id."""
    _fields = ("ref", "kind", "file_id", "cloexec")
    file_id = 0
    cloexec = False


class ThreadDump(Record):
    """One thread: its tracee, registers as read (raw NT_PRSTATUS and as a dict),
    xstate, signal mask, rseq, its own pending signals, /proc/PID/task/TID/status,
    comm, robust list, scheduling, and what its parasite blob read (ThreadInfo)."""
    _fields = ("tid", "tracee", "raw_gpregs", "gpregs", "xstate", "sigmask", "rseq",
               "signals_private", "status", "comm", "robust_list", "sched_policy",
               "sched_prio", "sched_nice", "info")
    rseq = None
    info = None


class DumpContext:
    """State of one dump of a tree (see dump/__init__.py)."""

    def __init__(self, pid: int, opts: dict, images=None):
        self.pid = pid                          # the root
        self.opts = opts
        self.images = images
        self.tree = None                        # dump.tree.Tree
        self.procs: list[ProcDump] = []         # live processes, pstree order
        self.files = FileTable()
        self.pipe_data = {}                     # pipe inode -> (bytes, pipe size)
        self.shmem = {}                         # key -> mem.shmem.SharedObject
        self.shmem_stats = {}
        self.times = {}                         # stats-dump times, microseconds
        self.stats = None                       # the stats_entry written (stats-dump)
        self.kill_after_scripts = False         # killed after the post-dump scripts
        self.cg_sets = {}                       # pid or tid -> cgroup set id (criu_py.cgroup.dump)
        self.fifo_data = {}                     # fifo inode -> (bytes, pipe size)
        self.ghosts = {}                        # (dev, ino) -> files.ghost.Ghost
        self.remaps = {}                        # files.img id of a deleted file -> ghost id
        self.tty_infos = {}                     # tty_info id -> tty_info_entry
        self.pty_masters = None                 # pty indexes whose master the tree holds
        self.fd_index = {}                      # (dev, ino) -> [(pid, fd, FdPlan)] of every fd
        self.file_locks = []                    # file_lock_entry
        self.lock_keys = set()                  # locks already noted (dup'ed fds show them too)
        self.sysv = None                        # criu_py.sysvipc.dump.SysvDump
        self.mapped_file_ids = {}               # (major, minor, inode, flags) -> files.img id
        self.sockets = None                     # files.sockets.SocketDump, at the first socket
        self.run_id = None                      # CRIU's run id (inventory.dump_criu_run_id)
        self.track = None                       # criu_py.track.Tracking
        self.smaps_cache = {}                   # pid -> (smaps read before the freeze, VmLck)
        self.page_buffer = None                 # mem.dump.PageBuffer, made before the freeze
        self.snapshot = None                    # track.snapshot.Snapshot (--leave-running)
        self.page_sink = None                   # pageserver.client.Sink (--page-server)
        self.lazy_kept = None                   # dump.lazy.KeptMemory (--lazy-pages)
        self.lazy_listen = None                 # its listening socket
        self.irmap_queue = []                   # pre-dump: (dev, ino, handle type, handle)
        self._irmap = None
        self.dump_uptime = 0                    # CLOCK_BOOTTIME at the freeze, microseconds
        self.finished = False                   # every image written
        self._next_pages_id = 1
        self._fd_reps = {}                      # (dev, ino) -> [(pid, fd), ...] seen

    def close(self) -> None:
        if self.sockets is not None:
            self.sockets.close()            # connections out of repair, lock lifted, unless committed
        for p in self.procs:
            p.close()
        if self.page_buffer is not None:
            self.page_buffer.close()
            self.page_buffer = None

    @property
    def irmap(self):
        """The inode -> path map of this dump (criu_py/irmap), its cache loaded from the
        images dir or else the parent images."""
        if self._irmap is None:
            from criu_py.irmap import Irmap
            parent = self.track.parent if self.track is not None else None
            self._irmap = Irmap(self.opts.get("irmap_scan_path") or (),
                                [self.images, parent])
        return self._irmap

    def stopped(self) -> list:
        """The processes whose leader is stopped (all but parents waiting in vfork())."""
        return [p for p in self.procs if not p.proc.vfork_child]

    def alloc_pages_id(self) -> int:
        """A fresh pages-N.img number (per process, then per shared object)."""
        n = self._next_pages_id
        self._next_pages_id += 1
        return n

    def file_description_key(self, ref: FdRef) -> tuple:
        """Same key for fds that share one open file description, in any process of the
        tree (kcmp KCMP_FILE)."""
        from criu_py.dump.tree import KCMP_FILE, kcmp
        ino_key = (ref.st.st_dev, ref.st.st_ino)
        reps = self._fd_reps.setdefault(ino_key, [])
        for pid, fd in reps:
            if kcmp(ref.pid, pid, KCMP_FILE, ref.fd, fd) == 0:
                return ino_key + (pid, fd)
        reps.append((ref.pid, ref.fd))
        return ino_key + (ref.pid, ref.fd)

    @property
    def page_stats(self):
        """Totals over every process (for stats-dump)."""
        from criu_py.mem.dump import PageStats
        total = PageStats()
        for p in self.procs:
            s = p.page_stats
            if s is None:
                continue
            total.pages_scanned += s.pages_scanned
            total.pages_written += s.pages_written
            total.pages_parent += s.pages_parent
            total.memdump_us += s.memdump_us
            total.memwrite_us += s.memwrite_us
        return total


class ProcDump:
    """One live process of the tree: its tree.Proc, its threads (ThreadDump, leader
    first), what its parasite read (ParasiteInfo), and its per-process state."""

    def __init__(self, dump: DumpContext, proc):
        self.dump = dump
        self.proc = proc
        self.pid = proc.pid
        self.opts = dump.opts
        self.pidfd = -1
        self.threads: list[ThreadDump] = []
        self.stat = self.status = None          # proc.Stat, proc.Status of the leader
        self.cgroups = None                     # proc.read_cgroup of the leader
        self.parasite = None                    # parasite.ParasiteInfo
        self.personality = 0
        self.rlimits = []
        self.loginuid = 0xFFFFFFFF
        self.oom_score_adj = 0
        self.auxv = []
        self.ns_ids = {}
        self.ns_inodes = None                   # proc.read_ns_ids, read once frozen
        self.signals_shared = []
        self.exe_id = self.cwd_id = self.root_id = 0
        self.vma_plans = []                     # mem.dump.VmaPlan
        self.fds = []                           # FdPlan (fd table owners only)
        self.timers = []                        # proc.PosixTimer of /proc/PID/timers
        self.posix_timers = []                  # posix_timer_entry
        self.pages_id = 0
        self.pages = None                       # mem.dump.PagePlan, planned while frozen
        self.mm_fd = -1                         # pre-dump: pagemap fd of the frozen mm
        self.swapped = False                    # VmSwap > 0: some pages are in swap
        self.page_stats = None

    # ---- what the leader thread is
    @property
    def leader(self) -> ThreadDump:
        return self.threads[0]

    @property
    def tracee(self):
        return self.proc.leader

    @property
    def in_parents_memory(self) -> bool:
        """A vfork() or clone(CLONE_VM) child: it runs in its parent's mm."""
        parent = self.dump.tree.procs.get(self.proc.ppid)
        return parent is not None and not parent.zombie and \
            parent.kobj.get("vm") == self.proc.kobj.get("vm")

    # ---- shared with the whole dump
    @property
    def images(self):
        return self.dump.images

    @property
    def files(self) -> FileTable:
        return self.dump.files

    @property
    def shmem(self) -> dict:
        return self.dump.shmem

    @property
    def pipe_data(self) -> dict:
        return self.dump.pipe_data

    @property
    def tree(self):
        return self.dump.tree

    def file_description_key(self, ref: FdRef) -> tuple:
        return self.dump.file_description_key(ref)

    @property
    def irmap(self):
        return self.dump.irmap

    def close(self) -> None:
        for name in ("pidfd", "mm_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # --- services for mem.dump.plan_vmas
    def file_id_for_mapping(self, vma) -> int:
        """files.img id of a mapped file; one stat per file in the whole dump (the maps
        line's device and inode find the ones seen already)."""
        flags = os.O_RDWR if (vma.shared and vma.perms[1] == "w") else os.O_RDONLY
        key = (vma.dev_major, vma.dev_minor, vma.inode, flags)
        fid = self.dump.mapped_file_ids.get(key)
        if fid is None:
            fid = self.dump.mapped_file_ids[key] = self._stat_mapped_file(vma, flags)
        return fid

    def _stat_mapped_file(self, vma, flags: int) -> int:
        from criu_py.files.regular import mapped_file_id
        import stat
        from criu_py.errors import Unsupported, from_oserror
        path = f"/proc/{self.pid}/map_files/{vma.map_files_name}"
        try:
            st = os.stat(path)
        except OSError as exc:
            raise from_oserror(exc, f"stat of {path}", self.pid) from None
        if not stat.S_ISREG(st.st_mode):
            raise Unsupported(f"pid {self.pid}: mapping of {vma.path} at {vma.start:#x} "
                              f"(not a regular file) is not supported")
        return mapped_file_id(self, vma.path, st, flags, path,
                              f"pid {self.pid}: mapping at {vma.start:#x}")

    def plan_shmem(self, plan) -> None:
        from criu_py.mem import shmem
        shmem.plan_vma(self, plan)

    def plan_sysv_shm(self, plan) -> None:
        from criu_py import sysvipc
        sysvipc.plan_vma(self, plan)
