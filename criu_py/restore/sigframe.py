# The x86_64 rt_sigframe the PIE restorer returns through: rt_sigreturn loads every
# general register, rip, rflags, the signal mask and the full xsave state (x87/SSE/AVX/
# AVX-512/PKRU) from it in one step, which is how a restored task gets its registers back.
# Built in Python (it is plain data) and placed where the restorer points rsp.
import struct

from criu_py.proc import Record

UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4
SS_DISABLE = 2

FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FX_SW_BYTES_OFFSET = 464          # struct _fpx_sw_bytes inside the 512-byte legacy area
XSAVE_HEADER_OFFSET = 512         # xstate_bv lives here
LEGACY_XSAVE_SIZE = 512 + 64      # legacy area + xsave header

# The kernel's restart codes seen in rax when a task is stopped inside a syscall.
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516

# struct rt_sigframe: pretcode, then struct ucontext (flags, link, stack_t, sigcontext,
# sigset), then siginfo. Offsets from the start of the frame.
UC_OFFSET = 8
MCONTEXT_OFFSET = UC_OFFSET + 8 + 8 + 24
SIGMASK_OFFSET = MCONTEXT_OFFSET + 256
FRAME_SIZE = SIGMASK_OFFSET + 8 + 128   # + siginfo

# struct sigcontext (64-bit) register order.
SIGCONTEXT_REGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "di", "si", "bp",
                   "bx", "dx", "ax", "cx", "sp", "ip", "flags")


class TaskRegisters(Record):
    """What the frame needs: user_regs_struct names (user_x86_regs_entry fields) in `gp`,
    the ptrace NT_X86_XSTATE-layout buffer in `xsave`, the blocked signal mask and the
    sigaltstack (ss_sp, ss_flags, ss_size). A Record, not a dataclass: the dump's
    injection builds frames too, and dataclasses' import alone costs ~12 ms."""
    _fields = ("gp", "xsave", "sigmask", "altstack")
    altstack = (0, SS_DISABLE, 0)


def u64(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def s64(v: int) -> int:
    v = u64(v)
    return v - (1 << 64) if v >> 63 else v


def restart_syscall(gp: dict) -> dict:
    """A task stopped inside a blocking syscall has rax = -ERESTART*, orig_rax = nr: make
    it issue the syscall again (rip back over `syscall`, rax = nr). RESTARTBLOCK's kernel
    restart block does not survive a checkpoint, so the original call is re-issued.
    Registers already adjusted at dump (upstream's convention) pass unchanged."""
    gp = dict(gp)
    if s64(gp.get("orig_ax", -1)) >= 0 and -s64(gp["ax"]) in (
            ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
        gp["ax"] = gp["orig_ax"]
        gp["ip"] = u64(gp["ip"] - 2)
    return gp


_LOCAL_XSTATE = None
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
NR_ARCH_PRCTL = 158


def xcomp_perm() -> int:
    """The xsave features this process may use (arch_prctl ARCH_GET_XCOMP_PERM): XCR0
    minus the dynamically enabled ones (AMX tile data) it has not asked for."""
    from criu_py.native import ffi, lib
    out = ffi.new("uint64_t *")
    r = lib.criu_py_restore_syscall(NR_ARCH_PRCTL, ARCH_GET_XCOMP_PERM,
                                    int(ffi.cast("uintptr_t", out)), 0, 0, 0, 0)
    return out[0] if r == 0 else lib.criu_py_xcr0()


def local_xstate() -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(features, standard-format xsave size, {component: (offset, size)}) this process
    may put in a signal frame: XCR0 limited to its permitted features, the size up to the
    end of the last of them, from CPUID 0xD. The kernel refuses a frame whose size differs
    from that (and then silently restores x87/SSE only): on a CPU with AMX, CPUID's size
    (11008 bytes) is larger than a process without AMX permission may use. Offsets differ
    between CPUs (no MPX gap on recent Intel parts: opmask at 832, not 1088), so nothing
    here is a constant."""
    global _LOCAL_XSTATE
    if _LOCAL_XSTATE is None:
        from criu_py.native import ffi, lib
        out = ffi.new("uint32_t[4]")
        features = lib.criu_py_xcr0() & xcomp_perm()
        size = LEGACY_XSAVE_SIZE
        comps = {}
        for i in range(2, 64):
            if features >> i & 1:
                lib.criu_py_cpuid(0xD, i, out)
                comps[i] = (out[1], out[0])
                size = max(size, out[1] + out[0])
        _LOCAL_XSTATE = (features, size, comps)
    return _LOCAL_XSTATE


def missing_xfeatures(xsave: bytes) -> int:
    """The dynamically enabled features (AMX) the dumped state uses that this process may
    not use yet (request_xfeatures asks for them)."""
    if len(xsave) < LEGACY_XSAVE_SIZE:
        return 0
    used = struct.unpack_from("<Q", xsave, XSAVE_HEADER_OFFSET)[0]
    from criu_py.native import lib
    return used & lib.criu_py_xcr0() & ~xcomp_perm()


def request_xfeatures(missing: int) -> None:
    """Ask for the missing features (missing_xfeatures), before the frame is built: a
    task that had them back gets them again."""
    global _LOCAL_XSTATE
    from criu_py.native import lib
    for bit in range(2, 64):
        if missing >> bit & 1:
            lib.criu_py_restore_syscall(NR_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, bit, 0, 0, 0, 0)
    if missing:
        _LOCAL_XSTATE = None


def fpstate_for_sigreturn(xsave: bytes) -> bytes:
    """The ptrace XSTATE buffer (this CPU's standard layout) with the software-reserved
    bytes rewritten the way the kernel expects them in a signal frame (magic1, sizes,
    xfeatures) and magic2 appended. Without them, or with a size above what the kernel
    allows for this CPU, rt_sigreturn restores only x87/SSE and resets AVX state."""
    if len(xsave) < LEGACY_XSAVE_SIZE:
        raise ValueError(f"xsave area of {len(xsave)} bytes is too short")
    xcr0, size, _ = local_xstate()
    buf = bytearray(xsave[:size].ljust(size, b"\0"))
    # ptrace keeps XCR0 in the first word of the software bytes: the features to load.
    xfeatures = struct.unpack_from("<Q", buf, FX_SW_BYTES_OFFSET)[0] or \
        (struct.unpack_from("<Q", buf, XSAVE_HEADER_OFFSET)[0] | 0x3)
    xfeatures &= xcr0
    bv = struct.unpack_from("<Q", buf, XSAVE_HEADER_OFFSET)[0]
    struct.pack_into("<Q", buf, XSAVE_HEADER_OFFSET, bv & xcr0)
    sw = struct.pack("<IIQI", FP_XSTATE_MAGIC1, size + 4, xfeatures, size) + bytes(28)
    buf[FX_SW_BYTES_OFFSET:FX_SW_BYTES_OFFSET + 48] = sw
    return bytes(buf) + struct.pack("<I", FP_XSTATE_MAGIC2)


def frame_layout(fpstate_len: int) -> tuple[int, int]:
    """(frame size incl. fpstate, offset of the fpstate) for a frame at a 64-aligned base."""
    fp_off = (FRAME_SIZE + 63) & ~63
    return fp_off + fpstate_len, fp_off


def build_sigframe(base: int, regs: TaskRegisters) -> bytes:
    """The frame bytes for address `base` (64-aligned); rt_sigreturn runs with rsp = base + 8."""
    if base % 64:
        raise ValueError("sigframe base must be 64-byte aligned")
    gp = restart_syscall(regs.gp)
    fpstate = fpstate_for_sigreturn(regs.xsave)
    total, fp_off = frame_layout(len(fpstate))
    buf = bytearray(total)
    struct.pack_into("<QQ", buf, UC_OFFSET, UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS, 0)
    # rt_sigreturn also sets the alternate signal stack from uc_stack.
    ss_sp, ss_flags, ss_size = regs.altstack
    struct.pack_into("<QiiQ", buf, UC_OFFSET + 16, ss_sp, ss_flags, 0, ss_size)
    struct.pack_into("<18Q", buf, MCONTEXT_OFFSET, *(u64(gp.get(n, 0)) for n in SIGCONTEXT_REGS))
    struct.pack_into("<HHHH", buf, MCONTEXT_OFFSET + 144,
                     gp.get("cs", 0x33) or 0x33, 0, 0, gp.get("ss", 0x2b) or 0x2b)
    struct.pack_into("<Q", buf, MCONTEXT_OFFSET + 184, base + fp_off)   # fpstate pointer
    struct.pack_into("<Q", buf, SIGMASK_OFFSET, u64(regs.sigmask))
    buf[fp_off:fp_off + len(fpstate)] = fpstate
    return bytes(buf)
