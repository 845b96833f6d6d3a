# What only the task itself can tell: signal actions, clear_child_tid, brk, sigaltstack,
# interval timers and a few prctl values (dumpable, securebits, pdeath signal, child
# subreaper, THP disable). Instead of one injected syscall per item (67 round trips), a small
# code blob runs once in a scratch page inside the task and leaves the answers there; a
# second, smaller blob then runs in every other thread for what is per thread
# (clear_child_tid, sigaltstack, securebits, pdeath signal).
import fcntl
import os
import struct

from criu_py.errors import DumpError
from criu_py.proc import Record
from criu_py.ptrace import BLOB_END, SIGNAL_END, Injection, Tracee

# x86_64, position independent, r12 = output area; never touches rsp; ends with
# rt_sigreturn (ptrace.BLOB_END), which the dumper stops at (a blob left alone by a dead
# dumper returns the task to its own state through the frame above rsp). Source:
#   prctl(PR_GET_TID_ADDRESS, r12+0); [r12+8] = brk(0); sigaltstack(NULL, r12+16);
#   for w in 0..2: getitimer(w, r12+48+32*w)
#   for sig in 1..64 except 9, 19: rt_sigaction(sig, NULL, r12+192+32*sig, 8),
#       a non-zero return stored at [r12+160]
#   [r12+2272] = prctl(PR_GET_DUMPABLE); [r12+2280] = prctl(PR_GET_SECUREBITS);
#   prctl(PR_GET_PDEATHSIG, r12+2288); prctl(PR_GET_CHILD_SUBREAPER, r12+2292);
#   [r12+2296] = prctl(PR_GET_THP_DISABLE)
#   mov $15, %eax; syscall
BLOB = bytes.fromhex(
    "b89d000000bf280000004c89e60f05b80c00000031ff0f054989442408b88300000031ff498d7424100f0531"
    "dbb82400000089df4889de48c1e605498d7434300f05ffc383fb0375e4bb0100000083fb09743283fb13742d"
    "b80d00000089df31f64889da48c1e205498d9414c000000041ba080000000f054885c0740849898424a00000"
    "00ffc383fb4175c2b89d000000bf030000000f0549898424e0080000b89d000000bf1b0000000f0549898424"
    "e8080000b89d000000bf02000000498db424f00800000f05b89d000000bf25000000498db424f40800000f05"
    "b89d000000bf2a0000000f0549898424f8080000b80f0000000f05")
OUT_OFFSET = 0x400
OUT_SIZE = 2304
NSIG = 64

# Per thread, r12 = the thread's 64-byte output slot:
#   prctl(PR_GET_TID_ADDRESS, r12+0); sigaltstack(NULL, r12+16);
#   [r12+40] = prctl(PR_GET_SECUREBITS); prctl(PR_GET_PDEATHSIG, r12+48);
#   mov $15, %eax; syscall
THREAD_BLOB = bytes.fromhex(
    "b89d000000bf280000004c89e60f05b88300000031ff498d7424100f05b89d000000bf1b0000000f0549"
    "89442428b89d000000bf02000000498d7424300f05b80f0000000f05")
THREAD_BLOB_OFFSET = 0xD00
THREAD_OUT_OFFSET = 0xE00
THREAD_OUT_SIZE = 64


class SigAction(Record):
    _fields = ("handler", "flags", "restorer", "mask")


class ParasiteInfo(Record):
    """sas: (ss_sp, ss_flags, ss_size); itimers: (interval s, us, value s, us) for real,
    virt, prof; sigactions: SigAction for signals 1..64 (SIGKILL/SIGSTOP all zero);
    threads: tid -> ThreadInfo (the leader's too)."""
    _fields = ("clear_tid_addr", "brk", "sas", "itimers", "sigactions", "dumpable", "secbits",
               "pdeath_sig", "child_subreaper", "thp_disabled", "injected_calls", "threads")


class ThreadInfo(Record):
    """What one thread's blob read: clear_child_tid, sigaltstack (ss_sp, ss_flags,
    ss_size), securebits, pdeath signal."""
    _fields = ("clear_tid_addr", "sas", "secbits", "pdeath_sig")


def _signal_ending(blob: bytes) -> bytes:
    """The blob with SIGNAL_END before its BLOB_END (ptrace: free-running blobs)."""
    return blob[:-len(BLOB_END)] + SIGNAL_END + BLOB_END


def collect(tracee: Tracee, saved_regs: bytes, threads=(), vmas=None,
            states: dict | None = None) -> ParasiteInfo:
    """Run the blob in the stopped leader `tracee` and the thread blob in every other
    stopped thread of `threads` (Tracees of the same process). vmas: its maps, states:
    tid -> (NT_PRSTATUS bytes, xstate, signal mask), as read while it is stopped (else
    read again)."""
    assert BLOB.endswith(BLOB_END) and len(BLOB) + len(SIGNAL_END) <= OUT_OFFSET
    assert THREAD_BLOB.endswith(BLOB_END) \
        and THREAD_BLOB_OFFSET + len(THREAD_BLOB) + len(SIGNAL_END) <= THREAD_OUT_OFFSET
    others = [t for t in threads if t is not tracee]
    size = -(-(THREAD_OUT_OFFSET + THREAD_OUT_SIZE * len(others)) // 4096) * 4096
    with Injection(tracee, saved_regs, vmas, states) as inj:
        # free-running blobs (two stops instead of two per syscall) when the process has
        # a signal to end them with; stepped from syscall to syscall otherwise
        sig = inj.end_signal([tracee, *others])
        blob, thread_blob = (_signal_ending(BLOB), _signal_ending(THREAD_BLOB)) if sig \
            else (BLOB, THREAD_BLOB)
        with inj.scratch_page(size) as page:
            tracee.write_mem(page + OUT_OFFSET, bytes(OUT_SIZE))
            tracee.write_mem(page, blob)
            inj.run_blob(page, OUT_OFFSET, end_signal=sig, r12=page + OUT_OFFSET)
            out = tracee.read_mem(page + OUT_OFFSET, OUT_SIZE)
            thread_out = b""
            if others:
                slots = page + THREAD_OUT_OFFSET
                tracee.write_mem(page + THREAD_BLOB_OFFSET, thread_blob)
                tracee.write_mem(slots, bytes(THREAD_OUT_SIZE * len(others)))
                for i, t in enumerate(others):
                    inj.run_blob(page + THREAD_BLOB_OFFSET, THREAD_OUT_OFFSET - THREAD_BLOB_OFFSET,
                                 thread=t, end_signal=sig, r12=slots + i * THREAD_OUT_SIZE)
                thread_out = tracee.read_mem(slots, THREAD_OUT_SIZE * len(others))
        calls = inj.calls
    tid_addr, brk = struct.unpack_from("<QQ", out, 0)
    ss_sp, ss_flags, ss_size = struct.unpack_from("<Qi4xQ", out, 16)
    itimers = []
    for w in range(3):
        itimers.append(struct.unpack_from("<qqqq", out, 48 + 32 * w))
    failed = struct.unpack_from("<q", out, 160)[0]
    if failed:
        raise DumpError(f"rt_sigaction inside task {tracee.pid} failed ({failed})")
    sigactions = [SigAction(*struct.unpack_from("<QQQQ", out, 192 + 32 * sig))
                  for sig in range(1, NSIG + 1)]
    dumpable, secbits = struct.unpack_from("<qq", out, 2272)
    pdeath_sig, subreaper = struct.unpack_from("<ii", out, 2288)
    thp_disabled = struct.unpack_from("<q", out, 2296)[0]
    # The leader's per-thread values come from the big blob, which reads them too.
    per_thread = {tracee.pid: ThreadInfo(tid_addr, (ss_sp, ss_flags, ss_size), max(secbits, 0),
                                         pdeath_sig)}
    for i, t in enumerate(others):
        off = i * THREAD_OUT_SIZE
        t_tid, = struct.unpack_from("<Q", thread_out, off)
        t_sas = struct.unpack_from("<Qi4xQ", thread_out, off + 16)
        t_secbits, t_pdeath = struct.unpack_from("<qi", thread_out, off + 40)
        per_thread[t.pid] = ThreadInfo(t_tid, t_sas, max(t_secbits, 0), t_pdeath)
    return ParasiteInfo(tid_addr, brk, (ss_sp, ss_flags, ss_size), itimers, sigactions,
                        dumpable=dumpable, secbits=max(secbits, 0), pdeath_sig=pdeath_sig,
                        child_subreaper=bool(subreaper), thp_disabled=thp_disabled > 0,
                        injected_calls=calls, threads=per_thread)


# ---------------------------------------------------------------- userfaultfd
NR_CLOSE, NR_USERFAULTFD = 3, 323
UFFD_USER_MODE_ONLY = 1
O_NONBLOCK, O_CLOEXEC = 0o4000, 0o2000000


def make_userfaultfd(tracee: Tracee, saved_regs: bytes, pidfd: int,
                     user_mode_only_ok: bool = False) -> int:
    """A userfaultfd of the stopped task's mm, as an fd of ours: userfaultfd() runs
    inside the task, the fd is taken with pidfd_getfd and closed there again, so the
    task is left without an extra fd. user_mode_only_ok: when the task may not make a
    full one (no CAP_SYS_PTRACE, vm.unprivileged_userfaultfd 0), settle for
    UFFD_USER_MODE_ONLY (enough for write tracking, whose faults never wait).
    Returns our fd, or -errno."""
    from criu_py.native import lib
    flags = O_CLOEXEC | O_NONBLOCK
    with Injection(tracee, saved_regs) as inj:
        remote = inj.syscall(NR_USERFAULTFD, flags)
        if remote == -1 and user_mode_only_ok:          # -EPERM
            remote = inj.syscall(NR_USERFAULTFD, flags | UFFD_USER_MODE_ONLY)
        if remote < 0:
            return remote
        try:
            local = lib.cp_pidfd_getfd(pidfd, remote)
        finally:
            inj.syscall(NR_CLOSE, remote)
    return local


# ---------------------------------------------------------------- vmsplice
# `dump --page-server` without copies in the dumper: the task hands its own pages to a
# pipe with vmsplice(2) (references to its pages, which stay put while it is frozen) and
# the dumper moves them from the pipe to the socket with splice(2). The task also
# computes the CRC-32C of each 4 KiB block (images/integrity.py's, csrc/digest.c) of
# each chunk before it hands the chunk over, reading its own memory where it is: the
# page server seals the files with them, so the pages are checked end to end.
# r12 = the parameter area: [0] the pipe's write end in the task, [8] the number of
# iovecs at [96] (16 bytes each), [16] out: 0 or -errno, [24] out: bytes handed over,
# [32] a sigset of SIGPIPE, [40] a zero timespec, [56] where the next CRC goes (u32
# each, moved on), [64] the chunk's iovec, [80] the chunk's length. Source: csrc/blobs/vmsplice.S:
#   for each iovec, in chunks of at most 1 MiB from its start:
#       the CRC of each block of the chunk (three blocks at a time while there are
#       three: crc32q over each, from ~0, the result inverted) -> [[56]], [56] += 4 each
#       while the chunk's iovec has bytes: r = vmsplice(fd, [64], 1, 0); -EINTR: again;
#           r <= 0: [16] = r or -EIO, stop; else [64].base += r, [64].len -= r, [24] += r
#   on -EPIPE (our reader is gone: a dead dumper) the SIGPIPE it raised, held by the
#   injection's mask, is taken back: rt_sigtimedwait([32], NULL, [40], 8), so the task
#   does not die of it once its own mask is back
VMSPLICE_BLOB = bytes.fromhex(
    "498d5c24604d8b6c24084d85ed0f842d0100004c8b53084d85d20f841401000049c7c3000010004d39da"
    "4d0f47d3488b3349897424404d895424484d89542450498b7c24384d89d049c1e80c4983f803725bb8ff"
    "ffffffbaffffffffb9ffffffff4531c9f24a0f38f1040ef24a0f38f1940e00100000f24a0f38f18c0e00"
    "2000004983c1084981f90010000075d6f7d0f7d2f7d18907895704894f084883c70c4881c60030000049"
    "83e803eb9f4d85c07430b8ffffffff4531c9f24a0f38f1040e4983c1084981f90010000075ecf7d08907"
    "4883c7044881c60010000049ffc8ebcb49897c243849837c2448007434b816010000498b3c24498d7424"
    "40ba010000004531d20f054883f8fc74da4885c07e37490144244049294424484901442418ebc4498b44"
    "245048010348294308e9dffeffff4883c31049ffcde9cafeffff31c04989442410eb2d750748c7c0fbff"
    "ffff49894424104883f8e07519b880000000498d7c242031f6498d54242841ba080000000f05") + SIGNAL_END + BLOB_END
VMSPLICE_IOV_OFFSET = 96
NR_PIPE2 = 293
SIGPIPE_BIT = 1 << (13 - 1)
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20        # the most a pipe may hold without CAP_SYS_RESOURCE


def vmsplice_pages(tracee: Tracee, saved_regs: bytes, pidfd: int, ranges: list, reader):
    """The stopped task `tracee` computes the CRCs of [start, end) of `ranges` and
    vmsplices them, in order, into a pipe while reader(our read end, the address of
    the CRCs in the task, stop) runs in a thread of ours and takes them out; reader
    must read until the pipe's writer closes it or stop[0] is set. Returns reader's
    result, or None when this cannot be done here (a CPU without CRC-32C, no signal to
    end the blob with, a SIGPIPE already pending): nothing was sent then."""
    import threading
    from criu_py import proc
    from criu_py.native import ffi, lib
    st = proc.read_status(tracee.pid)
    if not lib.cp_crc_hw() or \
            (st.shd_pnd | proc.read_status(tracee.pid, tracee.pid).sig_pnd) & SIGPIPE_BIT:
        return None
    iovs = b"".join(struct.pack("<QQ", s, e - s) for s, e in ranges)
    blob_at = -(-(VMSPLICE_IOV_OFFSET + len(iovs)) // 64) * 64
    crcs_at = -(-(blob_at + len(VMSPLICE_BLOB)) // 64) * 64
    size = -(-(crcs_at + sum(e - s for s, e in ranges) // 4096 * 4) // 4096) * 4096
    with Injection(tracee, saved_regs) as inj:
        sig = inj.end_signal([tracee])
        if not sig:
            return None
        with inj.scratch_page(size) as page:
            ret = inj.syscall(NR_PIPE2, page, O_CLOEXEC)
            if ret < 0:
                raise DumpError(f"pipe2 inside task {tracee.pid} failed: {os.strerror(-ret)}")
            rfd, wfd = struct.unpack("<ii", tracee.read_mem(page, 8))
            try:
                ours = lib.cp_pidfd_getfd(pidfd, rfd)
            finally:
                inj.syscall(NR_CLOSE, rfd)       # ours is the only reader
            if ours < 0:
                inj.syscall(NR_CLOSE, wfd)
                raise DumpError(f"pidfd_getfd of task {tracee.pid}'s pipe failed: "
                                f"{os.strerror(-ours)}")
            stop = ffi.new("int[1]")
            result = []
            thread = threading.Thread(
                target=lambda: result.append(reader(ours, page + crcs_at, stop)),
                name="vmsplice-reader", daemon=True)
            try:
                try:
                    fcntl.fcntl(ours, F_SETPIPE_SZ, PIPE_BYTES)
                except OSError:
                    pass                         # the default size is slower, not wrong
                params = struct.pack("<qqqqQ16xQ32x", wfd, len(ranges), 0, 0, SIGPIPE_BIT,
                                     page + crcs_at)
                tracee.write_mem(page, params + iovs)
                tracee.write_mem(page + blob_at, VMSPLICE_BLOB)
                thread.start()
                inj.run_blob(page + blob_at, crcs_at - blob_at, end_signal=sig, r12=page)
                out, handed = struct.unpack("<qq", tracee.read_mem(page + 16, 16))
            finally:
                try:
                    if not tracee.dead:
                        inj.syscall(NR_CLOSE, wfd)   # the reader sees the pipe's end
                finally:
                    if thread.is_alive():
                        thread.join(5)
                    stop[0] = 1
                    thread.join()
                    os.close(ours)
    if out < 0:
        raise DumpError(f"vmsplice inside task {tracee.pid} failed after {handed} bytes: "
                        f"{os.strerror(-out)}")
    if not result:                  # the reader raised: what it sent is unknown
        raise DumpError(f"the reader of task {tracee.pid}'s pages failed")
    return result[0]
