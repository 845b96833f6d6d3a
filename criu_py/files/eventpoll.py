# epoll instances: every watched file with its event mask and data (fdinfo "tfd:" lines),
# as one files.img EVENTPOLL entry whose tfd entries keep the fd number the file was
# added with (the kernel's key for EPOLL_CTL_MOD/DEL, upstream's eventpoll_tfd_entry).
# Which file that is gets found with kcmp(KCMP_EPOLL_TFD) among the fds of every task of
# the tree, so a target whose fd was closed (the file lives on in another fd or task)
# or that is itself an epoll is dumped too; its files.img id goes into the tfd entry
# (criu-py's target_id field). Restore: the epoll's resource depends on its targets'
# (so they are open first, in the same task or an ancestor) and each target is added
# with its own fd number, put there for the call.
import os

from criu_py.errors import ImageError, Unsupported
from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry
from criu_py.log import log

FD_TYPE_EVENTPOLL = 7


def eventpoll_entry(fid: int, ref: FdRef):
    from criu_py.images.pb import fdinfo_pb2
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_EVENTPOLL
    fe.id = fid
    e = fe.epfd
    e.id = fid
    e.flags = ref.flags & ~O_CLOEXEC
    fown_entry(e.fown)
    return fe


def _target_id(ctx, ref: FdRef, t, toff: int) -> int:
    """files.img id of the file an epoll item watches: the fd it was added with if that is
    still the file, else any fd of the tree that is (kcmp KCMP_EPOLL_TFD)."""
    from criu_py.files.kcall import kcmp_epoll_tfd
    candidates = ctx.dump.fd_index.get((t.dev, t.ino), [])
    same = [c for c in candidates if c[0] == ref.pid and c[1] == t.tfd]
    for pid, fd, plan in same + [c for c in candidates if c not in same]:
        if kcmp_epoll_tfd(pid, fd, ref.pid, ref.fd, t.tfd, toff):
            log.debug("epoll %d/%d: target fd %d is pid %d fd %d (file id %d)", ref.pid,
                      ref.fd, t.tfd, pid, fd, plan.file_id)
            return plan.file_id
    raise Unsupported(f"pid {ref.pid} fd {ref.fd}: epoll target fd {t.tfd} (inode {t.ino}) "
                      f"is open in no task of the tree: not supported")


class EventpollOps(FileOps):
    fd_type = FD_TYPE_EVENTPOLL
    late = True

    def claims(self, ref: FdRef) -> bool:
        return ref.link == "anon_inode:[eventpoll]"

    def dump_fd(self, ctx, ref: FdRef) -> int:
        key = ("fd", ctx.file_description_key(ref))
        return ctx.files.add(key, lambda fid: eventpoll_entry(fid, ref))

    def finish(self, ctx, ref: FdRef, fid: int) -> None:
        """With every fd of the tree numbered: the targets."""
        e = ctx.files.entry(fid).epfd
        if len(e.tfd):
            return                      # another fd of the same epoll did it
        seen = {}
        for t in ref.info.tfds:
            toff = seen.get(t.tfd, 0)
            seen[t.tfd] = toff + 1
            te = e.tfd.add()
            te.id = fid
            te.tfd = t.tfd
            te.events = t.events
            te.data = t.data
            te.dev, te.inode, te.pos = t.dev, t.ino, t.pos
            te.target_id = _target_id(ctx, ref, t, toff)

    # ---- restore
    def deps(self, tree, fe) -> list:
        return [tid for tid, _ in targets(tree, fe)]

    def check_image(self, tree, fe, what: str) -> None:
        for te in fe.epfd.tfd:
            if te.HasField("target_id") and te.target_id not in tree.files:
                raise ImageError(f"files.img: epoll {fe.id} watches file id {te.target_id}, "
                                 f"which files.img does not have")

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        import fcntl
        from criu_py.files import kcall
        fd = kcall.epoll_create1(O_CLOEXEC)
        nums = [te.tfd for _, te in targets(ctx.tree, entry)]
        if nums and fd <= max(nums):
            # above every number a target is put at for epoll_ctl (fd_at would replace it)
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(nums) + 1)
            os.close(fd)
            fd = high
        try:
            for tid, te in targets(ctx.tree, entry):
                with ctx.fd_at(te.tfd, ctx.fd_of(tid)) as num:
                    kcall.epoll_add(fd, num, te.events, te.data)
        except BaseException:
            os.close(fd)
            raise
        return fd


def targets(tree, fe) -> list:
    """(files.img id, tfd entry) of each watched file. Images without target_id (upstream
    writes none) name the file by the fd number in the table of a task holding the
    epoll: the first such table where that number is open."""
    cache = tree.epoll_targets
    if fe.id in cache:
        return cache[fe.id]
    out = []
    tables = None
    for te in fe.epfd.tfd:
        if te.HasField("target_id"):
            out.append((te.target_id, te))
            continue
        if tables is None:
            tables = [{fi.fd: fi.id for fi in t.fdinfos} for t in tree.tasks if not t.zombie
                      and any(fi.id == fe.id for fi in t.fdinfos)]
        for table in tables:
            if te.tfd in table:
                out.append((table[te.tfd], te))
                break
        else:
            raise ImageError(f"files.img: epoll {fe.id} watches fd {te.tfd}, which no task "
                             f"holding it has open")
    cache[fe.id] = out
    return out


OPS = EventpollOps()
