# The restore half of shared memory: MAP_SHARED|MAP_ANONYMOUS objects and memfds come
# back as one shmem file each, filled from pagemap-shmem-SHMID.img + its pages file, then
# mapped (by the restorer, MAP_SHARED from a parked fd) and opened (memfd fds) from it.
# A shared anonymous object is created with mmap(MAP_SHARED|MAP_ANONYMOUS) and reopened
# through /proc/self/map_files, so the restored task still sees "/dev/zero (deleted)".
import os

from criu_py import mem as M
from criu_py.errors import ImageError
from criu_py.mem.restore import check_pages_size
from criu_py.proc import Record

MFD_CLOEXEC, MFD_ALLOW_SEALING = 1, 2
F_ADD_SEALS, F_SEAL_SEAL = 1033, 1


class SharedObject(Record):
    _fields = ("shmid", "size", "memfd_name", "seals", "pages_name", "ranges", "fd")

    def __init__(self, shmid: int, size: int = 0, memfd_name: str | None = None,
                 seals: int = F_SEAL_SEAL, pages_name: str = "", ranges: list | None = None,
                 fd: int = -1):
        self.shmid = shmid
        self.size = size
        self.memfd_name = memfd_name         # None: shared anonymous memory
        self.seals = seals
        self.pages_name = pages_name
        self.ranges = [] if ranges is None else ranges   # (offset, length) in pages-file order
        self.fd = fd                         # in the child, once made


def memfd_inodes(images) -> dict:
    """memfd.img: inode_id -> memfd_inode_entry."""
    if not images.exists("memfd.img"):
        return {}
    return {e.inode_id: e for e in images.read_entries("memfd.img")}


def object_for_memfd(objects: dict, images, inodes: dict, file_entry, what: str) -> SharedObject:
    inode = inodes.get(file_entry.memfd.inode_id)
    if inode is None:
        raise ImageError(f"memfd.img: no inode {file_entry.memfd.inode_id} (needed by {what})")
    obj = objects.get(inode.shmid)
    if obj is None:
        obj = objects[inode.shmid] = SharedObject(inode.shmid)
        read_pages(images, obj)
    from criu_py.images import get_str
    obj.memfd_name = get_str(inode.name)
    obj.seals = inode.seals
    obj.size = max(obj.size, inode.size)
    return obj


def object_for_anon(objects: dict, images, shmid: int, size: int) -> SharedObject:
    obj = objects.get(shmid)
    if obj is None:
        obj = objects[shmid] = SharedObject(shmid)
        read_pages(images, obj)
    obj.size = max(obj.size, size)
    return obj


def read_pages(images, obj: SharedObject) -> None:
    from criu_py.images import PE_PARENT, PE_PRESENT, pagemap_nr_pages
    name = f"pagemap-shmem-{obj.shmid}.img"
    entries = images.read_entries(name)
    if not entries:
        raise ImageError(f"{name}: no pagemap head")
    obj.pages_name = f"pages-{entries[0].pages_id}.img"
    total = 0
    for pe in entries[1:]:
        flags = pe.flags if pe.HasField("flags") else PE_PRESENT
        if flags & PE_PARENT or pe.HasField("in_parent") and pe.in_parent:
            raise ImageError(f"{name}: shared memory pages at offset {pe.vaddr:#x} live in a "
                             f"parent image (incremental shared memory is not supported)")
        if not flags & PE_PRESENT:
            continue
        n = pagemap_nr_pages(pe) * M.PAGE_SIZE
        obj.ranges.append((pe.vaddr, n))
        obj.size = max(obj.size, pe.vaddr + n)
        total += n
    check_pages_size(images, obj.pages_name, name, total)


def make(obj: SharedObject, images) -> int:
    """Create the object in this (child) process, filled; returns an O_RDWR fd."""
    from criu_py.native import lib
    size = (obj.size + M.PAGE_SIZE - 1) & ~(M.PAGE_SIZE - 1)
    if obj.memfd_name is not None:
        sealing = MFD_ALLOW_SEALING if obj.seals & ~F_SEAL_SEAL or not obj.seals & F_SEAL_SEAL else 0
        fd = os.memfd_create(obj.memfd_name, MFD_CLOEXEC | sealing)
        os.ftruncate(fd, obj.size)
    else:
        addr = lib.criu_py_restore_syscall(9, 0, max(size, M.PAGE_SIZE), M.PROT_READ | M.PROT_WRITE,
                                           M.MAP_SHARED | M.MAP_ANONYMOUS, -1, 0)
        if addr < 0:
            raise OSError(-addr, f"cannot map shared memory of {size} bytes")
        # The mapping stays until the restorer's unmap; the fd keeps the object alive.
        fd = os.open(f"/proc/self/map_files/{addr:x}-{addr + max(size, M.PAGE_SIZE):x}",
                     os.O_RDWR | os.O_CLOEXEC)
    src = images.open_raw(obj.pages_name)
    try:
        off = 0
        for start, length in obj.ranges:
            done = 0
            os.lseek(fd, start, os.SEEK_SET)
            while done < length:      # sendfile: in-kernel copy, also across filesystems
                n = os.sendfile(fd, src, off + done, length - done)
                if n <= 0:
                    raise ImageError(f"{obj.pages_name}: short at {off + done}")
                done += n
            off += length
    finally:
        os.close(src)
    if obj.memfd_name is not None and obj.seals & ~F_SEAL_SEAL:
        import fcntl
        fcntl.fcntl(fd, F_ADD_SEALS, obj.seals)
    obj.fd = fd
    return fd
