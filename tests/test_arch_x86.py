# Register conversions both ways: syscall-restart convention, and XSAVE buffer <-> CRIU
# fpregs entry <-> XSAVE buffer / signal-frame area.
import os
import struct

from criu_py import arch_x86 as A
from criu_py.images.pb import core_x86_pb2

M64 = (1 << 64) - 1


def regs(**kw):
    r = {n: 0 for n in A.GPREG_NAMES}
    r.update(kw)
    return r


def test_gpregs_bytes_round_trip():
    r = {n: (i + 1) * 0x0101010101 for i, n in enumerate(A.GPREG_NAMES)}
    raw = A.gpregs_to_bytes(r)
    assert len(raw) == A.GPREGS_SIZE == 216
    assert A.gpregs_from_bytes(raw) == r
    e = core_x86_pb2.user_x86_regs_entry()
    A.gpregs_to_entry(r, e)
    assert A.gpregs_from_entry(e) == r and e.mode == 1


def test_restart_conventions():
    ip = 0x7F0000001002
    for err in (A.ERESTARTSYS, A.ERESTARTNOINTR, A.ERESTARTNOHAND, A.ERESTART_RESTARTBLOCK):
        out = A.regs_for_image(regs(ax=(-err) & M64, orig_ax=230, ip=ip))
        assert out["ax"] == 230 and out["ip"] == ip - 2 and out["orig_ax"] == 230
    # not in a syscall, or a syscall that finished: untouched
    for r in (regs(ax=(-A.ERESTARTSYS) & M64, orig_ax=M64, ip=ip), regs(ax=5, orig_ax=0, ip=ip)):
        assert A.regs_for_image(r) == r


def synthetic_xstate(layout):
    buf = bytearray(os.urandom(layout.size))
    buf[A.SW_BYTES_OFFSET:A.SW_BYTES_OFFSET + 48] = bytes(48)
    struct.pack_into("<Q", buf, A.SW_BYTES_OFFSET, layout.xfeatures)
    buf[512:576] = bytes(64)
    struct.pack_into("<Q", buf, 512, layout.xfeatures)        # xstate_bv
    buf[4:6] = bytes([buf[4], 0])                              # abridged tag word
    buf[416:464] = bytes(48)                                   # fxsave reserved
    return bytes(buf)


def test_xsave_round_trip():
    layout = A.xsave_layout()
    assert layout.size >= 576 and layout.xfeatures & 3 == 3
    buf = synthetic_xstate(layout)
    e = core_x86_pb2.user_x86_fpregs_entry()
    A.fpregs_to_entry(buf, e)
    assert len(e.st_space) == 32 and len(e.xmm_space) == 64
    if A.XFEATURE_YMM in layout.components:
        assert len(e.xsave.ymmh_space) == 64
    back = A.fpregs_from_entry(e, layout)
    assert len(back) == layout.size
    assert back[:416] == buf[:416]                             # legacy area
    assert back[512:520] == buf[512:520]                       # xstate_bv
    for feat, (off, size) in layout.components.items():
        if feat in A.XSAVE_FIELDS:
            assert back[off:off + size] == buf[off:off + size], f"component {feat}"


def test_sigframe_area_has_magics():
    layout = A.xsave_layout()
    e = core_x86_pb2.user_x86_fpregs_entry()
    A.fpregs_to_entry(synthetic_xstate(layout), e)
    area = A.xsave_sigframe_bytes(e, layout)
    magic1, ext, xfeat, size = struct.unpack_from("<IIQI", area, A.SW_BYTES_OFFSET)
    assert magic1 == A.FP_XSTATE_MAGIC1 and size == layout.size and ext == size + 4
    assert xfeat & 3 == 3
    assert struct.unpack_from("<I", area, size)[0] == A.FP_XSTATE_MAGIC2


def test_live_xstate_of_a_task():
    """The real ptrace XSTATE buffer of a stopped child converts and rebuilds identically."""
    import subprocess
    from criu_py.ptrace import seized
    p = subprocess.Popen(["sleep", "30"])
    try:
        with seized(p.pid) as t:
            buf = t.get_xstate()
        layout = A.xsave_layout()
        assert len(buf) == layout.size and A.xstate_xcr0(buf) & 3 == 3
        e = core_x86_pb2.user_x86_fpregs_entry()
        A.fpregs_to_entry(buf, e)
        assert e.mxcsr & 0x1F80 == 0x1F80
        back = A.fpregs_from_entry(e, layout)
        assert back[:416] == buf[:416]
        for feat, (off, size) in layout.components.items():
            if feat in A.XSAVE_FIELDS and A.xstate_xcr0(buf) >> feat & 1:
                assert back[off:off + size] == buf[off:off + size]
    finally:
        p.kill()
        p.wait()
