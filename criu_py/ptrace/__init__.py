# Stopping a task without signals (PTRACE_SEIZE + PTRACE_INTERRUPT), reading its
# register sets, and running a few syscalls and code blobs inside it (injection, which
# never changes the task's code and survives the tracer's death at any instant: see
# Injection below). Everything the dump changes in the task is undone structurally:
# `seized()` always detaches (or leaves the task killed), `Injection` always puts back
# the registers and signal mask.
import contextlib
import errno
import os
import signal
import struct

from criu_py.errors import CriuError, DumpError, NoSuchProcess, check_errno, from_oserror
from criu_py.log import log

PTRACE_CONT = 7
PTRACE_GETSIGINFO = 0x4202
PTRACE_DETACH = 17
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_EVENT_STOP = 128
NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202
WALL = 0x40000000

NR_MMAP, NR_MUNMAP = 9, 11


_NATIVE = None


def _lib():
    """(ffi, lib) of criu_py.native, loaded on first use (an import statement on every
    ptrace call costs more than the call)."""
    global _NATIVE
    if _NATIVE is None:
        from criu_py.native import ffi, lib
        _NATIVE = ffi, lib
    return _NATIVE


class Tracee:
    """One seized task. Methods raise CriuError subclasses, never OSError."""

    def __init__(self, pid: int):
        self.pid = pid
        self.attached = False
        self.dead = False
        self._mem_fd = -1
        # the signal the PTRACE_EVENT_STOP trap reported: SIGTRAP for our interrupt, the
        # stop signal when the task was (or went) into a group stop
        self.stop_sig = 0

    # ------------------------------------------------------------ attach / stop
    def seize(self) -> None:
        self.seize_nowait()
        self._wait_event_stop()
        killpoint()

    def seize_nowait(self) -> None:
        """PTRACE_SEIZE + PTRACE_INTERRUPT without waiting for the stop (wait_stopped()),
        so that many threads can be asked to stop at once. A thread that is exiting
        refuses the seize: that is NoSuchProcess too."""
        ffi, lib = _lib()
        # TRACESYSGOOD: syscall stops report SIGTRAP|0x80, which a tracee left in one by a
        # dead tracer can never take for a signal to deliver.
        ret = lib.cp_ptrace(PTRACE_SEIZE, self.pid, 0, PTRACE_O_TRACESYSGOOD)
        if ret == -errno.EPERM and self._exiting():
            raise NoSuchProcess(f"task {self.pid} is exiting")
        check_errno(ret, "PTRACE_SEIZE", self.pid)
        self.attached = True
        killpoint()
        check_errno(lib.cp_ptrace(PTRACE_INTERRUPT, self.pid, 0, 0), "PTRACE_INTERRUPT", self.pid)

    def wait_stopped(self, drop: tuple = ()) -> None:
        """Wait for the PTRACE_INTERRUPT stop; signals in `drop` that arrive first are
        discarded instead of delivered."""
        self._wait_event_stop(drop)

    def _exiting(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat", errors="surrogateescape") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state in ("Z", "X")

    def _wait(self) -> int:
        while True:
            try:
                _, status = os.waitpid(self.pid, WALL)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                self.dead = True
                raise NoSuchProcess(f"task {self.pid} vanished while traced") from None
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.dead = True
            self.attached = False
            raise NoSuchProcess(f"task {self.pid} exited while being dumped")
        return status

    def _wait_event_stop(self, drop: tuple = ()) -> None:
        """Wait for the PTRACE_INTERRUPT stop; signals that arrive first are passed on."""
        ffi, lib = _lib()
        for _ in range(64):
            status = self._wait()
            sig, event = os.WSTOPSIG(status), status >> 16
            if event == PTRACE_EVENT_STOP:
                self.stop_sig = sig
                return
            # A signal-delivery stop: deliver it and wait for the pending interrupt.
            log.debug("pid %d: signal %d %s while stopping", self.pid, sig,
                      "dropped" if sig in drop else "delivered")
            check_errno(lib.cp_ptrace(PTRACE_CONT, self.pid, 0, 0 if sig in drop else sig),
                        "PTRACE_CONT", self.pid)
        raise DumpError(f"stopping task {self.pid}: it keeps receiving signals")

    def detach(self) -> None:
        if not self.attached:
            return
        ffi, lib = _lib()
        self.attached = False
        self._close_mem()
        ret = lib.cp_ptrace(PTRACE_DETACH, self.pid, 0, 0)
        if ret < 0 and ret != -errno.ESRCH:
            log.warning("PTRACE_DETACH of %d failed: %s", self.pid, os.strerror(-ret))

    def kill(self, wait: bool = True) -> None:
        """End the task (the end of a dump without --leave-running). With wait, also wait
        for its exit as its tracer. Without, return at once, as upstream does: freeing a
        large address space takes the exiting task ~100 ms per GiB, and the trace link
        goes away with us anyway (the real parent still gets the exit status)."""
        self._close_mem()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if wait:
            with contextlib.suppress(NoSuchProcess):
                while True:
                    self._wait()       # until it reports the exit (raises NoSuchProcess)
        self.attached = False
        self.dead = True

    # ------------------------------------------------------------ register sets
    def get_regset(self, note: int, size: int) -> bytes:
        ffi, lib = _lib()
        buf = ffi.new("char[]", size)
        n = check_errno(lib.cp_getregset(self.pid, note, buf, size), "PTRACE_GETREGSET", self.pid)
        return bytes(ffi.buffer(buf, n))

    def set_regset(self, note: int, data: bytes) -> None:
        ffi, lib = _lib()
        buf = ffi.from_buffer(bytearray(data))
        check_errno(lib.cp_setregset(self.pid, note, buf, len(data)), "PTRACE_SETREGSET", self.pid)

    def get_gpregs(self) -> bytes:
        return self.get_regset(NT_PRSTATUS, 216)

    def set_gpregs(self, data: bytes) -> None:
        self.set_regset(NT_PRSTATUS, data)

    def get_xstate(self) -> bytes:
        return self.get_regset(NT_X86_XSTATE, 16384)

    def get_sigmask(self) -> int:
        ffi, lib = _lib()
        buf = ffi.new("uint64_t *")
        check_errno(lib.cp_ptrace(PTRACE_GETSIGMASK, self.pid, 8, int(ffi.cast("uintptr_t", buf))),
                    "PTRACE_GETSIGMASK", self.pid)
        return buf[0]

    def set_sigmask(self, mask: int) -> None:
        ffi, lib = _lib()
        buf = ffi.new("uint64_t *", mask)
        check_errno(lib.cp_ptrace(PTRACE_SETSIGMASK, self.pid, 8, int(ffi.cast("uintptr_t", buf))),
                    "PTRACE_SETSIGMASK", self.pid)

    def get_siginfo(self) -> bytes:
        """The siginfo of the signal-delivery stop the thread is in."""
        ffi, lib = _lib()
        buf = ffi.new("char[]", SIGINFO_SIZE)
        check_errno(lib.cp_ptrace(PTRACE_GETSIGINFO, self.pid, 0, int(ffi.cast("uintptr_t", buf))),
                    "PTRACE_GETSIGINFO", self.pid)
        return ffi.buffer(buf)[:]

    def pending_signals(self, shared: bool) -> list[bytes]:
        """The queued siginfos (128 bytes each): the thread's own, or the process-wide ones."""
        ffi, lib = _lib()
        out = []
        batch = 32
        buf = ffi.new("char[]", SIGINFO_SIZE * batch)
        args = ffi.new("uint64_t[2]")
        while True:
            args[0] = len(out)
            args[1] = (PTRACE_PEEKSIGINFO_SHARED if shared else 0) | (batch << 32)
            n = check_errno(lib.cp_ptrace(PTRACE_PEEKSIGINFO, self.pid,
                                          int(ffi.cast("uintptr_t", args)),
                                          int(ffi.cast("uintptr_t", buf))),
                            "PTRACE_PEEKSIGINFO", self.pid)
            raw = bytes(ffi.buffer(buf, n * SIGINFO_SIZE))
            out += [raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n)]
            if n < batch:
                return out

    def get_rseq(self) -> dict | None:
        """The rseq registration: pointer, size, signature, flags (None if not registered)."""
        ffi, lib = _lib()
        buf = ffi.new("char[32]")
        ret = lib.cp_ptrace(PTRACE_GET_RSEQ_CONFIGURATION, self.pid, 32,
                            int(ffi.cast("uintptr_t", buf)))
        if ret == -errno.EIO or ret == -errno.EINVAL:
            return None
        check_errno(ret, "PTRACE_GET_RSEQ_CONFIGURATION", self.pid)
        ptr, size, sig, flags = struct.unpack_from("<QIII", bytes(ffi.buffer(buf, 20)))
        return None if ptr == 0 else {"pointer": ptr, "size": size, "signature": sig, "flags": flags}

    # ------------------------------------------------------------ memory
    def _mem(self) -> int:
        if self._mem_fd < 0:
            try:
                self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise from_oserror(exc, "opening /proc/PID/mem", self.pid) from None
        return self._mem_fd

    def _close_mem(self) -> None:
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1

    def read_mem(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self._mem(), size, addr)
        except OSError as exc:
            raise from_oserror(exc, f"reading memory at {addr:#x}", self.pid) from None
        if len(data) != size:
            raise DumpError(f"short read of task {self.pid} memory at {addr:#x}")
        return data

    def write_mem(self, addr: int, data: bytes) -> None:
        """Writes even read-only (text) pages, like PTRACE_POKEDATA (FOLL_FORCE)."""
        try:
            n = os.pwrite(self._mem(), data, addr)
        except OSError as exc:
            raise from_oserror(exc, f"writing memory at {addr:#x}", self.pid) from None
        if n != len(data):
            raise DumpError(f"short write to task {self.pid} memory at {addr:#x}")


# ------------------------------------------------------------------ injection
# Code runs in a stopped task without a byte of its code changed, and so that a tracer
# killed at any instant never hurts it. Before anything else, a signal frame of the
# thread's own state (registers with an interrupted syscall set to be re-issued, signal
# mask, xsave state) goes below its stack's red zone, with the address of an
# rt_sigreturn gadget of its own (glibc's __restore_rt: `mov $15, %rax; syscall`) in the
# frame's return-address slot. From then on, every state the thread is left in leads
# back through that frame when resumed without a tracer:
#   - a syscall is issued at a `syscall` of the vdso that is followed only by register
#     clears and `ret` (the "landing"), with rsp at the frame: after the call, `ret`
#     jumps to the gadget, which returns through the frame;
#   - a blob runs in the scratch page with rsp just above the frame and ends with its
#     own `mov $15, %eax; syscall`;
#   - while the tracer holds it, the thread only ever sits in syscall stops of those
#     (PTRACE_O_TRACESYSGOOD: a stale stop code is no signal) or in its first event stop;
#   - a blob may instead run free (PTRACE_CONT, no stop per syscall) when the process has
#     a signal that it neither handles nor has pending and whose default is to be
#     ignored (SIGURG, SIGWINCH, SIGCHLD): the thread's mask then blocks all but that one,
#     and the blob's end (SIGNAL_END) sends it to itself just before its rt_sigreturn.
#     The tracer sees the signal-delivery stop, drops the signal and steps to the
#     rt_sigreturn; without a tracer the signal is delivered and ignored.
# Nothing else is written, so the worst case a killed dumper leaves is the scratch page
# (one anonymous mapping) and a frame's worth of bytes below the stack pointer, which the
# task treats as free; an interrupted syscall is re-issued (a relative timeout restarts
# in full). When the dumper lives on, the thread gets its exact registers and mask back
# and a fresh PTRACE_EVENT_STOP, as if nothing had run.
PTRACE_SYSCALL = 24
PTRACE_O_TRACESYSGOOD = 1
SYSCALL_STOP = signal.SIGTRAP | 0x80
NR_RT_SIGRETURN, NR_GETPID, NR_TGKILL = 15, 39, 234
ENOSYS = 38
RED_ZONE = 128
SS_NO_CHANGE = 4             # an invalid ss_flags: rt_sigreturn leaves sigaltstack alone
RESTORER_GADGETS = (bytes.fromhex("48c7c00f0000000f05"),   # mov $15, %rax; syscall
                    bytes.fromhex("b80f0000000f05"))         # mov $15, %eax; syscall
_GADGET_MAX = max(len(g) for g in RESTORER_GADGETS)
BLOB_END = bytes.fromhex("b80f0000000f05")   # how every blob ends (rt_sigreturn)
# tgkill(r14, r15, ebp): a free-running blob's last call before BLOB_END (see above)
SIGNAL_END = bytes.fromhex("b8ea0000004c89f74c89fe89ea0f05")
# Signals ignored by default whose sending has no other effect (not SIGCONT), best first.
END_SIGNALS = (signal.SIGURG, signal.SIGWINCH, signal.SIGCHLD)
ALL_SIGNALS = 0xFFFFFFFFFFFFFFFF
SI_TKILL = -6
FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                           signal.SIGTRAP})
MAX_BLOB_STOPS = 20000


def _killpoint_env() -> int:
    try:
        return int(os.environ.get("CRIU_PY_TEST_KILL_AT", "0"))
    except ValueError:
        return 0


_KILL_AT = _killpoint_env()
_killpoints_seen = 0


def killpoint() -> None:
    """Test hook: with CRIU_PY_TEST_KILL_AT=N the dumper SIGKILLs itself at the N-th
    point between two ptrace operations of the injection (tests/test_injection_kill.py)."""
    global _killpoints_seen
    if _KILL_AT:
        _killpoints_seen += 1
        if _killpoints_seen == _KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def _is_clear_then_ret(code: bytes) -> bool:
    """Whether `code` starts with only `xor r32, r32` (REX forms too) and then `ret`."""
    i = 0
    while i < len(code):
        b = code[i]
        if b == 0xC3:
            return True
        rex = 0x40 <= b <= 0x4F
        op = code[i + 1] if rex and i + 1 < len(code) else b
        j = i + 1 if rex else i
        if op not in (0x31, 0x33) or j + 1 >= len(code):
            return False
        modrm = code[j + 1]
        if modrm < 0xC0 or (modrm >> 3 & 7) != (modrm & 7):
            return False
        i = j + 2
    return False


_LANDING = None


def landing_offset() -> int | None:
    """Offset in the vdso image (the same in every process) of a `syscall` followed only
    by register clears and `ret`; None when this kernel's vdso has none."""
    global _LANDING, _OWN_LANDING_BYTES
    if _LANDING is None:
        _LANDING = -1
        _OWN_LANDING_BYTES = b""
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith("[vdso]"):
                    s, e = (int(x, 16) for x in line.split()[0].split("-"))
                    image = _own_memory(s, e - s)
                    at = image.find(b"\x0f\x05")
                    while at >= 0:
                        if _is_clear_then_ret(image[at + 2:at + 34]):
                            _LANDING = at
                            _OWN_LANDING_BYTES = image[at:at + 34]
                            break
                        at = image.find(b"\x0f\x05", at + 1)
                    break
    return None if _LANDING < 0 else _LANDING


def _own_memory(addr: int, size: int) -> bytes:
    """Bytes of our own memory (through /proc/self/mem: no ctypes to load)."""
    fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


# Our own vdso's bytes at the landing (what a target's must hold there too); (file, offset
# in it, size) of an executable mapping -> offset of an rt_sigreturn gadget found in it.
_OWN_LANDING_BYTES = b""
_GADGETS_SEEN: dict = {}


def _mapping_key(v) -> tuple:
    return (v.dev_major, v.dev_minor, v.inode, v.path, v.offset, v.end - v.start)


class InjectionSite:
    """Where a process's injected code returns through: the landing `syscall` of its
    vdso, the rt_sigreturn gadget in its own code, and its writable mappings (for frames)."""

    def __init__(self, tracee: "Tracee", vmas=None):
        """vmas: the process's maps as just read (proc.Vma list), else read here."""
        from criu_py import proc
        self.pid = tracee.pid
        if vmas is None:
            vmas = proc.read_maps(tracee.pid)
        self.writable = [(v.start, v.end) for v in vmas if v.perms[1] == "w" and not v.shared]
        vdso = [v for v in vmas if v.path == "[vdso]"]
        off = landing_offset()
        self.landing = 0
        if vdso and off is not None:
            want = _OWN_LANDING_BYTES
            if want and tracee.read_mem(vdso[0].start + off, len(want)) == want:
                self.landing = vdso[0].start + off
        self.restorer = self._find_restorer(tracee, vmas)
        self.safe = bool(self.landing and self.restorer)
        if not self.safe:
            log.warning("pid %d: no %s: a dumper killed while the scratch page is made or "
                        "removed can leave the task in the vdso", self.pid,
                        "vdso landing" if not self.landing else "rt_sigreturn gadget")
            if not self.landing:
                self.landing = self._plain_vdso_syscall(tracee, vdso)

    @staticmethod
    def _plain_vdso_syscall(tracee, vdso) -> int:
        if not vdso:
            raise DumpError(f"pid {tracee.pid} has no vdso: nowhere to issue syscalls from")
        code = tracee.read_mem(vdso[0].start, vdso[0].end - vdso[0].start)
        at = code.find(b"\x0f\x05")
        if at < 0:
            raise DumpError(f"pid {tracee.pid}: no syscall instruction in its vdso")
        return vdso[0].start + at

    @staticmethod
    def _find_restorer(tracee, vmas) -> int:
        """An rt_sigreturn gadget in the task's own executable file mappings (libc first).
        Where one was found in a mapping of the same file part before (every process of
        a tree maps the same libc), only the gadget's bytes are read and compared there;
        a whole mapping (~2 MiB of libc) is read only when they differ or it is new."""
        code = [v for v in vmas if v.perms[2] == "x" and v.path.startswith("/")]
        code.sort(key=lambda v: "libc" not in v.path)
        for v in code:
            at = _GADGETS_SEEN.get(_mapping_key(v))
            if at is None or at + _GADGET_MAX > v.end - v.start:
                continue
            try:
                data = tracee.read_mem(v.start + at, _GADGET_MAX)
            except CriuError:
                continue
            if any(data.startswith(g) for g in RESTORER_GADGETS):
                return v.start + at
        for v in code:
            try:
                data = tracee.read_mem(v.start, v.end - v.start)
            except CriuError:
                continue
            for gadget in RESTORER_GADGETS:
                at = data.find(gadget)
                if at >= 0:
                    _GADGETS_SEEN[_mapping_key(v)] = at
                    return v.start + at
        return 0


class InjectedThread:
    """One stopped thread of the target while injected code may run in it (see above).
    park() writes its frame; syscall() and run_blob() run code; unpark() gives it back its
    registers and mask and a fresh event stop."""

    def __init__(self, site: InjectionSite, tracee: "Tracee", saved_gpregs: bytes | None = None,
                 saved_state: tuple | None = None):
        """saved_gpregs, saved_state (xstate, signal mask): the thread's, when read since
        it stopped (else read here and in park())."""
        from criu_py import arch_x86
        self.site = site
        self.t = tracee
        self.saved_regs = saved_gpregs if saved_gpregs is not None else tracee.get_gpregs()
        self.gp = arch_x86.gpregs_from_bytes(self.saved_regs)
        self.saved_state = saved_state
        self.saved_mask = 0
        self.frame = 0
        self.parked = False
        self.blocked = False
        self.mask = None               # the mask set while injected (None: its own)
        self.at_entry = False          # in a syscall-entry stop (its syscall still to run)
        self.resend = []               # signals that stopped it while injected

    # ---------------------------------------------------------------- frame
    def park(self) -> None:
        from criu_py.restore.sigframe import (TaskRegisters, build_sigframe, frame_layout,
                                              fpstate_for_sigreturn)
        if self.saved_state is not None:
            xstate, self.saved_mask = self.saved_state
        else:
            self.saved_mask = self.t.get_sigmask()
            xstate = self.t.get_xstate()
        regs = TaskRegisters(gp=self.gp, xsave=xstate, sigmask=self.saved_mask,
                             altstack=(0, SS_NO_CHANGE, 0))
        total, _ = frame_layout(len(fpstate_for_sigreturn(xstate)))
        sp = self.gp["sp"]
        base = (sp - RED_ZONE - total) & ~63
        if not any(lo <= base and sp - RED_ZONE <= hi for lo, hi in self.site.writable):
            raise DumpError(f"task {self.t.pid}: no room below its stack pointer {sp:#x} for "
                            f"the {total}-byte frame injection needs")
        frame = bytearray(build_sigframe(base, regs))
        frame[0:8] = struct.pack("<Q", self.site.restorer)     # where `ret` of the landing goes
        self.t.write_mem(base, bytes(frame))
        self.frame = base
        self.parked = True
        killpoint()

    def _set(self, mask: int = ALL_SIGNALS, **values) -> None:
        from criu_py import arch_x86
        regs = dict(self.gp)
        regs.update(values)
        self.t.set_gpregs(arch_x86.gpregs_to_bytes(regs))
        killpoint()
        if self.mask != mask:
            # only now: before, a resumed thread would run on with everything blocked
            self.t.set_sigmask(mask)
            self.blocked = True
            self.mask = mask
            killpoint()

    def _step(self) -> None:
        """PTRACE_SYSCALL to the next syscall stop; a fault inside injected code is an
        error, any other signal is held back and sent again after unpark()."""
        ffi, lib = _lib()
        while True:
            check_errno(lib.cp_ptrace(PTRACE_SYSCALL, self.t.pid, 0, 0), "PTRACE_SYSCALL", self.t.pid)
            status = self.t._wait()
            killpoint()
            sig = os.WSTOPSIG(status)
            if sig == SYSCALL_STOP:
                self.at_entry = not self.at_entry
                return
            if status >> 16:
                continue                      # an event stop (PTRACE_INTERRUPT): go on
            if sig in FAULT_SIGNALS:
                raise DumpError(f"injected code in task {self.t.pid} stopped with signal {sig}")
            self.resend.append(sig)

    def _run_to_own_signal(self, sig: int) -> None:
        """PTRACE_CONT until the thread's stop for the `sig` it sent itself (dropped; the
        thread stays in that stop). Other signals are held back as in _step."""
        ffi, lib = _lib()
        while True:
            check_errno(lib.cp_ptrace(PTRACE_CONT, self.t.pid, 0, 0), "PTRACE_CONT", self.t.pid)
            killpoint()                       # the blob runs free meanwhile
            status = self.t._wait()
            killpoint()
            got = os.WSTOPSIG(status)
            if status >> 16 or got == SYSCALL_STOP:
                continue
            if got in FAULT_SIGNALS:
                raise DumpError(f"injected code in task {self.t.pid} stopped with signal {got}")
            if got == sig:
                code, pid = struct.unpack_from("<i4xi", self.t.get_siginfo(), 8)
                if code == SI_TKILL and pid == self.site.pid:
                    return
            self.resend.append(got)

    def _regs_now(self) -> dict:
        from criu_py import arch_x86
        return arch_x86.gpregs_from_bytes(self.t.get_gpregs())

    # ---------------------------------------------------------------- running code
    def syscall(self, nr: int, *args: int) -> int:
        names = ("di", "si", "dx", "r10", "r8", "r9")
        values = {names[i]: a & 0xFFFFFFFFFFFFFFFF for i, a in enumerate(args)}
        if self.at_entry:
            # the pending syscall is replaced; it returns to the landing
            self._set(ip=self.site.landing + 2, sp=self.frame, orig_ax=nr,
                      ax=(-ENOSYS) & 0xFFFFFFFFFFFFFFFF, **values)
            self._step()
        else:
            self._set(ip=self.site.landing, ax=nr, sp=self.frame,
                      orig_ax=0xFFFFFFFFFFFFFFFF, **values)
            self._step()                      # entry
            self._step()                      # exit
        if self.at_entry:
            raise DumpError(f"injected syscall {nr} in task {self.t.pid}: lost track of its stops")
        ret = self._regs_now()["ax"]
        return ret - (1 << 64) if ret >= 1 << 63 else ret

    def run_blob(self, addr: int, size: int, end_signal: int = 0, **regs) -> None:
        """Run the code at addr (inside [addr, addr + size)) until it issues rt_sigreturn
        (BLOB_END), which it must reach with rsp as it got it; rsp points just above this
        thread's frame, so a blob left alone returns the thread to its own state. With
        end_signal the code ends with SIGNAL_END + BLOB_END and runs free until then."""
        if end_signal:
            self._set(**regs, ip=addr, sp=self.frame + 8, orig_ax=0xFFFFFFFFFFFFFFFF,
                      bp=end_signal, r14=self.site.pid, r15=self.t.pid,
                      mask=ALL_SIGNALS & ~(1 << (end_signal - 1)))
            self._run_to_own_signal(end_signal)
        else:
            self._set(**regs, ip=addr, sp=self.frame + 8, orig_ax=0xFFFFFFFFFFFFFFFF)
        for _ in range(MAX_BLOB_STOPS):
            self._step()
            if self.at_entry:
                now = self._regs_now()
                if now["orig_ax"] == NR_RT_SIGRETURN and addr <= now["ip"] < addr + size:
                    return
        raise DumpError(f"injected code in task {self.t.pid} did not finish")

    # ---------------------------------------------------------------- giving it back
    def unpark(self) -> None:
        ffi, lib = _lib()
        if self.at_entry:
            # finish the pending stop with a harmless call that returns to the landing
            self._set(ip=self.site.landing + 2, sp=self.frame, orig_ax=NR_GETPID)
            self._step()
        if self.blocked:
            self.t.set_sigmask(self.saved_mask)
            killpoint()
        self.t.set_gpregs(self.saved_regs)
        killpoint()
        if self.blocked:
            # from a syscall stop back to the kind of stop the dump started from
            check_errno(lib.cp_ptrace(PTRACE_INTERRUPT, self.t.pid, 0, 0), "PTRACE_INTERRUPT", self.t.pid)
            killpoint()
            check_errno(lib.cp_ptrace(PTRACE_CONT, self.t.pid, 0, 0), "PTRACE_CONT", self.t.pid)
            self.t._wait_event_stop()
            killpoint()
            if self.t.get_gpregs() != self.saved_regs:
                log.warning("pid %d: registers differ after the injection", self.t.pid)
        self.parked = self.blocked = False
        for sig in self.resend:
            lib.criu_py_raw_syscall6(NR_TGKILL, self.site.pid, self.t.pid, sig, 0, 0, 0)
        self.resend = []


class Injection:
    """Run syscalls and code blobs inside a seized process (see above). Entering parks its
    main thread; run_blob(thread=...) parks any other stopped thread of the process on
    first use; leaving gives every parked thread back its exact registers and mask, on
    success and on failure alike."""

    def __init__(self, tracee: Tracee, saved_gpregs: bytes | None = None, vmas=None,
                 states: dict | None = None):
        self.t = tracee
        self.saved_regs = saved_gpregs
        self.vmas = vmas               # its maps if just read (proc.Vma list)
        # tid -> (NT_PRSTATUS bytes, xstate, signal mask) of threads read since they stopped
        self.states = states or {}
        self.site = None
        self.threads: dict[int, InjectedThread] = {}
        self.calls = 0

    def __enter__(self):
        self.site = InjectionSite(self.t, self.vmas)
        state = self.states.get(self.t.pid)
        regs = self.saved_regs if self.saved_regs is not None or state is None else state[0]
        main = InjectedThread(self.site, self.t, regs, state[1:] if state else None)
        self.threads[self.t.pid] = main
        main.park()
        return self

    def __exit__(self, *exc):
        for th in reversed(list(self.threads.values())):
            if th.t.dead or not th.parked:
                continue
            try:
                th.unpark()
            except CriuError as err:
                log.error("giving task %d back its state after injection failed: %s", th.t.pid, err)
                if exc[0] is None:
                    raise
        return False

    def _thread(self, tracee: Tracee | None) -> InjectedThread:
        tracee = tracee or self.t
        th = self.threads.get(tracee.pid)
        if th is None:
            state = self.states.get(tracee.pid)
            th = self.threads[tracee.pid] = InjectedThread(
                self.site, tracee, state[0] if state else None, state[1:] if state else None)
            th.park()
        return th

    def syscall(self, nr: int, *args: int) -> int:
        self.calls += 1
        return self.threads[self.t.pid].syscall(nr, *args)

    def run_blob(self, addr: int, size: int = 4096, thread: Tracee | None = None,
                 end_signal: int = 0, **regs) -> None:
        """Run code already written at addr in the main thread or in `thread` (a seized,
        stopped thread of the same process); the code must end with BLOB_END, and with
        SIGNAL_END + BLOB_END when end_signal (from end_signal()) is given."""
        self.calls += 1
        self._thread(thread).run_blob(addr, size, end_signal=end_signal, **regs)

    def end_signal(self, threads=()) -> int:
        """A signal a blob may end with (see SIGNAL_END): one of END_SIGNALS that the
        process does not catch and that no thread of `threads` has pending; 0 if none."""
        from criu_py import proc
        st = proc.read_signal_bits(self.t.pid)
        busy = st.sig_cgt | st.shd_pnd | st.sig_pnd         # the main thread's own too
        for t in threads:
            if t.pid != self.t.pid:
                busy |= proc.read_signal_bits(self.t.pid, t.pid).sig_pnd
        for sig in END_SIGNALS:
            if not busy & (1 << (sig - 1)):
                return int(sig)
        return 0

    @contextlib.contextmanager
    def scratch_page(self, size: int = 4096):
        """An rwx anonymous mapping inside the task for the duration of the block."""
        addr = self.syscall(NR_MMAP, 0, size, 7, 0x22, -1, 0)   # PROT_RWX, MAP_PRIVATE|ANON
        if -4096 < addr < 0:
            raise DumpError(f"mmap of a scratch page in task {self.t.pid} failed: "
                            f"{os.strerror(-addr)}")
        try:
            yield addr
        finally:
            if not self.t.dead:
                ret = self.syscall(NR_MUNMAP, addr, size)
                if ret < 0:
                    log.warning("munmap of the scratch page in %d failed: %d", self.t.pid, ret)


@contextlib.contextmanager
def seized(pid: int):
    """PTRACE_SEIZE + PTRACE_INTERRUPT the task; on leaving, detach unless it was killed."""
    t = Tracee(pid)
    try:
        t.seize()
    except CriuError:
        t.detach()
        raise
    try:
        yield t
    finally:
        if not t.dead:
            t.detach()
