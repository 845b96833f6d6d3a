# `crit make-lazy DIR OUTDIR`: copy a checkpoint, taking out of pages-N.img every page a lazy
# restore may fetch later. Those ranges stay in the pagemap with PE_LAZY and without PE_PRESENT
# (upstream's marking), so a restore from OUTDIR maps them empty and a lazy-pages server fills them
# from the full images in DIR on demand. OUTDIR names DIR with a relative symlink `lazy-source`
# (like the `parent` link of incremental dumps), which `lazy-pages -D OUTDIR` follows.
#
# Work is interval arithmetic: the lazy-eligible VMAs of a process become a sorted list of merged
# [start, end) ranges; each pagemap entry is cut against it in one forward pass; the kept pieces
# are copied from the source pages file through one bounded buffer. DIR is only read.
import bisect
import os
import shutil

import criu_py.images as img
from criu_py.errors import ImageError
from criu_py.proc import Record
from criu_py.lazy.ranges import lazy_ranges, stack_addrs, vma_can_be_lazy  # noqa: F401

BUFFER_SIZE = 4 << 20   # the one copy buffer: pages pass through it, never the whole file
SOURCE_LINK = "lazy-source"   # OUTDIR/lazy-source -> DIR (relative): where the lazy pages are


class Plan(Record):
    """The new pagemap of one process and the byte runs of its pages file to keep."""
    _fields = ("entries", "runs", "kept_pages", "lazy_pages", "present_before", "parent_pages")

    def __init__(self, entries: list | None = None, runs: list | None = None, kept_pages: int = 0,
                 lazy_pages: int = 0, present_before: int = 0, parent_pages: int = 0):
        self.entries = [] if entries is None else entries   # new pagemap entries (head excluded)
        self.runs = [] if runs is None else runs            # [src_offset, length] in the source file
        self.kept_pages = kept_pages
        self.lazy_pages = lazy_pages
        self.present_before = present_before
        self.parent_pages = parent_pages    # left in the parent images (incremental dumps)


def plan_pagemap(entries, ranges, page_size: int) -> Plan:
    """Cut every present pagemap entry against the lazy ranges, in pagemap (= pages file) order."""
    plan = Plan()
    starts = [a for a, _ in ranges]
    src = 0          # offset in the source pages file of the current entry's first page
    ri = 0           # first lazy range that may meet the current entry
    prev_vaddr = -1

    def add_run(off, length):
        runs = plan.runs
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1][1] += length
        else:
            runs.append([off, length])

    def piece(pe, vaddr, n, flags):
        m = type(pe)()
        m.CopyFrom(pe)
        m.vaddr = vaddr
        m.flags = flags
        if not flags & img.PE_PARENT:
            m.ClearField("in_parent")
        if pe.HasField("nr_pages"):
            m.nr_pages = n
            m.compat_nr_pages = n if (pe.compat_nr_pages and n < (1 << 32)) else 0
        else:
            m.compat_nr_pages = n
        plan.entries.append(m)

    for pe in entries:
        n = img.pagemap_nr_pages(pe)
        start, end = pe.vaddr, pe.vaddr + n * page_size
        if pe.flags & img.PE_PARENT or pe.in_parent:
            # In the parent images: what a lazy restore may serve (from DIR, which
            # follows its chain) becomes lazy; the rest stays in the parents.
            for lo, hi, inside in _split(start, end, ranges, starts):
                k = (hi - lo) // page_size
                if inside:
                    piece(pe, lo, k, (pe.flags & ~img.PE_PARENT) | img.PE_LAZY)
                    plan.lazy_pages += k
                else:
                    piece(pe, lo, k, pe.flags | img.PE_PARENT)
                    plan.parent_pages += k
            continue
        if not pe.flags & img.PE_PRESENT:
            plan.entries.append(pe)      # not in this pages file: nothing to take out
            continue
        plan.present_before += n
        if start < prev_vaddr:           # out of order: find the place again
            ri = max(0, bisect.bisect_right(starts, start) - 1)
        prev_vaddr = start
        while ri < len(ranges) and ranges[ri][1] <= start:
            ri += 1
        if ri >= len(ranges) or ranges[ri][0] >= end:
            plan.entries.append(pe)      # wholly kept: the entry as it was
            plan.kept_pages += n
            add_run(src, end - start)
            src += end - start
            continue
        lazy_flags = (pe.flags & ~img.PE_PRESENT) | img.PE_LAZY
        j, pos = ri, start
        while pos < end:
            a, b = (max(ranges[j][0], pos), min(ranges[j][1], end)) \
                if j < len(ranges) and ranges[j][0] < end else (end, end)
            if a > pos:                  # kept piece before the next lazy range
                piece(pe, pos, (a - pos) // page_size, pe.flags)
                plan.kept_pages += (a - pos) // page_size
                add_run(src + (pos - start), a - pos)
            if b > a:
                piece(pe, a, (b - a) // page_size, lazy_flags)
                plan.lazy_pages += (b - a) // page_size
                j += ranges[j][1] <= end
            pos = max(b, a)
        src += end - start
    return plan


def _split(start: int, end: int, ranges, starts):
    """[start, end) cut by the sorted lazy ranges: (lo, hi, inside a range)."""
    i = max(0, bisect.bisect_right(starts, start) - 1)
    pos = start
    while pos < end:
        while i < len(ranges) and ranges[i][1] <= pos:
            i += 1
        if i >= len(ranges) or ranges[i][0] >= end:
            yield pos, end, False
            return
        a, b = max(ranges[i][0], pos), min(ranges[i][1], end)
        if a > pos:
            yield pos, a, False
        yield a, b, True
        pos = b


def copy_runs(src_fd: int, dst_fd: int, runs, buf: memoryview) -> int:
    """Copy the byte runs of src to dst back to back, through `buf`. Returns bytes written."""
    total = 0
    size = len(buf)
    for off, length in runs:
        while length > 0:
            want = min(size, length)
            got = os.preadv(src_fd, [buf[:want]], off)
            if got <= 0:
                raise ImageError("short read of the pages file")
            view = buf[:got]
            while view:
                w = os.write(dst_fd, view)
                view = view[w:]
            off += got
            length -= got
            total += got
    return total


class Report(Record):
    _fields = ("processes", "copied_files", "page_size")

    def __init__(self, processes: list | None = None, copied_files: int = 0, page_size: int = 0):
        self.processes = [] if processes is None else processes   # (pid, kept pages, lazy pages)
        self.copied_files = copied_files
        self.page_size = page_size

    @property
    def kept(self):
        return sum(k for _, k, _ in self.processes)

    @property
    def lazy(self):
        return sum(z for _, _, z in self.processes)


def make_lazy(dirpath: str, outdir: str, page_size: int | None = None) -> Report:
    page_size = page_size or os.sysconf("SC_PAGE_SIZE")
    src = img.ImageDir(dirpath)
    if os.path.realpath(dirpath) == os.path.realpath(outdir):
        raise ImageError(f"{outdir}: the output dir is the checkpoint itself")
    created = not os.path.exists(outdir)
    if not created:
        if not os.path.isdir(outdir):
            raise ImageError(f"{outdir}: exists and is not a directory")
        if os.listdir(outdir):
            raise ImageError(f"{outdir}: exists and is not empty (refusing to write into it)")
    if not src.exists("pstree.img"):
        raise ImageError(f"{dirpath}: no pstree.img, not a checkpoint directory")
    tasks = src.read_entries("pstree.img")
    # Plan everything first: a bad image stops us before anything is written.
    plans = []
    for t in tasks:
        mm = src.read_one(f"mm-{t.pid}.img")
        pm = src.read_entries(f"pagemap-{t.pid}.img")
        if not pm:
            raise ImageError(f"pagemap-{t.pid}.img: no pagemap head")
        head, entries = pm[0], pm[1:]
        ranges = lazy_ranges(mm.vmas, stack_addrs(src, t, mm))
        plan = plan_pagemap(entries, ranges, page_size)
        pages = f"pages-{head.pages_id}.img"
        size = os.stat(pages, dir_fd=src.dirfd).st_size if src.exists(pages) else None
        if size is None:
            raise ImageError(f"{pages}: missing (named by pagemap-{t.pid}.img)")
        if size != plan.present_before * page_size:
            raise ImageError(f"{pages}: holds {size} bytes, pagemap-{t.pid}.img says"
                             f" {plan.present_before} pages of {page_size}")
        if plan.parent_pages and not os.path.isdir(os.path.join(dirpath, "parent")):
            raise ImageError(f"pagemap-{t.pid}.img: pages live in parent images, but "
                             f"{dirpath} has no parent link")
        plans.append((t.pid, head, pages, plan))
    if len({p[2] for p in plans}) != len(plans):
        raise ImageError(f"{dirpath}: two processes name the same pages file")

    out = img.ImageDir(outdir, create=True)
    written = []
    try:
        rewritten = set()
        buf = memoryview(bytearray(BUFFER_SIZE))
        report = Report(page_size=page_size)
        for pid, head, pages, plan in plans:
            name = f"pagemap-{pid}.img"
            out.write_entries(name, [head] + plan.entries)
            written.append(name)
            sfd = src.open_raw(pages)
            try:
                dfd = out.open_raw(pages, write=True)
                written.append(pages)
                try:
                    copy_runs(sfd, dfd, plan.runs, buf)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
            rewritten.update((name, pages))
            report.processes.append((pid, plan.kept_pages, plan.lazy_pages))
        if any(plan.parent_pages for _, _, _, plan in plans):
            # the pages left in the parents: OUTDIR links to DIR's parent
            target = os.path.realpath(os.path.join(dirpath, "parent"))
            os.symlink(os.path.relpath(target, os.path.realpath(outdir)), out.path("parent"))
            written.append("parent")
        if report.lazy:
            # the copy names where its lazy pages are: `lazy-pages -D OUTDIR` serves them
            # from DIR (and DIR's parents), read and checked there
            os.symlink(os.path.relpath(os.path.realpath(dirpath), os.path.realpath(outdir)),
                       out.path(SOURCE_LINK))
            written.append(SOURCE_LINK)
        from criu_py.images import integrity
        for name in src.list():
            if name in rewritten or name in integrity.CHECKSUM_IMAGES:
                continue
            s = src.path(name)
            if os.path.islink(s) or not os.path.isfile(s):
                continue
            d = out.path(name)
            shutil.copyfile(s, d)
            written.append(name)
            os.chmod(d, 0o600)
            report.copied_files += 1
        if any(src.exists(n) for n in integrity.CHECKSUM_IMAGES):
            # the pagemaps and pages files changed: checksums of the copy, not the source's
            written.append(integrity.CHECKSUM_IMAGE)
            integrity.seal(out)
        return report
    except BaseException:
        for name in written:
            try:
                os.unlink(out.path(name))
            except OSError:
                pass
        if created:
            try:
                os.rmdir(outdir)
            except OSError:
                pass
        raise
    finally:
        out.close()
        src.close()
