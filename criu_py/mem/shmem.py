# Shared memory objects of the task, dumped once each however many VMAs map them:
# MAP_SHARED|MAP_ANONYMOUS mappings ("/dev/zero (deleted)", shmid = the shmem inode) and
# memfd files (mapped or only open; memfd.img inode entry + a MEMFD files.img entry, as
# upstream's memfd.c). Contents go to pagemap-shmem-SHMID.img + their own pages-N.img,
# with vaddr = offset in the object; only allocated ranges (SEEK_DATA/SEEK_HOLE) are
# written. They are read through /proc/PID/map_files or the task's fd (pidfd_getfd).
import os

from criu_py import mem as M
from criu_py.errors import Unsupported, from_oserror
from criu_py.log import log
from criu_py.proc import Record

SEEK_DATA, SEEK_HOLE = 3, 4
F_GET_SEALS = 1034
SENDFILE_CHUNK = 1 << 30


class SharedObject(Record):
    """One shmem inode: shmid = its inode number, size = bytes to dump (max pgoff + len of
    its VMAs, or the memfd size), open_path = how the tracer opens it; memfd_name and
    memfd_inode_id for memfds only."""
    _fields = ("shmid", "size", "open_path", "memfd_name", "memfd_inode_id", "st", "pages_id",
               "vma_users")
    size = memfd_inode_id = pages_id = 0
    open_path = ""
    memfd_name = None
    st = None

    def __init__(self, *args, **kwargs):
        self.vma_users = []
        super().__init__(*args, **kwargs)


def _strip_memfd(path: str) -> str:
    name = path[len("/memfd:"):]
    return name[:-len(" (deleted)")] if name.endswith(" (deleted)") else name


def _object(ctx, st: os.stat_result, open_path: str) -> SharedObject:
    key = ("shmem", st.st_dev, st.st_ino)
    obj = ctx.shmem.get(key)
    if obj is None:
        obj = SharedObject(shmid=st.st_ino, open_path=open_path, st=st)
        ctx.shmem[key] = obj
    return obj


def memfd_object(ctx, st: os.stat_result, path: str, open_path: str) -> SharedObject:
    obj = _object(ctx, st, open_path)
    if obj.memfd_name is None:
        obj.memfd_name = _strip_memfd(path)
        obj.memfd_inode_id = 1 + sum(1 for o in ctx.shmem.values() if o.memfd_name is not None
                                     and o is not obj)
    obj.size = max(obj.size, st.st_size)
    return obj


def plan_vma(ctx, plan) -> None:
    """vma_entry fields of a shared-anon or memfd VMA; registers its object for dumping."""
    from criu_py.files.memfd import memfd_file_id
    v, e = plan.vma, plan.entry
    open_path = f"/proc/{ctx.pid}/map_files/{v.map_files_name}"
    try:
        st = os.stat(open_path)
    except OSError as exc:
        raise from_oserror(exc, f"stat of {open_path}", ctx.pid) from None
    e.pgoff = v.offset
    if v.path.startswith("/dev/zero"):
        obj = _object(ctx, st, open_path)
        obj.size = max(obj.size, v.offset + v.size)
        e.status = M.VMA_AREA_REGULAR | M.VMA_ANON_SHARED
        e.flags = M.MAP_SHARED | M.MAP_ANONYMOUS
        e.shmid = obj.shmid
    else:
        obj = memfd_object(ctx, st, v.path, open_path)
        flags = os.O_RDWR if (v.shared and v.perms[1] == "w") else os.O_RDONLY
        e.shmid = memfd_file_id(ctx, obj, flags, 0)
        e.fdflags = flags
        if v.shared:
            e.status = M.VMA_AREA_REGULAR | M.VMA_AREA_MEMFD | M.VMA_FILE_SHARED
            e.flags = M.MAP_SHARED
        else:
            e.status = M.VMA_AREA_REGULAR | M.VMA_AREA_MEMFD | M.VMA_FILE_PRIVATE
            e.flags = M.MAP_PRIVATE
            plan.dump_private_pages = True
    if "gd" in v.vm_flags or "lo" in v.vm_flags:
        raise Unsupported(f"pid {ctx.pid}: locked or grows-down shared mapping at {v.start:#x}")
    obj.vma_users.append(v)
    plan.shmem_key = ("shmem", st.st_dev, st.st_ino)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Allocated [start, end) byte ranges of a shmem file up to size (page aligned)."""
    out, off = [], 0
    while off < size:
        try:
            data = os.lseek(fd, off, SEEK_DATA)
        except OSError:         # ENXIO: no data after off
            break
        if data >= size:
            break
        hole = os.lseek(fd, data, SEEK_HOLE)
        start = data & ~(M.PAGE_SIZE - 1)
        end = min((hole + M.PAGE_SIZE - 1) & ~(M.PAGE_SIZE - 1), (size + M.PAGE_SIZE - 1) & ~(M.PAGE_SIZE - 1))
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
        off = hole
    return out


def _copy(src: int, dst: int, start: int, length: int) -> None:
    done = 0
    while done < length:
        n = os.sendfile(dst, src, start + done, min(SENDFILE_CHUNK, length - done))
        if n <= 0:
            # past EOF of a file shorter than the mapping: the rest reads as zeros
            os.write(dst, bytes(length - done))
            return
        done += n


def write_images(ctx) -> None:
    """pagemap-shmem-SHMID.img + pages-N.img per object (with --page-server, sent to the
    page server, which writes both there, as upstream's dump does); memfd.img for
    memfds."""
    from criu_py.images import PE_PRESENT
    from criu_py.mem.dump import pagemap_entries
    scanned = written = 0
    memfd_inodes = []
    sink = ctx.page_sink
    for obj in sorted(ctx.shmem.values(), key=lambda o: o.shmid):
        obj.pages_id = ctx.alloc_pages_id()
        try:
            src = os.open(obj.open_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, f"opening {obj.open_path}", ctx.pid) from None
        try:
            ranges = data_ranges(src, obj.size)
            if sink is not None:
                from criu_py.pageserver.client import send_shmem_pages
                send_shmem_pages(sink, obj.shmid, src, ranges)
                where = f"the page server {sink.where}"
            else:
                out = ctx.images.open_raw(f"pages-{obj.pages_id}.img", write=True)
                try:
                    for start, end in ranges:
                        _copy(src, out, start, end - start)
                finally:
                    os.close(out)
                where = f"pages-{obj.pages_id}.img"
            if obj.memfd_name is not None:
                memfd_inodes.append(_memfd_inode_entry(obj, src))
        finally:
            os.close(src)
        if sink is None:
            ctx.images.write_entries(f"pagemap-shmem-{obj.shmid}.img",
                                     pagemap_entries(ranges, obj.pages_id, PE_PRESENT))
        scanned += (obj.size + M.PAGE_SIZE - 1) // M.PAGE_SIZE
        written += sum(e - s for s, e in ranges) // M.PAGE_SIZE
        log.info("shmem %d (%s): %d bytes, %d ranges -> %s", obj.shmid,
                 obj.memfd_name if obj.memfd_name is not None else "anon", obj.size,
                 len(ranges), where)
    if memfd_inodes:
        ctx.images.write_entries("memfd.img", memfd_inodes)
    ctx.shmem_stats = {"scanned": scanned, "written": written}


def _memfd_inode_entry(obj: SharedObject, fd: int):
    import fcntl
    from criu_py.images.pb import memfd_pb2
    e = memfd_pb2.memfd_inode_entry()
    from criu_py.images import set_str
    set_str(e, "name", obj.memfd_name)
    e.uid, e.gid = obj.st.st_uid, obj.st.st_gid
    e.size = obj.size
    e.shmid = obj.shmid
    try:
        e.seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        e.seals = 1   # F_SEAL_SEAL: sealing not allowed
    e.inode_id = obj.memfd_inode_id
    return e

