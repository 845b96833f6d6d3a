# Memory tracking for incremental dumps (`pre-dump`, `dump --track-mem
# --prev-images-dir`): which pages a task wrote since the previous (pre-)dump, so only
# those are copied and the rest become PE_PARENT entries pointing at the parent images.
#
# Two methods, chosen from the kernel facts (kerndat.mem_tracking):
#   - soft-dirty, where the kernel has it: the kernel marks written pages in the task's
#     page tables; PAGEMAP_SCAN reports them, writing 4 to clear_refs starts anew;
#   - uffd-wp otherwise (this project's machines): a userfaultfd made inside the task in
#     WP_ASYNC mode, write-protecting the pages that were dumped. A write lifts a page's
#     protection without waking anyone; PAGEMAP_SCAN reports the unprotected pages as
#     written and protects them again in the same walk. The uffd must stay open between
#     commands: a holder process keeps it (track/holder.py), never the task.
#
# Every page left in the parent is checked against the parent's pagemap (it must be
# there); a process whose tracking state is missing, or whose task exited, exec'ed or
# was replaced by another with the same PID, is dumped in full, and the log says why
# at -v2. Tracking never decides alone: a page is only left out when the tracker says
# it is unchanged and the parent images hold it.
import errno
import os

from criu_py.errors import ImageError
from criu_py.log import log
from criu_py.proc import Record

WRITTEN_KIND = {"uffd-wp": "PAGE_IS_WRITTEN", "soft-dirty": "PAGE_IS_SOFT_DIRTY"}


def scan_triples(fd: int, start: int, end: int, mode: int, rearm: bool, cover, ncover: int,
                 pid: int):
    """csrc/track.c cp_track_scan: (uint64_t[] of (start, end, flag) triples, count),
    the array freed with its last reference."""
    from criu_py.errors import check_errno
    from criu_py.native import ffi, lib
    out = ffi.new("uint64_t **")
    n = check_errno(lib.cp_track_scan(fd, start, end, mode, 1 if rearm else 0, cover, ncover, out),
                    "PAGEMAP_SCAN", pid)
    return (ffi.gc(out[0], lib.cp_free) if out[0] != ffi.NULL else ffi.new("uint64_t[3]")), n


def everything():
    """A cover of the whole address space: cp_track_scan's flag then tells unprotected
    (0) from protected (1) present pages."""
    from criu_py.native import ffi
    return ffi.new("uint64_t[2]", [0, 2**64 - 1]), 1


def track_scan(fd: int, start: int, end: int, mode: int, rearm: bool, level, pid: int):
    """(uint64_t[] of (start, end, in_parent) triples, count): the data pages of one VMA
    (mode 0: uffd-wp quick, 1: uffd-wp exact, 2: soft-dirty). Pages are in_parent only
    where the parent's pagemap has them (`level`, mem.chain.Level)."""
    from criu_py.native import ffi
    cover, ncover = level.cover_array(start) if level is not None else (ffi.NULL, 0)
    return scan_triples(fd, start, end, mode, rearm, cover, ncover, pid)


class TrackedMm(Record):
    """The tracking state of one process (its mm): the uffd (uffd-wp), a pagemap fd and a
    pidfd opened on the task the state belongs to, and the task's start time."""
    _fields = ("pid", "start", "uffd", "pagemap_fd", "pidfd")
    uffd = pagemap_fd = pidfd = -1

    def close(self) -> None:
        for name in ("uffd", "pagemap_fd", "pidfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def fds(self) -> list[int]:
        return [self.uffd, self.pagemap_fd, self.pidfd]

    def task_is_the_same(self, start_time: int) -> bool:
        """Still the process the state was made for: alive (pidfd), not replaced (start
        time), not exec'ed (the old pagemap fd still reads)."""
        from criu_py.track.uffd import mm_alive
        if self.start != start_time:
            return False
        try:
            os.kill(self.pid, 0)
            import select
            if select.select([self.pidfd], [], [], 0)[0]:
                return False            # the pidfd's process has exited
        except OSError:
            return False
        return mm_alive(self.pagemap_fd)


class Tracking:
    """Memory tracking of one (pre-)dump: the parent images, the state taken from the
    previous command's holder, and per process what this dump does with it."""

    def __init__(self, ctx):
        opts = ctx.opts
        kdat = opts.get("kdat")
        self.ctx = ctx
        self.method = (getattr(kdat, "mem_tracking", "") or "") if opts.get("track_mem") else ""
        if self.method == "soft-dirty" and not getattr(kdat, "pagemap_scan", True):
            self.method = ""            # the bits are read with PAGEMAP_SCAN (6.7+)
        # Tracking goes on after this command: a pre-dump, or a dump that leaves the
        # tasks running with --track-mem.
        self.keep_on = bool(self.method) and bool(opts.get("pre_dump") or opts.get("leave_running"))
        self.parent = None              # ImageDir of --prev-images-dir
        self.parent_link = None         # the link's text, as given
        self.parent_uptime = None       # inventory.dump_uptime of the parent (microseconds)
        self.lease = None               # holder.Lease
        self.taken = {}                 # pid -> TrackedMm from the holder
        self.mms = {}                   # pid -> TrackedMm this dump tracks with
        self.levels = {}                # pid -> chain.Level of the parent's pagemap
        self.touched = False            # the tracking state was changed (re-armed, dropped)
        self.dump_uptime = 0            # microseconds since boot at the freeze

    # ------------------------------------------------------------ before the freeze
    def open_previous(self) -> None:
        """--prev-images-dir: the parent images (relative to -D, as upstream) and, for
        uffd-wp, the tracking state its holder keeps."""
        from criu_py.images import ImageDir
        opts, images = self.ctx.opts, self.ctx.images
        prev = opts.get("prev_images_dir")
        if prev:
            path = prev if os.path.isabs(prev) else os.path.join(images.dirpath, prev)
            try:
                self.parent = ImageDir(path)
            except ImageError:
                raise ImageError(f"--prev-images-dir {prev}: no such images dir "
                                 f"({path})") from None
            if os.path.samestat(os.fstat(self.parent.dirfd), os.fstat(images.dirfd)):
                raise ImageError(f"--prev-images-dir {prev}: is the images dir itself")
            inv = self.parent.read_one("inventory.img")
            self.parent_link = prev
            self.parent_uptime = inv.dump_uptime if inv.HasField("dump_uptime") else None
        if self.method == "soft-dirty" and self.parent is not None:
            self.preload_levels()
        if not self.method:
            if opts.get("track_mem"):
                log.warning("this kernel has neither soft-dirty nor uffd-wp tracking: "
                            "every dump writes all pages")
            return
        log.info("memory tracking: %s", self.method)
        if self.parent is None or self.method != "uffd-wp":
            return
        self.preload_levels()
        from criu_py.track import client
        self.lease = client.take(self.parent.dirpath)
        if self.lease is None:
            log.warning("no memory tracking state for %s (no holder: never pre-dumped with "
                        "tracking, or its tasks exited, or another dump took it): dumping "
                        "all pages", prev)
            return
        state = self.lease.state
        if state.get("uptime") != self.parent_uptime or state.get("method") != self.method:
            log.warning("the memory tracking state for %s belongs to another dump of that "
                        "dir: dumping all pages", prev)
            self.lease.keep()
            self.lease = None
            return
        self.taken = self.lease.mms
        log.info("memory tracking state of %d processes taken from holder %d",
                 len(self.taken), state.get("holder", 0))

    def preload_levels(self) -> None:
        """Every pagemap of the parent images, read before the freeze (parsing
        thousands of entries would otherwise lengthen it)."""
        from criu_py.mem import PAGE_SIZE
        from criu_py.mem.chain import read_level
        self.preloaded = {}
        for name in self.parent.list():
            pid = name[len("pagemap-"):-len(".img")]
            if name.startswith("pagemap-") and name.endswith(".img") and pid.isdigit():
                level = read_level(self.parent, name, PAGE_SIZE)
                level.cover_array()
                self.preloaded[int(pid)] = level

    def estimate_changed(self) -> int:
        """Bytes the tracked processes wrote since the last (pre-)dump, roughly (they
        run on): what a dump will copy, to have memory ready for it before the freeze."""
        from criu_py import proc
        from criu_py.errors import CriuError
        from criu_py.native import lib
        if self.method != "uffd-wp":
            return 0
        cover, ncover = everything()
        total = 0
        for mm in self.taken.values():
            try:
                vmas = proc.read_maps(mm.pid)
            except CriuError:
                continue
            for v in vmas:
                if v.shared or v.path.startswith("[v"):
                    continue
                try:
                    out, n = scan_triples(mm.pagemap_fd, v.start, v.end, 0, False, cover, ncover,
                                          mm.pid)
                except CriuError:
                    continue
                total += lib.cp_triples_bytes(out, n, 0)
        return total

    # ------------------------------------------------------------ frozen
    def prepare(self, pd) -> None:
        """Decide for one frozen process: incremental (its parent pagemap and a valid
        tracking state), and whether it gets (new) tracking state."""
        from criu_py.mem.chain import read_level
        from criu_py.mem import PAGE_SIZE
        if not self.method:
            return
        pid = pd.pid
        start = pd.stat.start_time
        mm = self.taken.pop(pid, None)
        level = None
        if self.parent is not None:
            level = self.preloaded.get(pid) if hasattr(self, "preloaded") else \
                read_level(self.parent, f"pagemap-{pid}.img", PAGE_SIZE)
        why = None
        if level is None and self.parent is not None:
            why = "its pagemap is not in the parent images"
        if self.method == "uffd-wp":
            if mm is not None and not mm.task_is_the_same(start):
                why = why or "the tracked task exited or exec'ed, or its PID was reused"
                mm.close()
                mm = None
                self.touched = True
            elif mm is None and self.parent is not None and why is None:
                why = "its tracking ended: it exec'ed or exited after the parent dump"
            if mm is None and self.keep_on:
                mm = self.new_mm(pd)
        elif self.method == "soft-dirty" and level is not None:
            ticks = os.sysconf("SC_CLK_TCK")
            if self.parent_uptime is None or start * 1_000_000 // ticks >= self.parent_uptime:
                why = why or "its PID was reused since the parent dump"
        if self.parent is not None and level is None:
            log.info("pid %d is not in the parent images: all its pages are dumped", pid)
        elif why is not None and self.parent is not None:
            if self.lease is not None or self.method != "uffd-wp":
                log.warning("pid %d: memory tracking lost (%s): all its pages are dumped",
                            pid, why)
            level = None
        if level is not None:
            self.levels[pid] = level
        if mm is not None:
            self.mms[pid] = mm

    def new_mm(self, pd):
        """New tracking state: a WP_ASYNC userfaultfd made inside the frozen task."""
        from criu_py.dump import parasite
        from criu_py.track import uffd as U
        fd = parasite.make_userfaultfd(pd.tracee, pd.leader.raw_gpregs, pd.pidfd,
                                       user_mode_only_ok=True)
        if fd < 0:
            log.warning("pid %d: no userfaultfd (%s): its memory is not tracked", pd.pid,
                        os.strerror(-fd))
            return None
        mm = TrackedMm(pd.pid, pd.stat.start_time, uffd=fd)
        try:
            U.api(fd, U.UFFD_FEATURE_WP_ASYNC, pd.pid)
            mm.pagemap_fd = os.open(f"/proc/{pd.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            mm.pidfd = os.dup(pd.pidfd)
        except BaseException:
            mm.close()
            raise
        log.debug("pid %d: new tracking userfaultfd", pd.pid)
        return mm

    def vma_scan(self, pd):
        """The per-VMA scan for mem.dump.private_page_ranges, or None (plain scan)."""
        mm = self.mms.get(pd.pid)
        level = self.levels.get(pd.pid)
        if self.method == "uffd-wp" and mm is not None:
            return lambda fd, plan: self._scan_uffd(pd, mm, level, fd, plan)
        if self.method == "soft-dirty" and (level is not None or self.keep_on):
            return lambda fd, plan: self._scan_soft_dirty(pd, level, fd, plan)
        return None

    def _scan_uffd(self, pd, mm, level, fd, plan):
        from criu_py import mem as M
        from criu_py.track import uffd as U
        v = plan.vma
        ours = "uw" in v.vm_flags       # registered before this dump: by our uffd, or
        r = U.register_wp(mm.uffd, v.start, v.end)          # EBUSY: by someone else's
        if r == -errno.EBUSY:
            log.info("pid %d: VMA %#x-%#x is registered with another userfaultfd: not "
                     "tracked", pd.pid, v.start, v.end)
            return None
        if r < 0:
            log.debug("pid %d: VMA %#x-%#x cannot be tracked (%s)", pd.pid, v.start, v.end,
                      os.strerror(-r))
            return None
        self.touched = True
        if ours:
            # Written since the last (re-)arm: dumped; the rest is in the parent images.
            # Going on: the exact walk, which protects the data pages again. A last dump
            # of anonymous memory: the kernel's quick walk of protection bits.
            fast = not self.keep_on and plan.entry.status & M.VMA_ANON_PRIVATE and \
                not pd.swapped
            return track_scan(fd, v.start, v.end, 0 if fast else 1, self.keep_on, level, pd.pid)
        # New since the last dump (or moved: mremap drops the registration): all of it,
        # and from now on tracked: its data pages protected.
        from criu_py.mem.dump import scan_pages
        found = scan_pages(fd, v.start, v.end)
        if self.keep_on:
            for s, e in found:
                check = U.protect(mm.uffd, s, e)
                if check < 0:
                    log.debug("pid %d: protecting %#x-%#x failed (%s)", pd.pid, s, e,
                              os.strerror(-check))
        return [(s, e, False) for s, e in found]

    def _scan_soft_dirty(self, pd, level, fd, plan):
        v = plan.vma
        if level is None:
            return None
        return track_scan(fd, v.start, v.end, 2, False, level, pd.pid)

    def after_scan(self, pd) -> None:
        """Soft-dirty: clear the bits once the process's pages are planned (frozen)."""
        if self.method != "soft-dirty" or not self.keep_on:
            return
        try:
            with open(f"/proc/{pd.pid}/clear_refs", "w") as f:
                f.write("4")
        except OSError as exc:
            log.warning("pid %d: clearing soft-dirty bits failed (%s)", pd.pid, exc.strerror)

    # ------------------------------------------------------------ after the dump
    def drop(self, pid: int, why: str) -> None:
        """The process's tracking state cannot go on (its pre-dump failed)."""
        mm = self.mms.pop(pid, None)
        if mm is not None:
            mm.close()
            log.warning("pid %d: memory tracking lost (%s)", pid, why)

    def link_parent(self) -> None:
        """The `parent` symlink to --prev-images-dir, as given (upstream's semantics:
        relative to the images dir)."""
        if self.parent_link is None:
            return
        images = self.ctx.images
        try:
            old = os.readlink("parent", dir_fd=images.dirfd)
        except FileNotFoundError:
            old = None
        except OSError:
            old = ""
        if old == self.parent_link:
            return
        if old is not None:
            os.unlink("parent", dir_fd=images.dirfd)
        os.symlink(self.parent_link, "parent", dir_fd=images.dirfd)
        if os.path.isabs(self.parent_link):
            log.info("an absolute parent link (%s) breaks when the images move", self.parent_link)

    def hand_over(self) -> None:
        """Tracking goes on: a new holder keeps the state for this images dir, and the
        previous holder may go. Otherwise the state ends with this command."""
        if self.keep_on and self.method == "uffd-wp" and self.mms:
            from criu_py.track import client     # socket: only when a holder is needed
            st = os.fstat(self.ctx.images.dirfd)
            state = {"dir": [st.st_dev, st.st_ino], "uptime": self.dump_uptime,
                     "method": self.method, "path": self.ctx.images.dirpath}
            pid = client.start_holder(state, list(self.mms.values()))
            log.info("memory tracking of %d processes handed to holder %d", len(self.mms), pid)
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.close_mms()

    def close_mms(self) -> None:
        for mm in list(self.mms.values()) + list(self.taken.values()):
            mm.close()
        self.mms, self.taken = {}, {}

    def abort(self) -> None:
        """The dump failed: give the state back untouched when nothing changed it."""
        if self.lease is not None:
            if self.touched:
                self.lease.close()          # unknown state: the holder exits
            else:
                self.lease.keep()
            self.lease = None
        self.close_mms()
        if self.parent is not None:
            self.parent.close()
            self.parent = None

    def close(self) -> None:
        if self.parent is not None:
            self.parent.close()
            self.parent = None
