# What only the task itself can tell: signal actions, clear_child_tid, brk, sigaltstack,
# interval timers and a few prctl values (dumpable, securebits, pdeath signal, child
# subreaper, THP disable). Instead of one injected syscall per item (67 round trips), a small
# code blob runs once in a scratch page inside the task and leaves the answers there; a
# second, smaller blob then runs in every other thread for what is per thread
# (clear_child_tid, sigaltstack, securebits, pdeath signal).
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


def collect(tracee: Tracee, saved_regs: bytes, threads=()) -> ParasiteInfo:
    """Run the blob in the stopped leader `tracee` and the thread blob in every other
    stopped thread of `threads` (Tracees of the same process)."""
    assert BLOB.endswith(BLOB_END) and len(BLOB) + len(SIGNAL_END) <= OUT_OFFSET
    assert THREAD_BLOB.endswith(BLOB_END) \
        and THREAD_BLOB_OFFSET + len(THREAD_BLOB) + len(SIGNAL_END) <= THREAD_OUT_OFFSET
    others = [t for t in threads if t is not tracee]
    size = -(-(THREAD_OUT_OFFSET + THREAD_OUT_SIZE * len(others)) // 4096) * 4096
    with Injection(tracee, saved_regs) as inj:
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
