# /proc parsers for the dump: one function per /proc file, each returning named fields.
# Everything about a task that the kernel exposes as text is read here and nowhere else,
# so the dump halves never touch /proc formats directly. A vanished PID becomes
# NoSuchProcess, a refused read AccessDenied (errors.from_oserror).
import os

from criu_py.errors import from_oserror


class Record:
    """Named fields. A plain class instead of @dataclass: dataclasses' import and per-class
    code generation cost milliseconds of start-up, which a 30 ms dump cannot spare.
    Subclasses list their fields in _fields (positional order); class attributes are defaults."""
    _fields: tuple = ()

    def __init__(self, *args, **kwargs):
        for name, value in zip(self._fields, args):
            setattr(self, name, value)
        for name, value in kwargs.items():
            setattr(self, name, value)

    def __repr__(self):
        inner = ", ".join(f"{n}={getattr(self, n, None)!r}" for n in self._fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, n, None) == getattr(other, n, None) for n in self._fields)

    __hash__ = None


def _read(pid: int, name: str, binary: bool = False):
    path = f"/proc/{pid}/{name}"
    try:
        if binary:
            with open(path, "rb") as f:
                return f.read()
        # Names and paths the kernel gives are bytes, not always UTF-8: decoded
        # losslessly (surrogate escapes, as os.fsdecode does)
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as exc:
        raise from_oserror(exc, f"reading {path}", pid) from None


def pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}/stat")


# ---------------------------------------------------------------- /proc/PID/stat
class Stat(Record):
    _fields = ("pid", "comm", "state", "ppid", "pgid", "sid", "tty_nr", "flags", "num_threads",
               "start_code", "end_code", "start_stack", "start_data", "end_data", "start_brk",
               "arg_start", "arg_end", "env_start", "env_end", "exit_signal", "exit_code")


def read_stat(pid: int) -> Stat:
    text = _read(pid, "stat")
    lpar, rpar = text.index("("), text.rindex(")")
    comm = text[lpar + 1:rpar]
    # Fields after "(comm)", numbered as in proc(5) starting at 3 (state).
    f = text[rpar + 2:].split()
    n = lambda i: int(f[i - 3])  # noqa: E731  (proc(5) field number -> value)
    return Stat(pid=int(text[:lpar]), comm=comm, state=f[0], ppid=n(4), pgid=n(5), sid=n(6),
                tty_nr=n(7), flags=n(9), num_threads=n(20), start_code=n(26), end_code=n(27),
                start_stack=n(28), exit_signal=n(38), start_data=n(45), end_data=n(46),
                start_brk=n(47), arg_start=n(48), arg_end=n(49), env_start=n(50), env_end=n(51),
                exit_code=n(52) if len(f) >= 50 else 0)


# ---------------------------------------------------------------- /proc/PID/status
class Status(Record):
    # uids/gids: (real, effective, saved, fs); ns_pids: NSpid, the pid in each pid
    # namespace, outermost first; groups: supplementary groups.
    _fields = ("name", "umask", "state", "tgid", "ppid", "tracer_pid", "uids", "gids", "threads",
               "sig_blk", "sig_ign", "sig_cgt", "sig_pnd", "shd_pnd", "cap_inh", "cap_prm",
               "cap_eff", "cap_bnd", "cap_amb", "no_new_privs", "seccomp", "ns_pids", "groups")
    groups = ()


def read_status(pid: int, tid: int | None = None) -> Status:
    """/proc/PID/status, or with tid the thread's own /proc/PID/task/TID/status
    (credentials, signal mask and seccomp are per thread)."""
    kv = {}
    name = "status" if tid is None else f"task/{tid}/status"
    for line in _read(pid, name).splitlines():
        key, _, value = line.partition(":")
        kv[key] = value.strip()
    hexa = lambda k: int(kv.get(k, "0"), 16)  # noqa: E731
    return Status(
        name=kv.get("Name", ""), umask=int(kv.get("Umask", "0022"), 8),
        state=kv.get("State", "?")[:1], tgid=int(kv["Tgid"]), ppid=int(kv["PPid"]),
        tracer_pid=int(kv["TracerPid"]),
        uids=tuple(int(x) for x in kv["Uid"].split()), gids=tuple(int(x) for x in kv["Gid"].split()),
        threads=int(kv.get("Threads", "1")), sig_blk=hexa("SigBlk"), sig_ign=hexa("SigIgn"),
        sig_cgt=hexa("SigCgt"), sig_pnd=hexa("SigPnd"), shd_pnd=hexa("ShdPnd"),
        cap_inh=hexa("CapInh"), cap_prm=hexa("CapPrm"), cap_eff=hexa("CapEff"),
        cap_bnd=hexa("CapBnd"), cap_amb=hexa("CapAmb"),
        no_new_privs=int(kv.get("NoNewPrivs", "0")), seccomp=int(kv.get("Seccomp", "0")),
        ns_pids=tuple(int(x) for x in kv.get("NSpid", kv["Tgid"]).split()),
        groups=tuple(int(x) for x in kv.get("Groups", "").split()))


# ---------------------------------------------------------------- /proc/PID/maps + smaps
class Vma(Record):
    # perms: "rwxp" as in maps; path: "" for anonymous, "[heap]", "/path", "/path (deleted)";
    # vm_flags: smaps VmFlags mnemonics (gd = grows down, lo = locked, ...).
    _fields = ("start", "end", "perms", "offset", "dev_major", "dev_minor", "inode", "path",
               "vm_flags")
    vm_flags = frozenset()

    def __init__(self, start, end, perms, offset, dev_major, dev_minor, inode, path):
        # positional and explicit: thousands are made per dump
        self.start, self.end, self.perms, self.offset = start, end, perms, offset
        self.dev_major, self.dev_minor, self.inode, self.path = dev_major, dev_minor, inode, path

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def prot_readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def map_files_name(self) -> str:
        return f"{self.start:x}-{self.end:x}"


def _parse_maps_line(line: str) -> Vma:
    parts = line.split(None, 5)
    lo, hi = parts[0].split("-")
    major, minor = parts[3].split(":")
    path = parts[5].strip("\n") if len(parts) > 5 else ""
    path = path.lstrip(" ")
    return Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), int(major, 16),
               int(minor, 16), int(parts[4]), path)


def read_maps(pid: int) -> list[Vma]:
    return [_parse_maps_line(line) for line in _read(pid, "maps").splitlines() if line]


# A VMA's header line in smaps, or its VmFlags line: one regular-expression pass over
# the whole file instead of a Python loop over its ~25 lines per VMA.
_SMAPS_LINE = None


def read_smaps(pid: int) -> list[Vma]:
    """Like read_maps, plus each VMA's VmFlags (gd = grows down, lo = locked, ...)."""
    global _SMAPS_LINE
    if _SMAPS_LINE is None:
        import re
        _SMAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) "
                                 r"(\d+) *(.*)$|^VmFlags: (.*)$", re.M)
    vmas = []
    for m in _SMAPS_LINE.finditer(_read(pid, "smaps")):
        lo, hi, perms, off, major, minor, inode, path, flags = m.groups()
        if flags is not None:
            vmas[-1].vm_flags = frozenset(flags.split())
        else:
            vmas.append(Vma(int(lo, 16), int(hi, 16), perms, int(off, 16), int(major, 16),
                            int(minor, 16), int(inode), path))
    return vmas


# ---------------------------------------------------------------- fds and fdinfo
def list_fds(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    except OSError as exc:
        raise from_oserror(exc, f"listing /proc/{pid}/fd", pid) from None


class FdInfo(Record):
    # flags: the file's f_flags (O_* bits, octal in the file); extra: every other
    # "key: value" line, raw.
    _fields = ("pos", "flags", "mnt_id", "ino", "extra")


def read_fdinfo(pid: int, fd: int) -> FdInfo:
    kv = {}
    for line in _read(pid, f"fdinfo/{fd}").splitlines():
        key, _, value = line.partition(":")
        kv.setdefault(key.strip(), value.strip())
    return FdInfo(pos=int(kv.pop("pos", "0")), flags=int(kv.pop("flags", "0"), 8),
                  mnt_id=int(kv.pop("mnt_id", "0")), ino=int(kv.pop("ino", "0")), extra=kv)


def read_fd_link(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError as exc:
        raise from_oserror(exc, f"reading /proc/{pid}/fd/{fd}", pid) from None


def stat_fd(pid: int, fd: int) -> os.stat_result:
    """stat() of what the task's fd refers to (follows the magic link)."""
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError as exc:
        raise from_oserror(exc, f"stat of /proc/{pid}/fd/{fd}", pid) from None


# ---------------------------------------------------------------- misc per-task files
def read_link(pid: int, name: str) -> str:
    """exe, cwd, root: the target of /proc/PID/NAME."""
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError as exc:
        raise from_oserror(exc, f"reading /proc/{pid}/{name}", pid) from None


def read_auxv(pid: int) -> list[int]:
    """The saved auxiliary vector as a flat list of u64 (type, value, ..., AT_NULL pair)."""
    raw = _read(pid, "auxv", binary=True)
    words = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw) - len(raw) % 8, 8)]
    # Trim after the AT_NULL terminator pair.
    for i in range(0, len(words) - 1, 2):
        if words[i] == 0:
            return words[:i + 2]
    return words


def read_personality(pid: int) -> int:
    return int(_read(pid, "personality").strip(), 16)


def list_threads(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(f"/proc/{pid}/task"))
    except OSError as exc:
        raise from_oserror(exc, f"listing /proc/{pid}/task", pid) from None


def read_children(pid: int) -> list[int]:
    """Children of every thread of the task (/proc/PID/task/TID/children)."""
    kids = []
    for tid in list_threads(pid):
        kids += [int(x) for x in _read(pid, f"task/{tid}/children").split()]
    return kids


def read_timers(pid: int) -> list[str]:
    """POSIX timers (/proc/PID/timers): one 'ID: n' block per timer; only counted here."""
    return [line for line in _read(pid, "timers").splitlines() if line.startswith("ID:")]


def read_loginuid(pid: int) -> int:
    try:
        return int(_read(pid, "loginuid").strip())
    except Exception:
        return 0xFFFFFFFF


def read_oom_score_adj(pid: int) -> int:
    return int(_read(pid, "oom_score_adj").strip())


class Rlimit(Record):
    _fields = ("cur", "max")


_RLIM_INF = 0xFFFFFFFFFFFFFFFF


def read_limits(pid: int) -> list[Rlimit]:
    """The 16 rlimits in RLIMIT_* order from /proc/PID/limits, 'unlimited' as
    RLIM_INFINITY. Read from /proc rather than with prlimit(2): prlimit on a task of
    another user needs CAP_SYS_RESOURCE, which root lacks on these machines."""
    out = []
    for line in _read(pid, "limits").splitlines()[1:]:
        # "Max open files            1024                 4096                 files"
        words = line[26:].split()
        if len(words) < 2:
            continue
        cur, mx = (_RLIM_INF if w == "unlimited" else int(w) for w in words[:2])
        out.append(Rlimit(cur, mx))
    return out


def read_comm(pid: int, tid: int | None = None) -> str:
    """The task's (or one thread's) name, without the newline."""
    name = "comm" if tid is None else f"task/{tid}/comm"
    return _read(pid, name).rstrip("\n")


class Syscall(Record):
    # nr: the syscall the task is blocked in (-1: running, None: not blocked in one);
    # args: its six arguments; sp, pc: user stack pointer and instruction pointer.
    _fields = ("nr", "args", "sp", "pc")


def read_syscall(pid: int, tid: int | None = None) -> Syscall:
    """/proc/PID/syscall: which syscall a blocked task sleeps in."""
    words = _read(pid, "syscall" if tid is None else f"task/{tid}/syscall").split()
    if not words or words[0] == "running":
        return Syscall(None, (), 0, 0)
    nr = int(words[0])
    if nr < 0 or len(words) < 9:
        return Syscall(nr, (), 0, 0)
    return Syscall(nr, tuple(int(w, 16) for w in words[1:7]), int(words[7], 16), int(words[8], 16))


NS_KINDS = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")


def read_ns_ids(pid: int | str, names=NS_KINDS) -> dict:
    """Namespace inode numbers keyed by /proc/PID/ns name (net, ipc, uts, ...); kinds
    this kernel lacks are left out."""
    out = {}
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/ns/{name}")
        except OSError:
            continue
        out[name] = int(link[link.index("[") + 1:-1])
    return out


# ---------------------------------------------------------------- /proc/PID/cgroup
class CgroupLine(Record):
    """One line of /proc/PID/cgroup: hierarchy id, its controllers as the kernel names
    them ("cpu,cpuacct", "name=systemd", "" for cgroup2), the task's cgroup path."""
    _fields = ("hierarchy", "controllers", "path")


def read_cgroup(pid: int, tid: int | None = None) -> list[CgroupLine]:
    """/proc/PID/cgroup, or /proc/PID/task/TID/cgroup for one thread."""
    name = "cgroup" if tid is None else f"task/{tid}/cgroup"
    return parse_cgroup(_read(pid, name))


def parse_cgroup(text: str) -> list[CgroupLine]:
    out = []
    for line in text.splitlines():
        if not line:
            continue
        hier, controllers, path = line.split(":", 2)
        out.append(CgroupLine(int(hier), controllers, path))
    return out
