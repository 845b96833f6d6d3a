# Everything one dump collects about its task, handed from step to step, plus the two
# identity services the kind modules need: files.img ids (FileTable) and "is this fd the
# same open file as that one" (kcmp), so dup'ed fds share one files.img entry.
import os

from criu_py.files import FdRef, FileTable
from criu_py.proc import Record

KCMP_FILE = 0
NR_KCMP = 312


class FdPlan(Record):
    """One fd of the task: its FdRef, its FILE_KINDS kind and its files.img id."""
    _fields = ("ref", "kind", "file_id", "cloexec")
    file_id = 0
    cloexec = False


class DumpContext:
    """State of one dump, filled step by step (see dump/__init__.py)."""

    def __init__(self, pid: int, opts: dict, images=None):
        self.pid = pid
        self.opts = opts
        self.images = images
        self.tracee = None
        self.pidfd = -1
        # collected state
        self.stat = self.status = None          # proc.Stat, proc.Status
        self.raw_gpregs = b""                   # NT_PRSTATUS as read
        self.gpregs = None                      # dict, arch_x86.GPREG_NAMES
        self.xstate = b""                       # NT_X86_XSTATE as read
        self.sigmask = 0
        self.rseq = None
        self.signals_private = []               # pending siginfos (128 bytes each)
        self.signals_shared = []
        self.parasite = None                    # parasite.ParasiteInfo
        self.personality = 0
        self.rlimits = []
        self.robust_list = (0, 0)
        self.sched_policy = self.sched_prio = self.sched_nice = 0
        self.loginuid = 0xFFFFFFFF
        self.oom_score_adj = 0
        self.auxv = []
        self.ns_ids = {}
        self.exe_id = self.cwd_id = self.root_id = 0
        self.vma_plans = []                     # mem.dump.VmaPlan
        self.fds = []                           # FdPlan
        self.files = FileTable()
        self.pipe_data = {}                     # pipe inode -> (bytes, pipe size)
        self.shmem = {}                         # key -> mem.shmem.SharedObject
        self.shmem_stats = {}
        self.page_stats = None
        self.times = {}                         # stats-dump times, microseconds
        self.cg_sets = {}                       # pid -> cgroup set id (criu_py.cgroup.dump)
        self._fd_reps = {}                      # (dev, ino) -> [fd, ...] seen

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def file_description_key(self, ref: FdRef) -> tuple:
        """Same key for fds that share one open file description (kcmp KCMP_FILE)."""
        from criu_py.native import lib
        ino_key = (ref.st.st_dev, ref.st.st_ino)
        reps = self._fd_reps.setdefault(ino_key, [])
        for other in reps:
            if lib.criu_py_raw_syscall6(NR_KCMP, self.pid, self.pid, KCMP_FILE,
                                        other, ref.fd, 0) == 0:
                return ino_key + (other,)
        reps.append(ref.fd)
        return ino_key + (ref.fd,)

    # --- services for mem.dump.plan_vmas
    def file_id_for_mapping(self, vma) -> int:
        from criu_py.files.regular import path_entry_id
        import stat
        from criu_py.errors import Unsupported, from_oserror
        flags = os.O_RDWR if (vma.shared and vma.perms[1] == "w") else os.O_RDONLY
        path = f"/proc/{self.pid}/map_files/{vma.map_files_name}"
        try:
            st = os.stat(path)
        except OSError as exc:
            raise from_oserror(exc, f"stat of {path}", self.pid) from None
        if not stat.S_ISREG(st.st_mode):
            raise Unsupported(f"pid {self.pid}: mapping of {vma.path} at {vma.start:#x} "
                              f"(not a regular file) is not supported")
        return path_entry_id(self.files, vma.path, st, flags)

    def plan_shmem(self, plan) -> None:
        from criu_py.mem import shmem
        shmem.plan_vma(self, plan)
