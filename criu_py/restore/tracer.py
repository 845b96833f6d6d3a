# Removing the restore's own memory from the restored tasks, as CRIU does with ptrace:
# once every thread of the tree has set itself up and waits on the sync page, the restore
# command seizes them all and lets them go; each thread stops at an int3 right before its
# rt_sigreturn, with its sigframe on its own stack. The restore command then makes one
# thread per process run munmap() of the restorer region and of the sync page through a
# `syscall` instruction of the vdso (which is back at its dumped address and identical
# to ours), points every thread at rt_sigreturn on that same instruction, and detaches:
# the tasks continue from their saved registers with nothing of the restore left in
# their address space.
import ctypes
import os
import signal

from criu_py.errors import RestoreError

PTRACE_SYSCALL = 24
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACESYSGOOD = 1
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
        raise RestoreError(f"removing the restorer region of {pid}: the task ended while {what}")
    return os.WSTOPSIG(st)


def _regs(pid: int) -> dict:
    from criu_py import arch_x86
    from criu_py.native import ffi, lib
    buf = ffi.new("char[]", 216)
    r = lib.cp_getregset(pid, NT_PRSTATUS, buf, 216)
    if r < 0:
        raise RestoreError(f"removing the restorer region of {pid}: PTRACE_GETREGSET: {os.strerror(-r)}")
    return arch_x86.gpregs_from_bytes(bytes(ffi.buffer(buf, 216)))


def _set_regs(pid: int, regs: dict) -> None:
    from criu_py import arch_x86
    from criu_py.native import ffi, lib
    data = bytearray(arch_x86.gpregs_to_bytes(regs))
    r = lib.cp_setregset(pid, NT_PRSTATUS, ffi.from_buffer(data), len(data))
    if r < 0:
        raise RestoreError(f"removing the restorer region of {pid}: PTRACE_SETREGSET: {os.strerror(-r)}")


def _ptrace(req: int, pid: int, what: str) -> None:
    from criu_py.native import lib
    r = lib.cp_ptrace(req, pid, 0, 0)
    if r < 0:
        raise RestoreError(f"removing the restorer region of {pid}: {what}: {os.strerror(-r)}")


def wait_trap(tid: int) -> None:
    sig = _wait_stop(tid, "waiting for the restorer's trap")
    if sig != signal.SIGTRAP:
        raise RestoreError(f"removing the restorer region of {tid}: stopped by signal {sig}, "
                           f"not the trap")


def run_syscalls(calls: list[tuple[int, int, int, tuple]], regs: dict) -> dict:
    """Make each stopped thread run one syscall: calls [(tid, syscall_addr, nr, args)],
    every step for all threads before the next (they run in parallel; we wait for a stop
    only when it has not happened yet). regs: tid -> the thread's registers now, updated
    to those after its syscall. Returns tid -> the syscall's return value."""
    names = ("di", "si", "dx", "r10", "r8", "r9")
    for tid, syscall_addr, nr, args in calls:
        r = dict(regs[tid])
        r.update(ip=syscall_addr, ax=nr, orig_ax=2**64 - 1, **dict(zip(names, args)))
        _set_regs(tid, r)
        _ptrace(PTRACE_SYSCALL, tid, "PTRACE_SYSCALL")    # the trap's SIGTRAP is dropped
    for tid, _, _, _ in calls:
        _wait_stop(tid, "entering a syscall")
        _ptrace(PTRACE_SYSCALL, tid, "PTRACE_SYSCALL")
    rets = {}
    for tid, _, _, _ in calls:
        _wait_stop(tid, "leaving a syscall")
        regs[tid] = _regs(tid)
        ret = regs[tid]["ax"]
        rets[tid] = ret - (1 << 64) if ret >> 63 else ret
    return rets


def prepare_release(procs: list[tuple[list[int], int, list[tuple[int, int]]]]) -> None:
    """procs: [(tids, syscall_addr, unmaps)], processes whose every thread is stopped at
    its trap (rsp = its sigframe + 8). Unmap each process's `unmaps` from its first
    thread, then bring every thread to the entry of rt_sigreturn at its process's
    syscall_addr. From that stop a thread completes its return into the task whatever
    happens to us (a trap stop would deliver SIGTRAP to a thread whose tracer died).
    All processes step together (run_syscalls). Each thread's registers are read once,
    at the trap: rt_sigreturn takes everything but ip, ax and sp from the frame."""
    at_trap = {tid: _regs(tid) for tids, _, _ in procs for tid in tids}
    regs = {tids[0]: at_trap[tids[0]] for tids, _, _ in procs}
    for k in range(max((len(unmaps) for _, _, unmaps in procs), default=0)):
        calls = [(tids[0], addr, NR_MUNMAP, unmaps[k]) for tids, addr, unmaps in procs
                 if k < len(unmaps)]
        for tid, ret in run_syscalls(calls, regs).items():
            if ret != 0:
                raise RestoreError(f"removing the restorer region of {tid}: munmap failed: "
                                   f"{os.strerror(-ret)}")
    everyone = [tid for tids, _, _ in procs for tid in tids]
    for tids, addr, _ in procs:
        for tid in tids:
            r = dict(at_trap[tid])
            r.update(ip=addr, ax=NR_RT_SIGRETURN, orig_ax=2**64 - 1)
            _set_regs(tid, r)
    for tid in everyone:
        _ptrace(PTRACE_SYSCALL, tid, "PTRACE_SYSCALL")     # the trap's SIGTRAP is dropped
    for tid in everyone:
        _wait_stop(tid, "entering rt_sigreturn")


def commit(tids: list[int]) -> None:
    """Drop PTRACE_O_EXITKILL: from here on, our death no longer takes the tasks."""
    from criu_py.native import lib
    for tid in tids:
        lib.cp_ptrace(PTRACE_SETOPTIONS, tid, 0, PTRACE_O_TRACESYSGOOD)


def finish_release(tids: list[int]) -> None:
    """Through rt_sigreturn before letting go: once the restore command returns, every
    thread has its registers and signal mask back."""
    for tid in tids:
        _ptrace(PTRACE_SYSCALL, tid, "PTRACE_SYSCALL")
    for tid in tids:
        _wait_stop(tid, "leaving rt_sigreturn")
    for tid in tids:
        _ptrace(PTRACE_DETACH, tid, "PTRACE_DETACH")
