# x86_64 register layouts, both directions: the kernel's user_regs_struct (NT_PRSTATUS)
# and XSAVE area (NT_X86_XSTATE) <-> CRIU's user_x86_regs_entry / user_x86_fpregs_entry.
# The dump converts buffer -> entry; the restorer needs entry -> buffer to build its
# rt_sigframe. Also the syscall-restart convention for a task stopped inside a syscall.
import struct
from functools import lru_cache

# ------------------------------------------------------------------ general registers
# user_regs_struct, in kernel order; also the field order (1..27) of user_x86_regs_entry.
GPREG_NAMES = ("r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx",
               "dx", "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss", "fs_base",
               "gs_base", "ds", "es", "fs", "gs")
GPREGS_SIZE = 8 * len(GPREG_NAMES)          # 216 = NT_PRSTATUS size
_GPREGS = struct.Struct("<27Q")

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
NR_RESTART_SYSCALL = 219


def gpregs_from_bytes(buf: bytes) -> dict:
    return dict(zip(GPREG_NAMES, _GPREGS.unpack_from(buf)))


def gpregs_to_bytes(regs: dict) -> bytes:
    return _GPREGS.pack(*(regs[n] & 0xFFFFFFFFFFFFFFFF for n in GPREG_NAMES))


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def regs_for_image(regs: dict) -> dict:
    """Registers as CRIU stores them for a task stopped in a syscall: the restart the
    kernel would have done is applied here, because the restored task returns to user
    space through rt_sigreturn (orig_ax = -1 there, so the kernel restarts nothing).
    -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND: ax = orig_ax, ip -= 2 (re-execute the
    syscall instruction). -ERESTART_RESTARTBLOCK (relative nanosleep, poll, futex with a
    timeout): the kernel's restart block does not survive a restore, so the original
    syscall is re-issued the same way: its arguments are still in the registers. Upstream
    returns -EINTR there instead (fixtures/criu-4.2/counter: clock_nanosleep with ax = -4),
    which wakes a plain sleep() early; re-issuing keeps the syscall invisible to the
    program, at the price of sleeping the full interval again. orig_ax is kept."""
    out = dict(regs)
    if _s64(regs["orig_ax"]) >= 0:
        err = -_s64(regs["ax"])
        if err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
            out["ax"] = regs["orig_ax"]
            out["ip"] = regs["ip"] - 2
    return out


def gpregs_to_entry(regs: dict, entry) -> None:
    """Fill a user_x86_regs_entry (mode NATIVE) from a register dict."""
    for name in GPREG_NAMES:
        setattr(entry, name, regs[name] & 0xFFFFFFFFFFFFFFFF)
    entry.mode = 1  # NATIVE


def gpregs_from_entry(entry) -> dict:
    return {name: getattr(entry, name) for name in GPREG_NAMES}


# ------------------------------------------------------------------ XSAVE layout
# Component numbers of the XSAVE area and the user_x86_xsave_entry field that holds each
# (name, element width in bytes). Legacy x87/SSE (0, 1) live in user_x86_fpregs_entry.
XFEATURE_YMM, XFEATURE_BNDREGS, XFEATURE_BNDCSR = 2, 3, 4
XFEATURE_OPMASK, XFEATURE_ZMM_HI256, XFEATURE_HI16_ZMM, XFEATURE_PKRU = 5, 6, 7, 9
XSAVE_FIELDS = {
    XFEATURE_YMM: ("ymmh_space", 4),
    XFEATURE_BNDREGS: ("bndreg_state", 8),
    XFEATURE_BNDCSR: ("bndcsr_state", 8),
    XFEATURE_OPMASK: ("opmask_reg", 8),
    XFEATURE_ZMM_HI256: ("zmm_upper", 8),
    XFEATURE_HI16_ZMM: ("hi16_zmm", 8),
    XFEATURE_PKRU: ("pkru", 4),
}
FXSAVE_SIZE = 512
XSAVE_HEADER_OFFSET = 512
XSAVE_HEADER_SIZE = 64
SW_BYTES_OFFSET = 464                 # fxsave's software-available bytes
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FP_XSTATE_MAGIC2_SIZE = 4


class XsaveLayout:
    """xfeatures: user state features of the CPU (CPUID 0xD.0 EDX:EAX); size: standard-format
    area size for all of them; components: feature -> (offset, size), standard format."""
    __slots__ = ("xfeatures", "size", "components")

    def __init__(self, xfeatures: int, size: int, components: dict):
        self.xfeatures, self.size, self.components = xfeatures, size, components


@lru_cache(maxsize=1)
def xsave_layout() -> XsaveLayout:
    """The XSAVE standard-format layout of this CPU, from CPUID leaf 0xD."""
    from criu_py.native import ffi, lib
    out = ffi.new("unsigned int[4]")
    lib.cp_cpuid(0xD, 0, out)
    xfeatures = out[0] | (out[3] << 32)
    size = out[2]
    comps = {}
    for feat in range(2, 64):
        if xfeatures & (1 << feat):
            lib.cp_cpuid(0xD, feat, out)
            if out[0]:
                comps[feat] = (out[1], out[0])
                size = max(size, out[1] + out[0])
    return XsaveLayout(xfeatures, size, comps)


def xstate_xcr0(buf: bytes) -> int:
    """The kernel puts the task's XCR0 in the sw bytes of a ptrace XSTATE buffer."""
    return struct.unpack_from("<Q", buf, SW_BYTES_OFFSET)[0] if len(buf) >= SW_BYTES_OFFSET + 8 else 3


def _words(buf: bytes, off: int, size: int, width: int) -> list[int]:
    fmt = "<%d%s" % (size // width, "I" if width == 4 else "Q")
    return list(struct.unpack_from(fmt, buf, off))


def fpregs_to_entry(buf: bytes, entry, layout: XsaveLayout | None = None) -> None:
    """Fill a user_x86_fpregs_entry from a ptrace NT_X86_XSTATE (or 512-byte FXSAVE) buffer."""
    cwd, swd, twd, fop, rip, rdp, mxcsr, mxcsr_mask = struct.unpack_from("<4H2Q2I", buf, 0)
    entry.cwd, entry.swd, entry.twd, entry.fop = cwd, swd, twd, fop
    entry.rip, entry.rdp, entry.mxcsr, entry.mxcsr_mask = rip, rdp, mxcsr, mxcsr_mask
    entry.st_space.extend(_words(buf, 32, 128, 4))
    entry.xmm_space.extend(_words(buf, 160, 256, 4))
    if len(buf) <= FXSAVE_SIZE:
        return
    layout = layout or xsave_layout()
    xcr0 = xstate_xcr0(buf)
    xs = entry.xsave
    xs.xstate_bv = struct.unpack_from("<Q", buf, XSAVE_HEADER_OFFSET)[0]
    for feat, (name, width) in XSAVE_FIELDS.items():
        if not (xcr0 & (1 << feat)) or feat not in layout.components:
            continue
        off, size = layout.components[feat]
        if off + size <= len(buf):
            getattr(xs, name).extend(_words(buf, off, size, width))


def fpregs_from_entry(entry, layout: XsaveLayout | None = None) -> bytes:
    """A standard-format XSAVE area (as PTRACE_SETREGSET NT_X86_XSTATE takes it) from a
    user_x86_fpregs_entry. The sw bytes hold XCR0 as ptrace reports it; a signal frame
    needs xsave_sigframe_bytes() instead."""
    layout = layout or xsave_layout()
    buf = bytearray(layout.size if entry.HasField("xsave") else FXSAVE_SIZE)
    struct.pack_into("<4H2Q2I", buf, 0, entry.cwd, entry.swd, entry.twd, entry.fop,
                     entry.rip, entry.rdp, entry.mxcsr, entry.mxcsr_mask)
    struct.pack_into("<32I", buf, 32, *(list(entry.st_space) + [0] * 32)[:32])
    struct.pack_into("<64I", buf, 160, *(list(entry.xmm_space) + [0] * 64)[:64])
    if not entry.HasField("xsave"):
        return bytes(buf)
    xs = entry.xsave
    xfeatures = 3
    for feat, (name, width) in XSAVE_FIELDS.items():
        words = list(getattr(xs, name))
        if not words or feat not in layout.components:
            continue
        off, size = layout.components[feat]
        n = size // width
        struct.pack_into("<%d%s" % (n, "I" if width == 4 else "Q"), buf, off, *(words + [0] * n)[:n])
        xfeatures |= 1 << feat
    xfeatures &= layout.xfeatures | 3
    struct.pack_into("<Q", buf, XSAVE_HEADER_OFFSET, xs.xstate_bv & (layout.xfeatures | 3))
    struct.pack_into("<Q", buf, SW_BYTES_OFFSET, xfeatures)
    return bytes(buf)


def xsave_sigframe_bytes(entry, layout: XsaveLayout | None = None) -> bytes:
    """The XSAVE area for an rt_sigframe (uc_flags UC_FP_XSTATE): the standard area with
    the fpx_sw_bytes filled in (magic1, extended size, xfeatures, xstate size) and
    FP_XSTATE_MAGIC2 right after it. Without these the kernel drops the AVX state."""
    layout = layout or xsave_layout()
    area = bytearray(fpregs_from_entry(entry, layout))
    if len(area) <= FXSAVE_SIZE:
        return bytes(area)
    xfeatures = struct.unpack_from("<Q", area, SW_BYTES_OFFSET)[0]
    size = len(area)
    area[SW_BYTES_OFFSET:SW_BYTES_OFFSET + 48] = bytes(48)
    struct.pack_into("<IIQI", area, SW_BYTES_OFFSET, FP_XSTATE_MAGIC1,
                     size + FP_XSTATE_MAGIC2_SIZE, xfeatures, size)
    return bytes(area) + struct.pack("<I", FP_XSTATE_MAGIC2)
