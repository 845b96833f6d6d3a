# SysV shared memory in the dumper's own IPC namespace (the tree lives in it; criu-py
# refuses trees in other namespaces). CRIU saves and rebuilds a whole IPC namespace; in
# a namespace shared with the rest of the system, what a user of it expects is this:
# - a segment the tree has attached is the tree's state: its id, key, owner, mode, size
#   and contents go into ipcns-shm-N.img (upstream's ipc_shm_entry + the contents), and
#   every attachment is a VMA (status VMA_AREA_SYSVIPC, shmid = the segment id) that the
#   restorer attaches again at its address with shmat(SHM_REMAP);
# - on restore a segment that still exists with the same id, key and size (a dump
#   without --leave-running does not remove segments: they outlive their users) is the
#   same segment and is attached as it is, its contents untouched, since other
#   processes may share it; one that is gone is created again with its id (through
#   kernel.shm_next_id), key, owner, mode and contents; one dumped as already removed
#   (IPC_RMID while attached, key 0) is removed again once every task has attached it;
# - semaphore sets and message queues are not attached to tasks: they stay in the
#   namespace when the tree ends, untouched by dump and restore.
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


class SysvDump:
    """The segments a dump saves: shmid -> (row of /proc/sysvipc/shm, contents)."""

    def __init__(self):
        self.segments = {}
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
        ctx.images.write_entries_with_payload(f"ipcns-shm-{self.ns_id}.img", out)


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
    e.status = M.VMA_AREA_REGULAR | M.VMA_AREA_SYSVIPC
    e.flags = M.MAP_SHARED
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


class Segments:
    """The segments of a restore: made where missing (before any fork), removed again
    where they had been removed (once attached), or all made ones removed on failure."""

    def __init__(self, entries: list):
        self.entries = entries
        self.made = []
        self.to_remove = []

    def prepare(self) -> None:
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
        got = libc.shmget(key, ctypes.c_size_t(e.size), IPC_CREAT | IPC_EXCL | (d.mode & 0o777))
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
        self.made = []

    def undo(self) -> None:
        """A failed restore: the segments it made are removed."""
        if not self.made:
            return
        ctypes, libc = _libc()
        for shmid in self.made:
            libc.shmctl(shmid, IPC_RMID, None)
        self.made = []
