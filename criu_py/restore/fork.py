# Creating a task with its original PID: clone3 with set_tid (a raw syscall, so glibc's
# fork handlers do not run; the interpreter's own before/after-fork hooks do), sharing
# the fd table or fs with its parent when the dump saw that. Tasks report failures and
# their restorers' progress through one status pipe; the restore command turns what
# arrives into records and one-line messages.
import ctypes
import errno
import os
import struct

from criu_py.errors import RestoreError, from_oserror


def clone_with_pid(pid: int, flags: int = 0) -> int:
    """0 in the child, the PID in the parent; RestoreError if the PID is taken."""
    from criu_py.native import lib
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    r = lib.criu_py_clone3_flags(pid, flags)
    if r == 0:
        api.PyOS_AfterFork_Child()
        return 0
    api.PyOS_AfterFork_Parent()
    return _check_clone(pid, r)


def clone_children(children: list[tuple[int, int]]) -> int:
    """Fork children (pid, clone flags) one after the other in one native call: i + 1 in
    the i-th child, 0 in the parent once all exist; RestoreError if one cannot be made
    (the ones before it exist). Between two forks the parent runs no Python: that would
    write to pages the new child now shares (~90 copy-on-write faults a child).

    Without the interpreter's fork hooks (PyOS_BeforeFork/AfterFork_*), for a caller
    that is one thread with every signal blocked, as every task of the tree is (the root
    blocks them all first thing, and no task starts a thread). The hooks make the child's
    interpreter consistent after a fork from a process with other threads: locks those
    threads held (import lock, runtime locks) are made anew, their thread states dropped,
    threading's bookkeeping reset, signals caught but not yet handled forgotten. With one
    thread and no signal that can arrive, the child's copy is consistent as it is
    (threading's main thread is the forking thread, whose ident the child keeps), and
    running them cost every task ~130 copy-on-write faults (~0.5 ms: threading's
    after-fork hook is Python code; protobuf imports threading)."""
    from criu_py.native import ffi, lib
    n = len(children)
    made = ffi.new("int32_t *")
    r = lib.criu_py_clone3_batch(struct.pack(f"<{n}i", *(pid for pid, _ in children)),
                                 struct.pack(f"<{n}Q", *(fl for _, fl in children)), n, made)
    if r >= 0:
        return r
    return _check_clone(children[made[0]][0], r)


def _check_clone(pid: int, r: int) -> int:
    if r == -errno.EEXIST:
        raise RestoreError(f"pid {pid} is in use: cannot restore the task with its PID")
    if r == -errno.EINVAL:
        raise RestoreError(f"pid {pid} cannot be created here (above pid_max or invalid)")
    if r < 0:
        raise from_oserror(OSError(-r, os.strerror(-r)), f"clone3 with pid {pid}")
    return r


class StatusRecord:
    """One restorer record: stage, return value, detail, reporting pid."""
    __slots__ = ("stage", "ret", "arg", "pid")

    def __init__(self, stage, ret, arg, pid):
        self.stage, self.ret, self.arg, self.pid = stage, ret, arg, pid


def parse_status(data: bytes) -> tuple[list, list[str], bytes]:
    """Split what arrived on the status pipe into restorer records and the tasks'
    one-line messages; returns (records, messages, an incomplete tail to keep)."""
    from criu_py.native import ffi, lib
    rec = ffi.sizeof("struct pie_status")
    magic = struct.pack("<I", lib.PIE_STATUS_MAGIC)
    records, messages = [], []
    off = 0
    while off < len(data):
        if data[off:off + 4] == magic:
            if len(data) - off < rec:
                break
            _, stage, ret, arg, pid = struct.unpack_from("<IiqQi", data, off)
            records.append(StatusRecord(stage, ret, arg, pid))
            off += rec
            continue
        if len(data) - off < 4:
            break
        (n,) = struct.unpack_from("<I", data, off)
        if len(data) - off - 4 < n:
            break
        text = data[off + 4:off + 4 + n].decode(errors="surrogateescape")
        messages.append(text[1:] if text.startswith("T") else (text or "garbled status from a task"))
        off += 4 + max(n, 1)
    return records, messages, data[off:]


def describe_record(r: StatusRecord) -> str:
    return (f"restorer of pid {r.pid}: {stage_name(r.stage)} failed at {r.arg:#x}: "
            f"{errno.errorcode.get(-r.ret, r.ret)} {os.strerror(-r.ret) if r.ret < 0 else ''}").rstrip()


def stage_name(stage: int) -> str:
    from criu_py.native import lib
    for name in dir(lib):
        if name.startswith("PIE_STAGE_") and getattr(lib, name) == stage:
            return name[len("PIE_STAGE_"):].lower().replace("_", " ")
    return f"stage {stage}"
