# SysV shared memory in the dumper's own IPC namespace (the tree lives in it; criu-py
# refuses trees in other namespaces). CRIU saves and rebuilds a whole IPC namespace; in
# a namespace shared with the rest of the system, what a user of it expects is this:
# - a segment the tree has attached is the tree's state: its id, key, owner, mode, size
#   and contents go into ipcns-shm-N.img (upstream's ipc_shm_entry + the contents), and
#   every attachment is a VMA (status VMA_ANON_SHARED | VMA_AREA_SYSVIPC, shmid = the
#   segment id, as upstream encodes it) that the restorer attaches again at its
#   address with shmat(SHM_REMAP);
# - on restore a segment that still exists with the same id, key and size (a dump
#   without --leave-running does not remove segments: they outlive their users) is the
#   same segment and is attached as it is, its contents untouched, since other
#   processes may share it; one that is gone is created again with its id (through
#   kernel.shm_next_id), key, owner, mode and contents; one dumped as already removed
#   (IPC_RMID while attached, key 0) is removed again once every task has attached it;
# - semaphore sets and message queues are not attached to tasks and stay in the namespace
#   when the tree ends. The ones the tree uses, as far as the kernel records it (a set
#   in which a task of the tree made the last operation on, or set the value of, some
#   semaphore; a queue a task of the tree last sent to or received from), are saved with
#   their values and queued messages (ipcns-sem-N.img, ipcns-msg-N.img, upstream's
#   messages). Restore treats them like the segments: one still there (same id and key)
#   is used as it is, with whatever values and messages it has now; one that is gone is
#   made again with its id, key, owner, mode, values, queue size and messages.
#   (Semaphore undo records and the times of last operations cannot be restored.)
# A segment attached only in part (a munmap()ed piece) or a hugetlb one is refused.
import os
import struct

from criu_py.errors import RestoreError, Unsupported
from criu_py.log import log

IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_SET, IPC_STAT = 0o1000, 0o2000, 0, 1, 2
SHM_DEST, SHM_HUGETLB = 0o1000, 0o4000
SHM_RDONLY = 0o10000
SHMID_DS = struct.Struct("<iIIIIHxxHxxxxxxQQQqqqiiQQQ")      # struct shmid_ds, x86_64
SHM_NEXT_ID = "/proc/sys/kernel/shm_next_id"


IPC_NOWAIT, MSG_COPY = 0o4000, 0o40000
GETPID, GETALL, SETALL = 11, 13, 17
SEM_NEXT_ID, MSG_NEXT_ID = "/proc/sys/kernel/sem_next_id", "/proc/sys/kernel/msg_next_id"
MSQID_DS = struct.Struct("<iIIIIHxxHxxxxxxQQqqqQQQiiQQ")     # struct msqid_ds, x86_64
MSGMAX = 1 << 16


class SysvDump:
    """What a dump saves: segments (shmid -> (row of /proc/sysvipc/shm, contents)),
    semaphore sets (semid -> (row, values)), queues (msqid -> (row, qbytes, [(type,
    text)]))."""

    def __init__(self):
        self.segments = {}
        self.sems = {}
        self.queues = {}
        self.ns_id = 0

    def write_images(self, ctx) -> None:
        from criu_py.images.pb import ipc_shm_pb2
        out = []
        for shmid, (row, data) in sorted(self.segments.items()):
            e = ipc_shm_pb2.ipc_shm_entry()
            d = e.desc
            d.key, d.id = row["key"] & 0xFFFFFFFF, shmid
            d.uid, d.gid, d.cuid, d.cgid = row["uid"], row["gid"], row["cuid"], row["cgid"]
            d.mode = row["perms"]
            e.size = row["size"]
            e.in_pagemaps = False
            out.append((e, data + bytes(-len(data) % 4)))
        if out:
            ctx.images.write_entries_with_payload(f"ipcns-shm-{self.ns_id}.img", out)
        self._write_sems(ctx)
        self._write_queues(ctx)

    def _write_sems(self, ctx) -> None:
        from criu_py.images.pb import ipc_sem_pb2
        out = []
        for semid, (row, values) in sorted(self.sems.items()):
            e = ipc_sem_pb2.ipc_sem_entry()
            _desc(e.desc, row, semid)
            e.nsems = len(values)
            raw = struct.pack(f"<{len(values)}H", *values)
            out.append((e, raw + bytes(-len(raw) % 8)))
        if out:
            ctx.images.write_entries_with_payload(f"ipcns-sem-{self.ns_id}.img", out)

    def _write_queues(self, ctx) -> None:
        """ipcns-msg: a queue entry, then per message a framed ipc_msg and its text
        padded to 8 (upstream's layout), so the file is written here byte by byte."""
        from criu_py.images import encode_file
        from criu_py.images.pb import ipc_msg_pb2
        if not self.queues:
            return
        parts = []
        for msqid, (row, qbytes, msgs) in sorted(self.queues.items()):
            e = ipc_msg_pb2.ipc_msg_entry()
            _desc(e.desc, row, msqid)
            e.qbytes, e.qnum = qbytes, len(msgs)
            raw = e.SerializeToString()
            parts.append(struct.pack("<I", len(raw)) + raw)
            for mtype, text in msgs:
                m = ipc_msg_pb2.ipc_msg()
                m.mtype, m.msize = mtype, len(text)
                raw = m.SerializeToString()
                parts.append(struct.pack("<I", len(raw)) + raw + text + bytes(-len(text) % 8))
        head = encode_file("ipcns_msg", [])
        ctx.images.write_bytes(f"ipcns-msg-{self.ns_id}.img", head + b"".join(parts))


def _desc(d, row: dict, ident: int) -> None:
    d.key, d.id = row["key"] & 0xFFFFFFFF, ident
    d.uid, d.gid, d.cuid, d.cgid = row["uid"], row["gid"], row["cuid"], row["cgid"]
    d.mode = row["perms"]


def plan_objects(ctx) -> None:
    """The semaphore sets and message queues the tree uses (see above), read while the
    tree is frozen."""
    from criu_py import proc
    pids = set(ctx.tree.procs)
    sems = [r for r in proc.read_sysvipc("sem")]
    queues = [r for r in proc.read_sysvipc("msg") if r["lspid"] in pids or r["lrpid"] in pids]
    if not sems and not queues:
        return
    ctypes, libc = _libc()
    found_sems = {}
    for row in sems:
        n = row["nsems"]
        owners = {libc.semctl(row["semid"], i, GETPID) for i in range(n)}
        if not owners & pids:
            continue
        vals = (ctypes.c_ushort * n)()
        if libc.semctl(row["semid"], 0, GETALL, vals) < 0:
            raise Unsupported(f"cannot read SysV semaphore set {row['semid']}: "
                              f"{os.strerror(ctypes.get_errno())}")
        found_sems[row["semid"]] = (row, list(vals))
    found_queues = {}
    for row in queues:
        qid = row["msqid"]
        st = ctypes.create_string_buffer(MSQID_DS.size)
        if libc.msgctl(qid, IPC_STAT, st) < 0:
            raise Unsupported(f"cannot read SysV message queue {qid}: "
                              f"{os.strerror(ctypes.get_errno())}")
        qbytes = MSQID_DS.unpack(st.raw)[14]
        buf = ctypes.create_string_buffer(8 + MSGMAX)
        msgs = []
        for i in range(row["qnum"]):
            got = libc.msgrcv(qid, buf, ctypes.c_size_t(MSGMAX), ctypes.c_long(i),
                              IPC_NOWAIT | MSG_COPY)
            if got < 0:
                raise Unsupported(f"cannot read message {i} of SysV queue {qid}: "
                                  f"{os.strerror(ctypes.get_errno())}")
            mtype, = struct.unpack_from("<q", buf.raw)
            msgs.append((mtype, buf.raw[8:8 + got]))
        found_queues[qid] = (row, qbytes, msgs)
    if not found_sems and not found_queues:
        return
    if ctx.sysv is None:
        ctx.sysv = SysvDump()
        ctx.sysv.ns_id = ctx.procs[0].ns_ids.get("ipc", 3)
    ctx.sysv.sems, ctx.sysv.queues = found_sems, found_queues
    log.info("SysV: %d semaphore sets, %d message queues used by the tree",
             len(found_sems), len(found_queues))


def plan_vma(ctx, plan) -> None:
    """vma_entry of an attachment of a SysV segment; the segment is saved once."""
    from criu_py import mem as M
    from criu_py import proc
    v, e = plan.vma, plan.entry
    dump = ctx.dump
    if dump.sysv is None:
        dump.sysv = SysvDump()
        dump.sysv.ns_id = ctx.ns_ids.get("ipc", 3) if getattr(ctx, "ns_ids", None) else 3
        dump.sysv.rows = {r["shmid"]: r for r in proc.read_sysvipc("shm")}
    shmid = v.inode
    row = dump.sysv.rows.get(shmid)
    if row is None:
        raise Unsupported(f"pid {ctx.pid}: SysV segment {shmid} at {v.start:#x} is not in "
                          f"this IPC namespace")
    size = -(-row["size"] // M.PAGE_SIZE) * M.PAGE_SIZE
    if v.offset or v.end - v.start != size:
        raise Unsupported(f"pid {ctx.pid}: SysV segment {shmid} is attached only in part at "
                          f"{v.start:#x}: not supported")
    if row["perms"] & SHM_HUGETLB:
        raise Unsupported(f"pid {ctx.pid}: hugetlb SysV segment {shmid}: not supported")
    # as upstream writes it: shared anonymous memory that is a SysV attachment
    e.status = M.VMA_AREA_REGULAR | M.VMA_ANON_SHARED | M.VMA_AREA_SYSVIPC
    e.flags = M.MAP_SHARED | M.MAP_ANONYMOUS
    e.shmid = shmid
    e.pgoff = 0
    if shmid not in dump.sysv.segments:
        data = ctx.tracee.read_mem(v.start, row["size"]) if "r" in v.perms else \
            _read_by_attach(shmid, row["size"])
        dump.sysv.segments[shmid] = (row, data)
        log.info("SysV segment %d (key %#x): %d bytes attached at %#x", shmid,
                 row["key"] & 0xFFFFFFFF, row["size"], v.start)


def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmdt.argtypes = [ctypes.c_void_p]
    libc.msgrcv.restype = ctypes.c_ssize_t
    return ctypes, libc


def _read_by_attach(shmid: int, size: int) -> bytes:
    ctypes, libc = _libc()
    addr = libc.shmat(shmid, None, SHM_RDONLY)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise Unsupported(f"cannot read SysV segment {shmid}: {os.strerror(ctypes.get_errno())}")
    try:
        return ctypes.string_at(addr, size)
    finally:
        libc.shmdt(addr)


# ---------------------------------------------------------------- restore
def load(images, ns_id: int) -> list:
    """(ipc_shm_entry, contents) of the dumped segments."""
    name = f"ipcns-shm-{ns_id}.img"
    if not images.exists(name):
        return []
    return images.read_entries_with_payload(name, payload_size=lambda m: (m.size + 3) & ~3)


def _stat(libc, ctypes, shmid: int):
    buf = ctypes.create_string_buffer(SHMID_DS.size)
    if libc.shmctl(shmid, IPC_STAT, buf) < 0:
        return None
    return SHMID_DS.unpack(buf.raw)


def load_sems(images, ns_id: int) -> list:
    """(ipc_sem_entry, [values])."""
    name = f"ipcns-sem-{ns_id}.img"
    if not images.exists(name):
        return []
    return [(e, list(struct.unpack_from(f"<{e.nsems}H", data)))
            for e, data in images.read_entries_with_payload(
                name, payload_size=lambda m: (m.nsems * 2 + 7) & ~7)]


def load_queues(images, ns_id: int) -> list:
    """(ipc_msg_entry, [(type, text)])."""
    from criu_py.errors import ImageError
    from criu_py.images import PAYLOAD_SCAN, _parse_header, iter_frames
    from criu_py.images.pb import ipc_msg_pb2
    name = f"ipcns-msg-{ns_id}.img"
    if not images.exists(name):
        return []
    data = images.read_bytes(name)
    kind, off = _parse_header(data, name, "ipcns_msg")
    out = []
    for _, e, payload in iter_frames(data, name, off, kind, scan=PAYLOAD_SCAN["ipcns_msg"]):
        msgs, pos, payload = [], 0, bytes(payload)
        for _ in range(e.qnum):
            n, = struct.unpack_from("<I", payload, pos)
            m = ipc_msg_pb2.ipc_msg()
            m.ParseFromString(payload[pos + 4:pos + 4 + n])
            pos += 4 + n
            if pos + m.msize > len(payload):
                raise ImageError(f"{name}: message of queue {e.desc.id} is cut short")
            msgs.append((m.mtype, payload[pos:pos + m.msize]))
            pos += (m.msize + 7) & ~7
        out.append((e, msgs))
    return out


def _with_next_id(path: str, ident: int, make, libc):
    """make() with the namespace's next id of this kind set to `ident`; if make() used
    no id, a throwaway object uses it up (else someone else's would get it)."""
    with open(path, "w") as f:
        f.write(str(ident))
    got = make()
    with open(path) as f:
        pending = int(f.read())
    if pending != -1:
        spare = {SEM_NEXT_ID: lambda: libc.semget(0, 1, IPC_CREAT | 0o600),
                 MSG_NEXT_ID: lambda: libc.msgget(0, IPC_CREAT | 0o600)}[path]()
        if spare >= 0:
            (libc.semctl(spare, 0, IPC_RMID) if path == SEM_NEXT_ID else
             libc.msgctl(spare, IPC_RMID, None))
    return got


class Segments:
    """The SysV objects of a restore: made where missing (before any fork), segments
    removed again where they had been removed (once attached), and everything made
    removed again on failure."""

    def __init__(self, entries: list, sems: list = (), queues: list = ()):
        self.entries = entries
        self.sems = list(sems)
        self.queues = list(queues)
        self.made = []
        self.made_other = []             # (kind, id) of semaphore sets and queues made
        self.to_remove = []

    def prepare(self) -> None:
        if self.sems or self.queues:
            self._prepare_objects()
        if not self.entries:
            return
        ctypes, libc = _libc()
        for e, data in self.entries:
            d = e.desc
            st = _stat(libc, ctypes, d.id)
            if st is not None:
                key, size = st[0], st[9]
                if key & 0xFFFFFFFF == d.key and size == e.size:
                    log.info("SysV segment %d still exists: attached as it is", d.id)
                    if d.mode & SHM_DEST:
                        self.to_remove.append(d.id)
                    continue
                raise RestoreError(f"SysV segment {d.id} is taken by another segment "
                                   f"(key {key & 0xFFFFFFFF:#x}, {size} bytes)")
            self._make(ctypes, libc, e, data)

    def _make(self, ctypes, libc, e, data: bytes) -> None:
        d = e.desc
        key = 0 if d.mode & SHM_DEST else d.key       # a removed segment had lost its key
        # the next segment made in the namespace gets this id (the kernel then forgets it)
        with open(SHM_NEXT_ID, "w") as f:
            f.write(str(d.id))
        got = libc.shmget(_signed(key), ctypes.c_size_t(e.size), IPC_CREAT | IPC_EXCL | (d.mode & 0o777))
        err = ctypes.get_errno()
        if got < 0:
            # not used up: use it up, or someone else's segment would get it
            spare = libc.shmget(0, ctypes.c_size_t(4096), IPC_CREAT | 0o600)
            if spare >= 0:
                libc.shmctl(spare, IPC_RMID, None)
            raise RestoreError(f"cannot create SysV segment {d.id} (key {d.key:#x}): "
                               f"{os.strerror(err)}")
        self.made.append(got)
        if got != d.id:
            raise RestoreError(f"SysV segment {d.id}: the kernel gave id {got}")
        addr = libc.shmat(got, None, 0)
        ctypes.memmove(addr, data, e.size)
        libc.shmdt(ctypes.c_void_p(addr))
        st = bytearray(SHMID_DS.size)
        struct.pack_into("<iIIIIH", st, 0, 0, d.uid, d.gid, 0, 0, d.mode & 0o777)
        libc.shmctl(got, IPC_SET, ctypes.create_string_buffer(bytes(st), len(st)))
        if d.mode & SHM_DEST:
            self.to_remove.append(got)
        log.info("SysV segment %d (key %#x) made again, %d bytes", got, d.key, e.size)

    def attached(self) -> None:
        """Every task has attached its segments: those dumped as removed go again."""
        if not self.to_remove:
            return
        ctypes, libc = _libc()
        for shmid in self.to_remove:
            libc.shmctl(shmid, IPC_RMID, None)
        self.to_remove = []

    def _prepare_objects(self) -> None:
        ctypes, libc = _libc()
        rows = {("sem", r["semid"]): r for r in _rows("sem")}
        rows.update({("msg", r["msqid"]): r for r in _rows("msg")})
        for kind, items in (("sem", self.sems), ("msg", self.queues)):
            for e, content in items:
                d = e.desc
                row = rows.get((kind, d.id))
                what = "semaphore set" if kind == "sem" else "message queue"
                if row is not None:
                    if row["key"] & 0xFFFFFFFF != d.key:
                        raise RestoreError(f"SysV {what} {d.id} is taken by another one "
                                           f"(key {row['key'] & 0xFFFFFFFF:#x})")
                    log.info("SysV %s %d still exists: used as it is", what, d.id)
                    continue
                if kind == "sem":
                    self._make_sem(ctypes, libc, e, content)
                else:
                    self._make_queue(ctypes, libc, e, content)

    def _made(self, kind: str, got: int, d, err: int) -> None:
        what = "semaphore set" if kind == "sem" else "message queue"
        if got < 0:
            raise RestoreError(f"cannot create SysV {what} {d.id} (key {d.key:#x}): "
                               f"{os.strerror(err)}")
        self.made_other.append((kind, got))
        if got != d.id:
            raise RestoreError(f"SysV {what} {d.id}: the kernel gave id {got}")

    def _make_sem(self, ctypes, libc, e, values: list) -> None:
        d = e.desc
        flags = IPC_CREAT | IPC_EXCL | (d.mode & 0o777)
        got = _with_next_id(SEM_NEXT_ID, d.id, lambda: libc.semget(_signed(d.key), e.nsems, flags), libc)
        self._made("sem", got, d, ctypes.get_errno())
        vals = (ctypes.c_ushort * len(values))(*values)
        libc.semctl(got, 0, SETALL, vals)
        perm = bytearray(128)
        struct.pack_into("<iIIIIH", perm, 0, 0, d.uid, d.gid, 0, 0, d.mode & 0o777)
        libc.semctl(got, 0, IPC_SET, ctypes.create_string_buffer(bytes(perm), len(perm)))
        log.info("SysV semaphore set %d (key %#x) made again: %s", got, d.key, values)

    def _make_queue(self, ctypes, libc, e, msgs: list) -> None:
        d = e.desc
        flags = IPC_CREAT | IPC_EXCL | (d.mode & 0o777)
        got = _with_next_id(MSG_NEXT_ID, d.id, lambda: libc.msgget(_signed(d.key), flags), libc)
        self._made("msg", got, d, ctypes.get_errno())
        st = ctypes.create_string_buffer(MSQID_DS.size)
        libc.msgctl(got, IPC_STAT, st)
        raw = bytearray(st.raw)
        struct.pack_into("<II", raw, 4, d.uid, d.gid)
        struct.pack_into("<H", raw, 20, d.mode & 0o777)
        struct.pack_into("<Q", raw, 88, max(e.qbytes, 1))          # msg_qbytes
        libc.msgctl(got, IPC_SET, ctypes.create_string_buffer(bytes(raw), len(raw)))
        for mtype, text in msgs:
            buf = ctypes.create_string_buffer(struct.pack("<q", mtype) + text, 8 + len(text))
            if libc.msgsnd(got, buf, ctypes.c_size_t(len(text)), IPC_NOWAIT) < 0:
                raise RestoreError(f"cannot queue a message in SysV queue {got} again: "
                                   f"{os.strerror(ctypes.get_errno())}")
        log.info("SysV message queue %d (key %#x) made again with %d messages", got, d.key,
                 len(msgs))

    def undo(self) -> None:
        """A failed restore: the objects it made are removed."""
        if not self.made and not self.made_other:
            return
        ctypes, libc = _libc()
        for shmid in self.made:
            libc.shmctl(shmid, IPC_RMID, None)
        for kind, ident in self.made_other:
            libc.semctl(ident, 0, IPC_RMID) if kind == "sem" else libc.msgctl(ident, IPC_RMID, None)
        self.made, self.made_other = [], []


def _signed(key: int) -> int:
    """A key_t (a C int) from the image's uint32."""
    return key - (1 << 32) if key >= 1 << 31 else key


def _rows(kind: str) -> list:
    from criu_py import proc
    return proc.read_sysvipc(kind)
