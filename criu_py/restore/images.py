# Reading and checking every image a restore needs, before anything is created: the
# restore either has a complete, consistent picture of the task or stops with one line
# naming the file and the problem.
import os
from dataclasses import dataclass, field

from criu_py.errors import ImageError, Unsupported

FD_TYPE_REG, FD_TYPE_PIPE, FD_TYPE_MEMFD = 1, 2, 18


@dataclass
class TaskImages:
    """Everything read from the images dir for one task."""
    images: object                 # criu_py.images.ImageDir
    pid: int
    pstree: object
    core: object
    ids: object
    mm: object
    fs: object
    files: dict                    # file id -> file_entry
    fdinfos: list
    pipe_data: dict = field(default_factory=dict)   # pipe_id -> (bytes, pipe size)
    memory: object = None          # mem.restore.MemoryPlan
    # decided by the restore itself:
    syscall_addr: int = 0          # vdso `syscall` the parent uses to unmap the region (0: keep it)
    restored: bool = False         # the task runs: keep the pidfile
    cg_yard: object = None         # criu_py.cgroup.restore.Yard (issue 10)

    def reg(self, file_id: int, what: str):
        fe = self.files.get(file_id)
        if fe is None or not fe.HasField("reg"):
            raise ImageError(f"files.img: no regular file with id {file_id} (needed for {what})")
        return fe.reg


def load(images_dir: str) -> TaskImages:
    from criu_py.images import ImageDir
    images = ImageDir(images_dir)
    try:
        return _load(images)
    except BaseException:
        images.close()
        raise


def _load(images) -> TaskImages:
    from criu_py.mem.restore import plan_memory
    images.read_one("inventory.img")
    tree = images.read_entries("pstree.img")
    if len(tree) != 1:
        raise Unsupported(f"pstree.img: {len(tree)} tasks; only single-process restores are supported")
    pstree = tree[0]
    pid = pstree.pid
    if len(pstree.threads) > 1:
        raise Unsupported(f"pstree.img: pid {pid} has {len(pstree.threads)} threads; not supported")
    core = images.read_one(f"core-{pid}.img")
    if core.mtype != 1 or not core.HasField("thread_info") or not core.HasField("tc"):
        raise ImageError(f"core-{pid}.img: not an x86_64 task core")
    if core.thread_info.gpregs.HasField("mode") and core.thread_info.gpregs.mode != 1:
        raise Unsupported(f"core-{pid}.img: 32-bit tasks are not supported")
    ids = images.read_one(f"ids-{pid}.img")
    mm = images.read_one(f"mm-{pid}.img")
    fs = images.read_one(f"fs-{pid}.img")
    files = {fe.id: fe for fe in images.read_entries("files.img")}
    fdinfo_name = f"fdinfo-{ids.files_id}.img"
    fdinfos = images.read_entries(fdinfo_name) if images.exists(fdinfo_name) else []
    t = TaskImages(images=images, pid=pid, pstree=pstree, core=core, ids=ids, mm=mm, fs=fs,
                   files=files, fdinfos=fdinfos)
    seen = set()
    for fi in fdinfos:
        if fi.fd in seen:
            raise ImageError(f"{fdinfo_name}: fd {fi.fd} appears twice")
        seen.add(fi.fd)
        fe = files.get(fi.id)
        if fe is None:
            raise ImageError(f"{fdinfo_name}: fd {fi.fd} names file id {fi.id}, missing from files.img")
        if fe.type not in (FD_TYPE_REG, FD_TYPE_PIPE, FD_TYPE_MEMFD):
            from criu_py.images.pb import fdinfo_pb2
            kind = fdinfo_pb2.fd_types.Name(fe.type) if fe.type in fdinfo_pb2.fd_types.values() else fe.type
            raise Unsupported(f"{fdinfo_name}: fd {fi.fd} is of kind {kind}, which restore "
                              f"does not support")
        if fe.type == FD_TYPE_REG:
            _check_path(fe.reg.name, f"fd {fi.fd}")
    if images.exists("pipes-data.img"):
        for e, data in images.read_entries_with_payload("pipes-data.img"):
            t.pipe_data[e.pipe_id] = (data, e.size if e.HasField("size") else 0)
    _check_path(t.reg(fs.cwd_id, "cwd").name, "cwd")
    _check_path(t.reg(fs.root_id, "root").name, "root")
    _check_path(t.reg(mm.exe_file_id, "the exe link").name, "the executable")
    t.memory = plan_memory(images, pid, mm, files)
    for mf in t.memory.files.values():
        if mf.path is not None:
            _check_path(mf.path, "a mapping")
    from criu_py.mem import shmem_restore
    for fi in fdinfos:        # memfds only open, not mapped, are shared objects too
        fe = files[fi.id]
        if fe.type == FD_TYPE_MEMFD:
            shmem_restore.object_for_memfd(t.memory.shared, images, t.memory.memfd_inodes,
                                           fe, f"fd {fi.fd}")
    return t


def _check_path(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise ImageError(f"{what}: {path} does not exist on this system")
