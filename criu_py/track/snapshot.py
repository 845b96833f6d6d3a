# Snapshots with --leave-running: a big process is frozen only while its state is
# collected, not while gigabytes are copied, and the images still hold its memory exactly
# as it was at the freeze. Its private anonymous memory is write-protected with a
# synchronous userfaultfd (made inside the task, held by us): once the tree runs again,
# a copier (csrc/snapshot.c) saves every page and lifts its protection, and a write to a
# page not saved yet waits until it is (copy before write, as QEMU's background
# snapshots do).
#
# Protecting a GiB takes 15-30 ms, too long for a short freeze, so it is done before:
#   1. before the freeze: the tree is stopped for a moment to make each big process's
#      uffd, its anonymous VMAs are registered, a fault thread starts ("pre" mode: a
#      write only lifts the protection of its 2 MiB chunk) and the present pages are
#      protected while the tasks run;
#   2. frozen: the pages are scanned again; those not protected (written since, or new)
#      are protected now (few), the page list is fixed and the fault thread switches to
#      copy-before-write; memory outside those VMAs (file-private copies, ...) is copied
#      into memory now;
#   3. released: the copy runs while the tasks work; then the images are completed.
# Pages that only map the zero page come out as data (zeros) here: telling them apart
# would cost a slow walk while frozen.
import os
import time

from criu_py.errors import DumpError, check_errno
from criu_py.log import log
from criu_py.proc import Record

SNAPSHOT_MIN_KB = 16 << 10          # processes smaller than this are copied while frozen
CHUNK = 2 << 20
POOL_MAX = 1 << 30                  # buffers between the copy and the disk
INJECTION_ROOM = 32 << 10           # below a stack pointer: where injection puts its frame
CATCH_UP_PASSES = 3                 # protecting again what was written meanwhile, before
CATCH_UP_DONE = 16 << 20            # the freeze, until this little is left


class Target(Record):
    """One process being snapshot: its index in the engine, uffd, a fd that reads its
    mm as it was when frozen (/proc/PID/mem when other tasks share that mm, else a
    pagemap fd that tells whether it is still alive while process_vm_readv reads), its
    registered VMAs, and the pages file being filled."""
    _fields = ("pid", "index", "uffd", "mem_fd", "registered", "out_fd", "buffered",
               "entries", "pages_id", "shared_mm")
    out_fd = -1
    shared_mm = False
    buffered = ()
    entries = None


def wanted(ctx) -> bool:
    opts = ctx.opts
    kdat = opts.get("kdat")
    return bool(opts.get("leave_running") and not opts.get("pre_dump") and
                not opts.get("track_mem") and getattr(kdat, "uffd_wp", True))


class Snapshot:
    def __init__(self, ctx):
        self.ctx = ctx
        self.targets = {}           # pid -> Target
        self.engine = None
        self.stop_us = 0            # how long the tree was stopped to make the uffds
        self.stats = None

    # ------------------------------------------------------------ before the freeze
    def prepare(self) -> None:
        from criu_py import proc
        from criu_py.errors import CriuError
        pids = [p for p in _tree_pids(self.ctx.pid) if _rss_kb(p) >= SNAPSHOT_MIN_KB]
        if not pids:
            return
        self._make_uffds(pids)
        if not self.targets:
            return
        from criu_py.native import ffi, lib
        from criu_py.track import uffd as U
        for t in self.targets.values():
            try:
                vmas = proc.read_maps(t.pid)
            except CriuError:
                vmas = []
            for v in vmas:
                if v.shared or v.path.startswith("[v") or not (
                        v.inode == 0 and (not v.path or v.path in ("[heap]", "[stack]")
                                          or v.path.startswith("[anon:"))):
                    continue
                if U.register_wp(t.uffd, v.start, v.end) == 0:
                    t.registered.append((v.start, v.end))
        self.engine = lib.cp_snap_new(len(self.targets), CHUNK)
        if self.engine == ffi.NULL:
            raise DumpError("cannot set up the snapshot copier")
        for t in self.targets.values():
            arr = ffi.new("uint64_t[]", [x for r in t.registered for x in r] or [0, 0])
            check_errno(lib.cp_snap_target(self.engine, t.index, t.uffd, t.mem_fd,
                                           0 if t.shared_mm else t.pid, arr, len(t.registered)),
                        "snapshot set-up", t.pid)
        check_errno(lib.cp_snap_reserve(self.engine, self._pool_size(pids)),
                    "memory for the snapshot")
        check_errno(lib.cp_snap_start(self.engine), "starting the snapshot fault thread")
        t0 = time.monotonic()
        nbytes = 0
        for t in self.targets.values():
            pm = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for start, end in t.registered:
                    triples, n = _present(pm, start, end, t.pid)
                    pairs = ffi.new("uint64_t[]", 2 * max(n, 1))
                    for i in range(n):
                        pairs[2 * i] = triples[3 * i]
                        pairs[2 * i + 1] = triples[3 * i + 1] - triples[3 * i]
                        nbytes += pairs[2 * i + 1]
                    check_errno(lib.cp_snap_protect(self.engine, t.index, pairs, n),
                                "write-protecting memory", t.pid)
            finally:
                os.close(pm)
        log.info("snapshot: %d processes, %d MiB write-protected while running in %.1f ms",
                 len(self.targets), nbytes >> 20, (time.monotonic() - t0) * 1e3)
        # What the tasks wrote meanwhile lost its protection: protect it again, a few
        # times, so that little is left for the freeze.
        for _ in range(CATCH_UP_PASSES):
            t1 = time.monotonic()
            again = self._protect_written()
            log.debug("snapshot: %d KiB written meanwhile, protected again in %.1f ms",
                      again >> 10, (time.monotonic() - t1) * 1e3)
            if again <= CATCH_UP_DONE:
                break

    def _pool_size(self, pids: list) -> int:
        """Buffers for every page when memory allows (the disk is then written after
        the copy), else for a part (a writer drains them meanwhile)."""
        total = sum(_rss_kb(p) for p in pids if p in self.targets) << 10
        try:
            with open("/proc/meminfo") as f:
                avail = next(int(line.split()[1]) << 10 for line in f
                             if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            avail = 0
        return max(64 << 20, min(total + (32 << 20), POOL_MAX, avail // 4))

    def _protect_written(self) -> int:
        """Protect the present pages that are not protected (while the tasks run):
        their bytes."""
        from criu_py.native import lib
        total = 0
        for t in self.targets.values():
            pm = os.open(f"/proc/{t.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                for start, end in t.registered:
                    triples, n = _present(pm, start, end, t.pid)
                    total += lib.cp_triples_bytes(triples, n, 0)
                    check_errno(lib.cp_snap_refresh(self.engine, t.index, triples, n),
                                "write-protecting memory", t.pid)
            finally:
                os.close(pm)
        return total

    def _make_uffds(self, pids: list) -> None:
        """A synchronous userfaultfd per process, made inside it: the tree is stopped
        just for that."""
        from criu_py.dump import parasite
        from criu_py.dump.tree import KCMP_VM, Tree, kcmp
        from criu_py.track import uffd as U
        t0 = time.monotonic()
        with Tree(self.ctx.pid) as tree:
            tree.freeze()
            for pid in pids:
                p = tree.procs.get(pid)
                if p is None or p.zombie or p.leader is None or p.vfork_child:
                    continue
                pidfd = os.pidfd_open(pid)
                try:
                    leader = p.leader
                    fd = parasite.make_userfaultfd(leader, leader.get_gpregs(), pidfd)
                finally:
                    os.close(pidfd)
                if fd < 0:
                    log.info("snapshot: pid %d cannot have a userfaultfd (%s): copied while "
                             "frozen", pid, os.strerror(-fd))
                    continue
                t = Target(pid, len(self.targets), fd, -1, [])
                self.targets[pid] = t
                U.api(fd, 0, pid)
                t.shared_mm = any(kcmp(pid, o.pid, KCMP_VM) == 0 for o in tree.procs.values()
                                  if o.pid != pid and not o.zombie)
                name = "mem" if t.shared_mm else "pagemap"
                t.mem_fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        self.stop_us = int((time.monotonic() - t0) * 1e6)
        log.info("snapshot: the tree was stopped %.2f ms to make %d userfaultfds",
                 self.stop_us / 1e3, len(self.targets))

    # ------------------------------------------------------------ frozen
    def before_injection(self, procs) -> None:
        """Frozen, before code is injected: injection writes a frame below each thread's
        stack pointer through /proc/PID/mem, which a write-protected page refuses (EIO:
        such an access cannot wait for our fault thread). The pages there are unprotected
        now; the scan protects them again (it protects whatever is unprotected)."""
        from criu_py.native import lib
        for pd in procs:
            t = self.targets.get(pd.pid)
            if t is None:
                continue
            for th in pd.threads:
                sp = th.gpregs["sp"]
                lo, hi = (sp - INJECTION_ROOM) & ~4095, (sp + 4095) & ~4095
                for vs, ve in t.registered:
                    a, b = max(lo, vs), min(hi, ve)
                    if a < b:
                        lib.cp_uffd_wp(t.uffd, a, b - a, 0)

    def vma_scan(self, pd):
        """The per-VMA scan for mem.dump.private_page_ranges: for registered VMAs, the
        present pages, those written since protected again (now, frozen)."""
        t = self.targets.get(pd.pid)
        if t is None:
            return None
        registered = set(t.registered)
        from criu_py.native import lib

        def scan(fd, plan):
            if (plan.vma.start, plan.vma.end) not in registered:
                return None
            triples, n = _present(fd, plan.vma.start, plan.vma.end, pd.pid)
            check_errno(lib.cp_snap_refresh(self.engine, t.index, triples, n),
                        "write-protecting memory", pd.pid)
            return triples, n
        return scan

    def write_frozen(self, pd, images, pages_id: int, pool) -> None:
        """Frozen: the layout of pd's pages file; the pages outside the registered VMAs
        copied into memory now, the rest handed to the copier."""
        from criu_py.mem.dump import pagemap_entries, pagemap_flags
        from criu_py.native import ffi, lib
        t = self.targets[pd.pid]
        registered = set(t.registered)
        engine, now, off = [], [], 0
        for start, end, _, plan in pd.pages.flat():
            if (plan.vma.start, plan.vma.end) in registered:
                engine.append((start, end - start, off))
            else:
                now.append((start, end, off))
            off += end - start
        t.pages_id = pages_id
        t.out_fd = images.open_raw(f"pages-{pages_id}.img", write=True)
        os.ftruncate(t.out_fd, off)
        t.buffered = [(_read_now(pd, s, e, pool), o) for s, e, o in now]
        t.entries = pagemap_entries(pd.pages.ranges, pages_id, pagemap_flags(pd.pages))
        arr = ffi.new("uint64_t[]", [x for r in engine for x in r] or [0, 0, 0])
        check_errno(lib.cp_snap_set_chunks(self.engine, t.index, arr, len(engine), t.out_fd),
                    "snapshot set-up", pd.pid)
        t.total = off
        t.scanned = pd.pages.scanned
        log.debug("pid %d: %d KiB left to the copier, %d KiB copied while frozen", pd.pid,
                  sum(n for _, n, _ in engine) >> 10, sum(e - s for s, e, _ in now) >> 10)

    def copy_mode(self) -> None:
        from criu_py.native import lib
        if self.engine is not None:
            lib.cp_snap_copy_mode(self.engine)

    # ------------------------------------------------------------ released
    def copy(self, images) -> dict:
        """The tree runs: copy, then complete each pages file and pagemap. Returns
        pid -> PageStats."""
        from criu_py.mem import PAGE_SIZE
        from criu_py.mem.dump import PageStats
        from criu_py.native import ffi, lib
        if self.engine is None or not any(t.out_fd >= 0 for t in self.targets.values()):
            return {}
        st = ffi.new("struct cp_snap_stats *")
        pool = min(POOL_MAX, sum(getattr(t, "total", 0) for t in self.targets.values()) + CHUNK)
        t0 = time.monotonic()
        err = lib.cp_snap_copy(self.engine, pool, st)
        copy_s = st.copy_ns / 1e9           # until the last page was copied
        if err:
            raise DumpError(f"the snapshot copy failed at {st.error_addr:#x}: "
                            f"{os.strerror(-err)} (did a task exec or exit?)")
        self.stats = st
        out = {}
        for t in self.targets.values():
            if t.out_fd < 0:
                continue
            for (buf, boff, n, own), off in t.buffered:
                view = memoryview(buf)[boff:boff + n]
                done = 0
                while done < n:
                    done += os.pwrite(t.out_fd, view[done:], off + done)
                view.release()
                if own:
                    buf.close()
            os.close(t.out_fd)
            t.out_fd = -1
            images.write_entries(f"pagemap-{t.pid}.img", t.entries)
            ps = PageStats(pages_scanned=t.scanned, pages_written=t.total // PAGE_SIZE,
                           memwrite_us=int(copy_s * 1e6))
            out[t.pid] = ps
        log.info("snapshot: %d MiB copied in %.1f ms while the tree ran (%d write faults, "
                 "%d chunks copied for a waiting task, %d let through before the freeze; "
                 "monotonic %.6f-%.6f)", st.bytes >> 20, copy_s * 1e3, st.faults,
                 st.fault_copies, st.pre_unprotects, t0, t0 + copy_s)
        return out

    def close(self) -> None:
        """Stop the copier and close the uffds: any task waiting on one goes on."""
        from criu_py.native import lib
        if self.engine is not None:
            lib.cp_snap_free(self.engine)
            self.engine = None
        for t in self.targets.values():
            for name in ("uffd", "mem_fd", "out_fd"):
                fd = getattr(t, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(t, name, -1)


def _present(pagemap_fd: int, start: int, end: int, pid: int):
    """(uint64_t[] triples, count) of the present pages of [start, end), flag 1 where
    they are write-protected."""
    from criu_py.track import everything, scan_triples
    return scan_triples(pagemap_fd, start, end, 0, False, *everything(), pid)


def _read_now(pd, start: int, end: int, pool):
    """pd's memory [start, end) into memory (frozen): (mmap, offset, length, own)."""
    import mmap
    n = end - start
    got = pool.take(n) if pool is not None else None
    buf, boff, own = (got[0], got[1], False) if got else (mmap.mmap(-1, max(n, 4096)), 0, True)
    with open(f"/proc/{pd.pid}/mem", "rb", buffering=0) as f:
        f.seek(start)
        view = memoryview(buf)[boff:boff + n]
        done = 0
        while done < n:
            k = f.readinto(view[done:])
            if not k:
                view.release()
                raise DumpError(f"cannot read memory of pid {pd.pid} at {start + done:#x}")
            done += k
        view.release()
    return buf, boff, n, own


def _tree_pids(root: int) -> list:
    from criu_py import proc
    from criu_py.errors import CriuError
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        try:
            todo += proc.read_children(pid)
        except CriuError:
            pass
    return out


def _rss_kb(pid: int) -> int:
    from criu_py import proc
    from criu_py.errors import CriuError
    try:
        return proc.read_status(pid).vm_rss
    except CriuError:
        return 0
