# Creating the task with its original PID: clone3 with set_tid (a raw syscall, so glibc's
# fork handlers do not run; the interpreter's own before/after-fork hooks do). The child
# reports failures through a pipe; the parent turns what arrives into one line.
import ctypes
import errno
import os
import select
import struct

from criu_py.errors import RestoreError, from_oserror


def clone_with_pid(pid: int) -> int:
    """0 in the child, the PID in the parent; RestoreError if the PID is taken."""
    from criu_py.native import lib
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    r = lib.criu_py_clone3_set_tid(pid)
    if r == 0:
        api.PyOS_AfterFork_Child()
        return 0
    api.PyOS_AfterFork_Parent()
    if r == -errno.EEXIST:
        raise RestoreError(f"pid {pid} is in use: cannot restore the task with its PID")
    if r == -errno.EINVAL:
        raise RestoreError(f"pid {pid} cannot be created here (above pid_max or invalid)")
    if r < 0:
        raise from_oserror(OSError(-r, os.strerror(-r)), f"clone3 with pid {pid}")
    return r


def _read_until_eof_or_stop(fd: int, pid: int) -> tuple[bytes, int]:
    """The child's status bytes until the pipe closes; stops early (returning the signal)
    if the child stops instead: a traced child that faults stops rather than dies, and
    would otherwise keep the pipe open forever."""
    from criu_py import interrupts
    data = b""
    while True:
        interrupts.check(f"while pid {pid} was being restored")
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data, 0
            data += chunk
            continue
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_code in (os.CLD_TRAPPED, os.CLD_STOPPED):
            os.set_blocking(fd, False)
            try:
                while chunk := os.read(fd, 65536):   # what was written before the stop
                    data += chunk
            except BlockingIOError:
                pass
            return data, info.si_status


def read_status(fd: int, pid: int) -> tuple[tuple | None, str]:
    """Everything the child and its restorer sent: ((region start, length) once the
    restorer reached the task, else None; failure message or '')."""
    from criu_py.native import ffi, lib
    data, stopsig = _read_until_eof_or_stop(fd, pid)
    rec = ffi.sizeof("struct pie_status")
    magic = struct.pack("<I", lib.PIE_STATUS_MAGIC)
    msg = ""
    done = None
    off = 0
    while off < len(data):
        if data[off:off + 4] == magic and len(data) - off >= rec:
            _, stage, ret, arg = struct.unpack_from("<IiqQ", data, off)
            off += rec
            if stage == lib.PIE_STAGE_DONE:
                done = (arg, ret)          # the restorer region: start, length
            else:
                msg = f"restorer: {stage_name(stage)} failed at {arg:#x}: " \
                      f"{errno.errorcode.get(-ret, ret)} {os.strerror(-ret) if ret < 0 else ''}".rstrip()
        else:
            (n,) = struct.unpack_from("<I", data, off) if len(data) - off >= 4 else (0,)
            text = data[off + 4:off + 4 + n].decode(errors="replace")
            msg = text[1:] if text.startswith("T") else (text or "garbled status from the child")
            off += 4 + max(n, 1)
    if stopsig and not done and not msg:
        msg = f"the task stopped with signal {stopsig} during restore"
    return done, msg


def stage_name(stage: int) -> str:
    from criu_py.native import lib
    for name in dir(lib):
        if name.startswith("PIE_STAGE_") and getattr(lib, name) == stage:
            return name[len("PIE_STAGE_"):].lower().replace("_", " ")
    return f"stage {stage}"
