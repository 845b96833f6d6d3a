# Removing the restorer region from the restored task, as CRIU does with ptrace: the
# restore parent seizes the task before it enters the restorer; the restorer places the
# sigframe on the task's own stack and stops with int3 right before rt_sigreturn. The
# parent then makes the task run munmap(region) through a `syscall` instruction of the
# vdso (which is back at its dumped address and identical to ours), turns the syscall's
# exit into rt_sigreturn at that same instruction, and detaches: the task continues from
# its saved registers with nothing of the restore left in its address space.
import ctypes
import os
import signal

from criu_py.errors import RestoreError

PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_O_EXITKILL = 0x100000
NT_PRSTATUS = 1
WALL = 0x40000000
NR_MUNMAP, NR_RT_SIGRETURN = 11, 15
SYSCALL_INSN = b"\x0f\x05"


def vdso_syscall_offset() -> int | None:
    """Offset of a `syscall` instruction in this process's vdso (same image everywhere)."""
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                s, e = (int(x, 16) for x in line.split()[0].split("-"))
                off = ctypes.string_at(s, e - s).find(SYSCALL_INSN)
                return off if off >= 0 else None
    return None


def seize(pid: int) -> None:
    """Trace the new task until it is handed over. EXITKILL: if the restore dies before
    that (killed, even with SIGKILL), the kernel kills the half-made task with it."""
    from criu_py.native import lib
    r = lib.cp_ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_EXITKILL)
    if r < 0:
        raise RestoreError(f"cannot trace the new task {pid}: {os.strerror(-r)}")


def _wait_stop(pid: int, what: str) -> int:
    while True:
        try:
            _, st = os.waitpid(pid, WALL)
            break
        except InterruptedError:
            continue
    if not os.WIFSTOPPED(st):
        raise RestoreError(f"removing the restorer region: the task ended while {what}")
    return os.WSTOPSIG(st)


def _regs(pid: int) -> dict:
    from criu_py import arch_x86
    from criu_py.native import ffi, lib
    buf = ffi.new("char[]", 216)
    r = lib.cp_getregset(pid, NT_PRSTATUS, buf, 216)
    if r < 0:
        raise RestoreError(f"removing the restorer region: PTRACE_GETREGSET: {os.strerror(-r)}")
    return arch_x86.gpregs_from_bytes(bytes(ffi.buffer(buf, 216)))


def _set_regs(pid: int, regs: dict) -> None:
    from criu_py import arch_x86
    from criu_py.native import ffi, lib
    data = bytearray(arch_x86.gpregs_to_bytes(regs))
    r = lib.cp_setregset(pid, NT_PRSTATUS, ffi.from_buffer(data), len(data))
    if r < 0:
        raise RestoreError(f"removing the restorer region: PTRACE_SETREGSET: {os.strerror(-r)}")


def _ptrace(req: int, pid: int, what: str) -> None:
    from criu_py.native import lib
    r = lib.cp_ptrace(req, pid, 0, 0)
    if r < 0:
        raise RestoreError(f"removing the restorer region: {what}: {os.strerror(-r)}")


def unmap_region_and_release(pid: int, start: int, length: int, syscall_addr: int) -> None:
    """At the restorer's int3: munmap(start, length) inside the task, then rt_sigreturn."""
    sig = _wait_stop(pid, "waiting for the restorer's trap")
    if sig != signal.SIGTRAP:
        raise RestoreError(f"removing the restorer region: task stopped by signal {sig}, not the trap")
    regs = _regs(pid)
    saved_sp = regs["sp"]
    regs.update(ip=syscall_addr, ax=NR_MUNMAP, di=start, si=length, orig_ax=2**64 - 1)
    _set_regs(pid, regs)
    _ptrace(PTRACE_SYSCALL, pid, "PTRACE_SYSCALL")        # the trap's SIGTRAP is dropped
    _wait_stop(pid, "entering munmap")
    _ptrace(PTRACE_SYSCALL, pid, "PTRACE_SYSCALL")
    _wait_stop(pid, "leaving munmap")
    regs = _regs(pid)
    ret = regs["ax"] - (1 << 64) if regs["ax"] >> 63 else regs["ax"]
    if ret != 0:
        raise RestoreError(f"removing the restorer region: munmap failed: {os.strerror(-ret)}")
    regs.update(ip=syscall_addr, ax=NR_RT_SIGRETURN, sp=saved_sp)
    _set_regs(pid, regs)
    _ptrace(PTRACE_DETACH, pid, "PTRACE_DETACH")
