# Stopping a task without signals (PTRACE_SEIZE + PTRACE_INTERRUPT), reading its
# register sets, and running a few syscalls inside it (injection). Everything the dump
# changes in the task is undone structurally: `seized()` always detaches (or leaves the
# task killed), `Injection` always puts back the code bytes, registers and signal mask.
import contextlib
import errno
import os
import signal
import struct

from criu_py.errors import CriuError, DumpError, NoSuchProcess, check_errno, from_oserror
from criu_py.log import log

PTRACE_CONT = 7
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

SYSCALL_INT3 = b"\x0f\x05\xcc"            # syscall; int3
NR_MMAP, NR_MUNMAP = 9, 11


def _lib():
    from criu_py.native import ffi, lib
    return ffi, lib


class Tracee:
    """One seized task. Methods raise CriuError subclasses, never OSError."""

    def __init__(self, pid: int):
        self.pid = pid
        self.attached = False
        self.dead = False
        self._mem_fd = -1

    # ------------------------------------------------------------ attach / stop
    def seize(self) -> None:
        self.seize_nowait()
        self._wait_event_stop()

    def seize_nowait(self) -> None:
        """PTRACE_SEIZE + PTRACE_INTERRUPT without waiting for the stop (wait_stopped()),
        so that many threads can be asked to stop at once. A thread that is exiting
        refuses the seize: that is NoSuchProcess too."""
        ffi, lib = _lib()
        ret = lib.cp_ptrace(PTRACE_SEIZE, self.pid, 0, 0)
        if ret == -errno.EPERM and self._exiting():
            raise NoSuchProcess(f"task {self.pid} is exiting")
        check_errno(ret, "PTRACE_SEIZE", self.pid)
        self.attached = True
        check_errno(lib.cp_ptrace(PTRACE_INTERRUPT, self.pid, 0, 0), "PTRACE_INTERRUPT", self.pid)

    def wait_stopped(self, drop: tuple = ()) -> None:
        """Wait for the PTRACE_INTERRUPT stop; signals in `drop` that arrive first are
        discarded instead of delivered."""
        self._wait_event_stop(drop)

    def _exiting(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
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

    # ------------------------------------------------------------ running code
    def run_until_trap(self) -> None:
        """Resume and wait for the int3 that ends injected code."""
        ffi, lib = _lib()
        check_errno(lib.cp_ptrace(PTRACE_CONT, self.pid, 0, 0), "PTRACE_CONT", self.pid)
        status = self._wait()
        if os.WSTOPSIG(status) != signal.SIGTRAP or status >> 16:
            raise DumpError(f"injected code in task {self.pid} stopped with signal "
                            f"{os.WSTOPSIG(status)} instead of its trap")


class Injection:
    """Run syscalls (or a small code blob) inside a seized task. Entering saves the
    registers, signal mask and the code bytes at `site`, blocks all signals; leaving puts
    all of it back, on success and on failure alike."""

    def __init__(self, tracee: Tracee, site: int, saved_gpregs: bytes):
        self.t = tracee
        self.site = site
        self.saved_regs = saved_gpregs
        self.saved_code = b""
        self.saved_mask = 0
        self.calls = 0

    def __enter__(self):
        self.saved_mask = self.t.get_sigmask()
        self.saved_code = self.t.read_mem(self.site, len(SYSCALL_INT3))
        self.t.set_sigmask(0xFFFFFFFFFFFFFFFF)
        self.t.write_mem(self.site, SYSCALL_INT3)
        return self

    def __exit__(self, *exc):
        if self.t.dead:
            return False
        try:
            self.t.write_mem(self.site, self.saved_code)
            self.t.set_gpregs(self.saved_regs)
            self.t.set_sigmask(self.saved_mask)
        except CriuError as err:
            log.error("restoring task %d after injection failed: %s", self.t.pid, err)
            if exc[0] is None:
                raise
        return False

    def _regs_for(self, ip: int, base: bytes | None = None, **values) -> bytes:
        from criu_py import arch_x86
        regs = arch_x86.gpregs_from_bytes(base or self.saved_regs)
        regs.update(values)
        regs["ip"] = ip
        regs["orig_ax"] = 0xFFFFFFFFFFFFFFFF   # not in a syscall: nothing to restart
        return arch_x86.gpregs_to_bytes(regs)

    def syscall(self, nr: int, *args: int) -> int:
        names = ("di", "si", "dx", "r10", "r8", "r9")
        values = {"ax": nr, **{names[i]: a & 0xFFFFFFFFFFFFFFFF for i, a in enumerate(args)}}
        self.t.set_gpregs(self._regs_for(self.site, **values))
        self.t.run_until_trap()
        self.calls += 1
        from criu_py import arch_x86
        ret = arch_x86.gpregs_from_bytes(self.t.get_gpregs())["ax"]
        return ret - (1 << 64) if ret >= 1 << 63 else ret

    def run_blob(self, addr: int, **regs) -> None:
        """Run code already written at addr; it must end with int3."""
        self.t.set_gpregs(self._regs_for(addr, **regs))
        self.t.run_until_trap()
        self.calls += 1

    def run_blob_in(self, thread: Tracee, thread_regs: bytes, addr: int, **regs) -> None:
        """Run code already written at addr (ending with int3) in another stopped thread
        of the same process, then put that thread's registers and signal mask back."""
        if thread is self.t:
            self.run_blob(addr, **regs)
            return
        mask = thread.get_sigmask()
        thread.set_sigmask(0xFFFFFFFFFFFFFFFF)
        try:
            thread.set_gpregs(self._regs_for(addr, base=thread_regs, **regs))
            thread.run_until_trap()
            self.calls += 1
        finally:
            if not thread.dead:
                thread.set_gpregs(thread_regs)
                thread.set_sigmask(mask)

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
