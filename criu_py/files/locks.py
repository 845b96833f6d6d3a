# File locks (--file-locks): flock(2), POSIX (fcntl F_SETLK) and OFD (F_OFD_SETLK) locks,
# read from the "lock:" lines of each fd's fdinfo (the locks taken through that open
# file), written to filelocks.img as upstream (file_lock_entry: FL_* kind, F_RDLCK or
# F_WRLCK, the owning pid and one of its fds, start, length with 0 = to the end).
# Without --file-locks a locked file is refused, as CRIU does; leases are refused.
# Restore: flock and OFD locks belong to the open file and are taken again right after
# it is opened; POSIX locks belong to the process (its fd table) and are taken by its
# restorer after it has closed its own fds, since closing any fd of a file drops them.
import fcntl
import os
import struct

from criu_py.errors import RestoreError, Unsupported

FL_POSIX, FL_FLOCK, FL_OFD = 1, 2, 4
KINDS = {"POSIX": FL_POSIX, "FLOCK": FL_FLOCK, "OFDLCK": FL_OFD}
F_RDLCK, F_WRLCK = 0, 1
F_OFD_SETLK = 37


def note_locks(pd, plan) -> None:
    """filelocks.img entries for the locks held through one fd (each lock once)."""
    ref = plan.ref
    for lk in ref.info.locks:
        if lk.blocked:
            continue                    # a request still waiting: the task asks again
        kind = KINDS.get(lk.kind)
        if kind is None:
            raise Unsupported(f"pid {ref.pid} fd {ref.fd}: {ref.link} holds a {lk.kind.lower()}, "
                              f"which is not supported")
        if not pd.opts.get("file_locks"):
            raise Unsupported(f"pid {ref.pid} fd {ref.fd}: {ref.link} is locked "
                              f"({lk.kind.lower()}): use --file-locks")
        length = 0 if lk.end is None else lk.end - lk.start + 1
        owner = pd.proc.kobj["files"] if kind == FL_POSIX else plan.file_id
        key = (kind, owner, plan.file_id, lk.start, length)
        seen = pd.dump.lock_keys
        if key in seen:
            continue
        seen.add(key)
        from criu_py.images.pb import file_lock_pb2
        e = file_lock_pb2.file_lock_entry()
        e.flag = kind
        e.type = F_WRLCK if lk.access == "WRITE" else F_RDLCK
        e.pid, e.fd = pd.pid, ref.fd
        e.start, e.len = lk.start, length
        pd.dump.file_locks.append(e)


# ---------------------------------------------------------------- restore
def by_file(tree) -> tuple[dict, dict]:
    """({files.img id: [flock/OFD entries]}, {pid: [POSIX entries]}) from filelocks.img
    (its pid and fd name the file through that task's fd table)."""
    desc, posix = {}, {}
    tables = {t.pid: {fi.fd: fi.id for fi in t.fdinfos} for t in tree.tasks if not t.zombie}
    for e in tree.file_locks:
        fid = tables.get(e.pid, {}).get(e.fd)
        if fid is None:
            from criu_py.errors import ImageError
            raise ImageError(f"filelocks.img: pid {e.pid} fd {e.fd} is not in the dump")
        if e.flag & FL_POSIX:
            posix.setdefault(e.pid, []).append(e)
        elif e.flag & (FL_FLOCK | FL_OFD):
            desc.setdefault(fid, []).append(e)
        else:
            raise Unsupported(f"filelocks.img: lock kind {e.flag} is not supported")
    return desc, posix


def take_file_locks(fd: int, entries: list, name: str) -> None:
    """flock and OFD locks of one open file, right after it is opened."""
    for e in entries:
        try:
            if e.flag & FL_FLOCK:
                fcntl.flock(fd, (fcntl.LOCK_EX if e.type == F_WRLCK else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            else:
                fl = struct.pack("<hhxxxxqqixxxx", e.type, os.SEEK_SET, e.start, e.len, 0)
                fcntl.fcntl(fd, F_OFD_SETLK, fl)
        except OSError as exc:
            raise RestoreError(f"cannot lock {name} again ({'flock' if e.flag & FL_FLOCK else 'OFD'} "
                               f"lock at {e.start}): {exc.strerror}") from None
