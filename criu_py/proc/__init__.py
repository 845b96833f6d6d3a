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
        # straight into the instance dict: thousands are made per dump, and no field
        # is a property
        d = self.__dict__
        if args:
            d.update(zip(self._fields, args))
        d.update(kwargs)

    def __repr__(self):
        inner = ", ".join(f"{n}={getattr(self, n, None)!r}" for n in self._fields)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, n, None) == getattr(other, n, None) for n in self._fields)

    __hash__ = None


def _read(pid: int, name: str, binary: bool = False):
    # os.read until EOF: a file object's fstat, isatty and buffering cost more than
    # reading these small files (a dump reads thousands)
    path = f"/proc/{pid}/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 32768)
            if data:
                chunks = [data]
                while True:
                    more = os.read(fd, 1 << 18)
                    if not more:
                        break
                    chunks.append(more)
                if len(chunks) > 1:
                    data = b"".join(chunks)
        finally:
            os.close(fd)
    except OSError as exc:
        raise from_oserror(exc, f"reading {path}", pid) from None
    # Names and paths the kernel gives are bytes, not always UTF-8: decoded losslessly
    # (surrogate escapes, as os.fsdecode does)
    return data if binary else data.decode("utf-8", "surrogateescape")


def pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}/stat")


# ---------------------------------------------------------------- /proc/PID/stat
class Stat(Record):
    # tty_nr: the controlling terminal's device number (0: none); tpgid: its foreground
    # process group (-1: none).
    _fields = ("pid", "comm", "state", "ppid", "pgid", "sid", "tty_nr", "tpgid", "flags", "num_threads",
               "start_code", "end_code", "start_stack", "start_data", "end_data", "start_brk",
               "arg_start", "arg_end", "env_start", "env_end", "exit_signal", "exit_code",
               "start_time")


def read_stat(pid: int) -> Stat:
    text = _read(pid, "stat")
    lpar, rpar = text.index("("), text.rindex(")")
    comm = text[lpar + 1:rpar]
    # Fields after "(comm)", numbered as in proc(5) starting at 3 (state).
    f = text[rpar + 2:].split()
    n = lambda i: int(f[i - 3])  # noqa: E731  (proc(5) field number -> value)
    return Stat(pid=int(text[:lpar]), comm=comm, state=f[0], ppid=n(4), pgid=n(5), sid=n(6),
                tty_nr=n(7), tpgid=n(8), flags=n(9), num_threads=n(20), start_time=n(22),
                start_code=n(26), end_code=n(27),
                start_stack=n(28), exit_signal=n(38), start_data=n(45), end_data=n(46),
                start_brk=n(47), arg_start=n(48), arg_end=n(49), env_start=n(50), env_end=n(51),
                exit_code=n(52) if len(f) >= 50 else 0)


# ---------------------------------------------------------------- /proc/PID/status
class Status(Record):
    # uids/gids: (real, effective, saved, fs); ns_pids: NSpid, the pid in each pid
    # namespace, outermost first; groups: supplementary groups.
    _fields = ("name", "umask", "state", "tgid", "ppid", "tracer_pid", "uids", "gids", "threads",
               "sig_blk", "sig_ign", "sig_cgt", "sig_pnd", "shd_pnd", "cap_inh", "cap_prm",
               "cap_eff", "cap_bnd", "cap_amb", "no_new_privs", "seccomp", "ns_pids", "groups",
               "vm_rss", "vm_swap", "vm_lck")
    groups = ()
    vm_rss = vm_swap = vm_lck = 0       # kB


def read_status(pid: int, tid: int | None = None) -> Status:
    """/proc/PID/status, or with tid the thread's own /proc/PID/task/TID/status
    (credentials, signal mask and seccomp are per thread)."""
    kv = {}
    name = "status" if tid is None else f"task/{tid}/status"
    for line in _read(pid, name).split("\n"):
        key, _, value = line.partition(":")
        kv[key] = value                    # int() ignores the blanks around a number
    hexa = lambda k: int(kv.get(k, "0"), 16)  # noqa: E731
    return Status(
        name=kv.get("Name", "").strip(), umask=int(kv.get("Umask", "0022"), 8),
        state=kv.get("State", "?").strip()[:1], tgid=int(kv["Tgid"]), ppid=int(kv["PPid"]),
        tracer_pid=int(kv["TracerPid"]),
        uids=tuple(int(x) for x in kv["Uid"].split()), gids=tuple(int(x) for x in kv["Gid"].split()),
        threads=int(kv.get("Threads", "1")), sig_blk=hexa("SigBlk"), sig_ign=hexa("SigIgn"),
        sig_cgt=hexa("SigCgt"), sig_pnd=hexa("SigPnd"), shd_pnd=hexa("ShdPnd"),
        cap_inh=hexa("CapInh"), cap_prm=hexa("CapPrm"), cap_eff=hexa("CapEff"),
        cap_bnd=hexa("CapBnd"), cap_amb=hexa("CapAmb"),
        no_new_privs=int(kv.get("NoNewPrivs", "0")), seccomp=int(kv.get("Seccomp", "0")),
        ns_pids=tuple(int(x) for x in kv.get("NSpid", kv["Tgid"]).split()),
        groups=tuple(int(x) for x in kv.get("Groups", "").split()),
        vm_rss=_kb(kv.get("VmRSS")), vm_swap=_kb(kv.get("VmSwap")), vm_lck=_kb(kv.get("VmLck")))


class SignalBits(Record):
    # status's SigPnd (the thread's own pending), ShdPnd (the process's) and SigCgt
    _fields = ("sig_pnd", "shd_pnd", "sig_cgt")


def read_signal_bits(pid: int, tid: int | None = None) -> SignalBits:
    """Only the pending and caught signal masks of status (read_status parses all of
    it): found with str.find."""
    text = _read(pid, "status" if tid is None else f"task/{tid}/status")

    def hexa(key: str) -> int:
        at = text.find("\n" + key + ":")
        return 0 if at < 0 else int(text[at + len(key) + 2:text.find("\n", at + 1)], 16)
    return SignalBits(hexa("SigPnd"), hexa("ShdPnd"), hexa("SigCgt"))


def _kb(value: str | None) -> int:
    """'1234 kB' -> 1234 (0 when absent: kernel threads, zombies)."""
    return int(value.split()[0]) if value else 0


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


# smaps is read by cutting it at its VmFlags lines (C speed), or, should the layout ever
# differ, by one regular-expression pass over the whole file for the header and VmFlags
# lines; either beats a Python loop over its ~25 lines per VMA.
_SMAPS_LINE = None
_MAPS_HEAD = None


def read_smaps(pid: int) -> list[Vma]:
    """Like read_maps, plus each VMA's VmFlags (gd = grows down, lo = locked, ...)."""
    text = _read(pid, "smaps")
    return _smaps_by_flags_line(text) or _smaps_by_regex(text)


def _smaps_by_flags_line(text: str) -> list[Vma] | None:
    """The kernel ends every VMA's block with its VmFlags line (fs/proc/task_mmu.c,
    since 3.8): cut the text there (str.split runs in C; the regular expression below
    tries every position of the ~800 bytes per VMA) and parse each block's first line.
    None when a block does not start with a header line (another layout)."""
    global _MAPS_HEAD
    if _MAPS_HEAD is None:
        import re
        _MAPS_HEAD = re.compile(r"([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) "
                                r"(\d+) *(.*)")
    pieces = text.split("\nVmFlags: ")
    if len(pieces) < 2:
        return None
    vmas = []
    head = pieces[0].partition("\n")[0]
    for piece in pieces[1:]:
        m = _MAPS_HEAD.fullmatch(head)
        if m is None:
            return None
        lo, hi, perms, off, major, minor, inode, path = m.groups()
        v = Vma(int(lo, 16), int(hi, 16), perms, int(off, 16), int(major, 16), int(minor, 16),
                int(inode), path)
        flags, _, rest = piece.partition("\n")
        v.vm_flags = frozenset(flags.split())
        vmas.append(v)
        head = rest.partition("\n")[0]
    return None if head else vmas


def _smaps_by_regex(text: str) -> list[Vma]:
    global _SMAPS_LINE
    if _SMAPS_LINE is None:
        import re
        _SMAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) "
                                 r"(\d+) *(.*)$|^VmFlags: (.*)$", re.M)
    vmas = []
    for m in _SMAPS_LINE.finditer(text):
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
    # single "key: value" line, raw. Kind-specific lines, parsed: eventfd_count /
    # eventfd_semaphore (eventfd), sigmask (signalfd), timerfd (TimerfdInfo), tfds
    # (EpollTarget per "tfd:" line of an epoll), locks (FdLock per "lock:" line: the
    # locks taken through this open file), tty_index (a pty master's "tty-index").
    _fields = ("pos", "flags", "mnt_id", "ino", "extra", "eventfd_count", "eventfd_semaphore",
               "sigmask", "timerfd", "tfds", "locks", "tty_index")
    eventfd_count = eventfd_semaphore = sigmask = timerfd = tty_index = None
    tfds = locks = ()


class EpollTarget(Record):
    # One file an epoll watches: the fd number it was added with (tfd), the event mask
    # and data it was added with, and the file's position, inode and device (st_dev form).
    _fields = ("tfd", "events", "data", "pos", "ino", "dev")


class FdLock(Record):
    # One "lock:" line: kind FLOCK, POSIX, OFDLCK, LEASE, ...; access READ/WRITE/...;
    # pid (-1 for OFD locks); start and end (None: to the end of the file); ino and
    # dev (st_dev form) of the locked file; blocked: a request still waiting ("->").
    _fields = ("kind", "mode", "access", "pid", "dev", "ino", "start", "end", "blocked")


class TimerfdInfo(Record):
    # clockid, ticks (expirations not read yet), settime_flags (TFD_TIMER_ABSTIME,
    # TFD_TIMER_CANCEL_ON_SET), value (time left: (s, ns)), interval ((s, ns)).
    _fields = ("clockid", "ticks", "settime_flags", "value", "interval")


def _kdev_to_st_dev(kdev: int) -> int:
    """The kernel's internal dev_t (major << 20 | minor, as fdinfo and /proc/locks print
    it) in stat()'s form."""
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


def _parse_lock_line(text: str) -> FdLock:
    # "1: FLOCK  ADVISORY  WRITE 29295 fe:00:2151403 0 EOF", or "1: -> POSIX ..." waiting
    words = text.split()[1:]
    blocked = bool(words) and words[0] == "->"
    if blocked:
        words = words[1:]
    kind, mode, access, pid, where, start, end = words[:7]
    major, minor, ino = where.split(":")
    return FdLock(kind=kind, mode=mode, access=access, pid=int(pid),
                  dev=os.makedev(int(major, 16), int(minor, 16)), ino=int(ino),
                  start=int(start), end=None if end == "EOF" else int(end), blocked=blocked)


def _parse_tfd_line(text: str) -> EpollTarget:
    # "tfd:        3 events: 80000019 data:             1234  pos:0 ino:414 sdev:10"
    f = text.replace(":", " ").split()
    kv = dict(zip(f[0::2], f[1::2]))
    return EpollTarget(tfd=int(kv["tfd"]), events=int(kv["events"], 16), data=int(kv["data"], 16),
                       pos=int(kv.get("pos", "0")), ino=int(kv.get("ino", "0"), 16),
                       dev=_kdev_to_st_dev(int(kv.get("sdev", "0"), 16)))


def _pair(text: str) -> tuple[int, int]:
    a, b = text.strip().strip("()").split(",")
    return int(a), int(b)


def parse_fdinfo(text: str) -> FdInfo:
    """/proc/PID/fdinfo/FD as FdInfo (a function of its own for the tests)."""
    kv, tfds, locks = {}, [], []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "tfd":
            tfds.append(_parse_tfd_line(line))
        elif key == "lock":
            locks.append(_parse_lock_line(value))
        else:
            kv.setdefault(key, value.strip())
    info = FdInfo(pos=int(kv.pop("pos", "0")), flags=int(kv.pop("flags", "0"), 8),
                  mnt_id=int(kv.pop("mnt_id", "0")), ino=int(kv.pop("ino", "0")), extra=kv,
                  tfds=tfds, locks=locks)
    if "eventfd-count" in kv:
        info.eventfd_count = int(kv["eventfd-count"], 16)
        info.eventfd_semaphore = kv.get("eventfd-semaphore", "0") == "1"
    if "sigmask" in kv:
        info.sigmask = int(kv["sigmask"], 16)
    if "clockid" in kv and "it_value" in kv:
        info.timerfd = TimerfdInfo(clockid=int(kv["clockid"]), ticks=int(kv.get("ticks", "0")),
                                   settime_flags=int(kv.get("settime flags", "0"), 8),
                                   value=_pair(kv["it_value"]), interval=_pair(kv["it_interval"]))
    if "tty-index" in kv:
        info.tty_index = int(kv["tty-index"])
    return info


def read_fdinfo(pid: int, fd: int) -> FdInfo:
    return parse_fdinfo(_read(pid, f"fdinfo/{fd}"))


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
    import struct
    raw = _read(pid, "auxv", binary=True)
    words = list(struct.unpack_from(f"<{len(raw) // 8}Q", raw))
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


def descendants(pid: int) -> list[int]:
    """Every process below pid, parents before their children; best effort for trees
    that change meanwhile (a task that is gone is skipped, with its subtree)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:            # a thread that exits meanwhile has no children left
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


class PosixTimer(Record):
    # One timer_create() timer: its id, clock, signal and sigev_value (sival), how it
    # notifies (notify: SIGEV_SIGNAL 0, SIGEV_NONE 1, | SIGEV_THREAD_ID 4) and the
    # thread or process it signals (target).
    _fields = ("id", "clockid", "signo", "sival", "notify", "target")


SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
_NOTIFY = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD}


def parse_timers(text: str) -> list[PosixTimer]:
    """/proc/PID/timers: "ID: n", "signal: signo/sival", "notify: how/pid.N" or
    "how/tid.N", "ClockID: n" per timer."""
    out = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "ID":
            out.append(PosixTimer(id=int(value), clockid=0, signo=0, sival=0, notify=0, target=0))
        elif not out:
            continue
        elif key == "signal":
            signo, _, sival = value.partition("/")
            out[-1].signo, out[-1].sival = int(signo), int(sival or "0", 16)
        elif key == "notify":
            how, _, who = value.partition("/")
            kind, _, target = who.partition(".")
            out[-1].notify = _NOTIFY.get(how, SIGEV_SIGNAL) | (SIGEV_THREAD_ID if kind == "tid" else 0)
            out[-1].target = int(target or "0")
        elif key == "ClockID":
            out[-1].clockid = int(value)
    return out


def read_timers(pid: int) -> list[PosixTimer]:
    """The process's POSIX timers (/proc/PID/timers)."""
    return parse_timers(_read(pid, "timers"))


def read_sysvipc(kind: str) -> list[dict]:
    """/proc/sysvipc/shm, sem or msg of our IPC namespace: one dict per object, keyed by
    the header's column names (key, shmid/semid/msqid, perms, size, cpid, nattch, ...),
    values as ints (perms octal, the rest decimal)."""
    try:
        with open(f"/proc/sysvipc/{kind}") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise from_oserror(exc, f"reading /proc/sysvipc/{kind}") from None
    if not lines:
        return []
    names = lines[0].split()
    out = []
    for line in lines[1:]:
        words = line.split()
        if len(words) < len(names):
            continue
        out.append({n: int(w, 8) if n == "perms" else int(w) for n, w in zip(names, words)})
    return out


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
        words = line[26:].split(None, 2)
        if len(words) < 2:
            continue
        cur, mx = words[0], words[1]
        out.append(Rlimit(_RLIM_INF if cur == "unlimited" else int(cur),
                          _RLIM_INF if mx == "unlimited" else int(mx)))
    return out


def read_comm(pid: int, tid: int | None = None) -> str:
    """The task's (or one thread's) name, without the newline."""
    name = "comm" if tid is None else f"task/{tid}/comm"
    return _read(pid, name).rstrip("\n")


def read_wchan(pid: int) -> str:
    """/proc/PID/wchan: the kernel function a sleeping task waits in ('' if none)."""
    name = _read(pid, "wchan").strip()
    return "" if name == "0" else name


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


# ---------------------------------------------------------------- fsnotify marks (fdinfo)
class NotifyMark(Record):
    """One watch or mark line of an inotify or fanotify fd's fdinfo. kind: "inotify"
    (a watch), "inode", "mount" or "sb" (fanotify marks); values: the line's hex
    fields by name (wd, ino, sdev, mask, ignored_mask, mflags, mnt_id, fhandle-bytes,
    fhandle-type); handle: the f_handle bytes (inode marks)."""
    _fields = ("kind", "values", "handle")
    handle = b""


class NotifyInfo(Record):
    """What fdinfo says of an inotify/fanotify fd: fanotify's group flags and event
    flags (flags, event_flags), and its marks in fdinfo order."""
    _fields = ("flags", "event_flags", "marks")
    flags = event_flags = 0


def parse_fsnotify(text: str) -> NotifyInfo:
    """The inotify/fanotify lines of an fdinfo text (kernel format, see
    fs/notify/fdinfo.c): "inotify wd:1 ino:20c009 sdev:fe00000 mask:a ..." or
    "fanotify flags:3 event-flags:8000" then "fanotify ino:...|mnt_id:...|sdev:..."."""
    info = NotifyInfo(marks=[])
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if head not in ("inotify", "fanotify"):
            continue
        values, handle = {}, b""
        for word in rest.split():
            key, _, value = word.partition(":")
            if key == "f_handle":
                handle = bytes.fromhex(value)
            else:
                values[key] = int(value, 16)
        if head == "inotify":
            info.marks.append(NotifyMark("inotify", values, handle))
        elif "flags" in values and "event-flags" in values:
            info.flags, info.event_flags = values["flags"], values["event-flags"]
        elif "ino" in values:
            info.marks.append(NotifyMark("inode", values, handle))
        elif "mnt_id" in values:
            info.marks.append(NotifyMark("mount", values))
        else:
            info.marks.append(NotifyMark("sb", values))
    return info


def read_fsnotify(pid: int, fd: int) -> NotifyInfo:
    return parse_fsnotify(_read(pid, f"fdinfo/{fd}"))


# ---------------------------------------------------------------- /proc/PID/mountinfo
class MountInfo(Record):
    _fields = ("mnt_id", "parent_id", "major", "minor", "root", "mount_point", "fstype",
               "source")


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in path:
        return path
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_mountinfo(text: str) -> list[MountInfo]:
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        if len(f) < 5 or not right:
            continue
        major, minor = f[2].split(":")
        r = right.split()
        out.append(MountInfo(int(f[0]), int(f[1]), int(major), int(minor), _unescape(f[3]),
                             _unescape(f[4]), r[0], r[1] if len(r) > 1 else ""))
    return out


def read_mountinfo(pid: int | str = "self") -> list[MountInfo]:
    return parse_mountinfo(_read(pid, "mountinfo"))


# ---------------------------------------------------------------- /proc/PID/pagemap
def read_pagemap(pid: int, addr: int, pages: int = 1) -> list[int]:
    """The raw 64-bit pagemap entries of `pages` pages from addr."""
    import struct
    path = f"/proc/{pid}/pagemap"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(exc, f"opening {path}", pid) from None
    try:
        data = os.pread(fd, 8 * pages, addr // 4096 * 8)
    except OSError as exc:
        raise from_oserror(exc, f"reading {path}", pid) from None
    finally:
        os.close(fd)
    return list(struct.unpack(f"<{len(data) // 8}Q", data))
