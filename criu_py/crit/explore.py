# `crit x DIR ps|fds|mems|rss`: a person's view of a checkpoint, read through the image layer.
import os

import criu_py.images as img
from criu_py.errors import ImageError
# The status bits and mmap flags of vma_entry are the ones the dump and restore use
# (re-exported for crit's make-lazy and the tests).
from criu_py.mem import (  # noqa: F401
    MAP_ANONYMOUS, MAP_GROWSDOWN, MAP_HUGETLB, MAP_LOCKED, MAP_PRIVATE, MAP_SHARED, PAGE_SIZE,
    VMA_ANON_PRIVATE, VMA_ANON_SHARED, VMA_AREA_AIORING, VMA_AREA_HEAP, VMA_AREA_MEMFD,
    VMA_AREA_REGULAR, VMA_AREA_SOCKET, VMA_AREA_STACK, VMA_AREA_SYSVIPC, VMA_AREA_VDSO,
    VMA_AREA_VSYSCALL, VMA_AREA_VVAR, VMA_FILE_PRIVATE, VMA_FILE_SHARED)


def text(value) -> str:
    """A name from an image as printable text: a proto2 string may hold bytes that are not
    UTF-8 (Linux paths); they are shown backslash-escaped."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


class Checkpoint:
    """Lazy, cached access to the images of one checkpoint directory."""

    def __init__(self, path):
        self.dir = img.ImageDir(path)
        self._files = None
        self._chain = None

    def chain(self, pid):
        """The pagemaps of pid along the chain of parent images (mem/chain.py)."""
        from criu_py.mem.chain import Chain, open_chain
        if self._chain is None:
            self._chain = open_chain(self.dir)
        return Chain(self._chain, f"pagemap-{pid}.img", PAGE_SIZE)

    def dir_name(self, depth: int) -> str:
        """How a dir of the chain is shown: its name as the links give it."""
        return os.path.basename(os.path.normpath(self._chain[depth].dirpath))

    def tasks(self):
        return self.dir.read_entries("pstree.img")

    def core(self, pid):
        return self.dir.read_one(f"core-{pid}.img")

    def ids(self, pid, core=None):
        if self.dir.exists(f"ids-{pid}.img"):
            return self.dir.read_one(f"ids-{pid}.img")
        core = core or self.core(pid)
        if core.HasField("ids"):
            return core.ids
        raise ImageError(f"ids-{pid}.img: missing (and core-{pid}.img has no ids)")

    def mm(self, pid):
        return self.dir.read_one(f"mm-{pid}.img")

    def pagemap(self, pid):
        entries = self.dir.read_entries(f"pagemap-{pid}.img")
        if not entries:
            raise ImageError(f"pagemap-{pid}.img: no pagemap head")
        return entries[0], entries[1:]

    def files(self):
        """id -> file_entry of files.img (empty for old images without it)."""
        if self._files is None:
            self._files = {}
            if self.dir.exists("files.img"):
                self._files = {f.id: f for f in self.dir.read_entries("files.img")}
        return self._files

    def _old_image(self, name, fid):
        # Images older than files.img keep each kind in an image of its own.
        if not self.dir.exists(name):
            return None
        for e in self.dir.read_entries(name):
            if e.id == fid:
                return e
        return None

    def reg_path(self, fid):
        f = self.files().get(fid)
        if f is not None and f.HasField("reg"):
            return text(f.reg.name)
        e = self._old_image("reg-files.img", fid)
        return text(e.name) if e is not None else f"<unknown file {fid}>"

    def describe_file(self, ftype: str, fid: int) -> str:
        """Path or short description of an open file, crit style."""
        f = self.files().get(fid)
        if ftype == "REG":
            return self.reg_path(fid)
        if ftype == "PIPE":
            p = f.pipe if f is not None and f.HasField("pipe") else self._old_image("pipes.img", fid)
            return f"pipe[{p.pipe_id}]" if p is not None else "pipe[?]"
        if ftype == "FIFO":
            p = f.fifo if f is not None and f.HasField("fifo") else self._old_image("fifo.img", fid)
            return f"fifo[{p.pipe_id}] {self.reg_path(p.regf_id)}" if p is not None else "fifo[?]"
        if ftype == "UNIXSK":
            u = f.usk if f is not None and f.HasField("usk") else self._old_image("unixsk.img", fid)
            if u is None:
                return "unix[?]"
            name = u.name.rstrip(b"\0").decode("utf-8", "replace") if u.name else ""
            return f"unix[{u.ino} ({u.peer}){' ' + name if name else ''}]"
        if ftype == "INETSK" and f is not None and f.HasField("isk"):
            s = f.isk
            return f"inet[{s.ino}] family {s.family} type {s.type} port {s.src_port}->{s.dst_port}"
        if ftype == "INOTIFY" and f is not None and f.HasField("ify"):
            wds = ", ".join(f"wd {w.wd} ino {w.i_ino} mask {w.mask:#x}" for w in f.ify.wd)
            return f"anon_inode:inotify [{wds}]"
        if ftype == "MEMFD" and f is not None and f.HasField("memfd"):
            return f"memfd inode {f.memfd.inode_id}"
        if ftype in ("EVENTFD", "EVENTPOLL", "SIGNALFD", "TIMERFD", "FANOTIFY", "BPFMAP", "PIDFD"):
            return f"anon_inode:[{ftype.lower()}] id {fid}"
        if ftype == "TTY":
            t = f.tty if f is not None and f.HasField("tty") else self._old_image("tty.img", fid)
            return self.describe_tty(t) if t is not None else "tty[?]"
        return f"{ftype}.{fid}"

    def describe_tty(self, t) -> str:
        """A terminal fd: its tty-info entry (type, rdev) when tty-info.img has it."""
        info = None
        if self.dir.exists("tty-info.img"):
            info = next((i for i in self.dir.read_entries("tty-info.img")
                         if i.id == t.tty_info_id), None)
        if info is None:
            return f"tty[info {t.tty_info_id}]"
        kind = img.pb_module("tty_pb2").TtyType.Name(info.type) \
            if info.type in img.pb_module("tty_pb2").TtyType.values() else str(info.type)
        return f"tty[{kind} {os.major(info.rdev)}:{os.minor(info.rdev)}]"


def _ftype_name(value: int) -> str:
    enum = img.pb_module("fdinfo_pb2").fd_types
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def explore_ps(ck: Checkpoint) -> list[str]:
    tasks = ck.tasks()
    by_pid = {t.pid: t for t in tasks}
    kids: dict[int, list] = {}
    roots = []
    for t in tasks:
        (kids.setdefault(t.ppid, []).append(t) if t.ppid in by_pid else roots.append(t))
    lines = [f"{'PID':>7}{'PPID':>7}{'PGID':>7}{'SID':>7}   COMM"]

    def walk(t, depth):
        comm = text(ck.core(t.pid).tc.comm)
        threads = f"  ({len(t.threads)} threads)" if len(t.threads) > 1 else ""
        lines.append(f"{t.pid:7d}{t.ppid:7d}{t.pgid:7d}{t.sid:7d}   {'    ' * depth}{comm}{threads}")
        for k in kids.get(t.pid, []):
            walk(k, depth + 1)

    for r in roots:
        walk(r, 0)
    return lines


def explore_fds(ck: Checkpoint) -> list[str]:
    lines = []
    for t in ck.tasks():
        ids = ck.ids(t.pid)
        lines.append(f"{t.pid}")
        for fd in ck.dir.read_entries(f"fdinfo-{ids.files_id}.img"):
            kind = _ftype_name(fd.type)
            lines.append(f"\t{fd.fd:7d}: {kind:<9} {ck.describe_file(kind, fd.id)}")
        if ck.dir.exists(f"fs-{t.pid}.img"):
            fs = ck.dir.read_one(f"fs-{t.pid}.img")
            lines.append(f"\t{'cwd':>7}: {'REG':<9} {ck.reg_path(fs.cwd_id)}")
            lines.append(f"\t{'root':>7}: {'REG':<9} {ck.reg_path(fs.root_id)}")
    return lines


def vma_backing(ck: Checkpoint, vma, stack_hint=None) -> str:
    st = vma.status
    if st & VMA_AREA_SYSVIPC:
        return f"sysvipc[{vma.shmid:#x}]"
    if st & VMA_ANON_SHARED:
        return f"shmem[{vma.shmid:#x}]"
    if st & VMA_AREA_SOCKET:
        return f"packet[{vma.shmid:#x}]"
    if st & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
        s = ck.reg_path(vma.shmid)
        if vma.pgoff:
            s += f" + {vma.pgoff:#x}"
        return s
    if st & VMA_AREA_VDSO:
        return "[vdso]"
    if st & VMA_AREA_VVAR:
        return "[vvar]"
    if st & VMA_AREA_VSYSCALL:
        return "[vsyscall]"
    if st & VMA_AREA_STACK or vma.flags & MAP_GROWSDOWN or stack_hint:
        return "[stack]"
    if st & VMA_AREA_HEAP:
        return "[heap]"
    return "[anon]"


def _flags_text(vma) -> str:
    parts = ["shared" if vma.flags & MAP_SHARED else "private"]
    if vma.flags & MAP_ANONYMOUS:
        parts.append("anon")
    if vma.flags & MAP_GROWSDOWN:
        parts.append("growsdown")
    if vma.flags & MAP_LOCKED:
        parts.append("locked")
    if vma.flags & MAP_HUGETLB:
        parts.append("hugetlb")
    return ",".join(parts)


def pages_per_vma(vmas, entries, page_size=PAGE_SIZE, chain=None):
    """For each VMA, (present pages, lazy pages, parent pages, {depth: pages}) from the
    pagemap: one merge pass over both sorted lists; with `chain` (mem.chain.Chain),
    pages in parent images are followed to the dir (depth) holding their data."""
    counts = [[0, 0, 0, {}] for _ in vmas]
    vi = 0
    for pe in entries:
        start = pe.vaddr
        end = start + img.pagemap_nr_pages(pe) * page_size
        in_parent = pe.flags & img.PE_PARENT or pe.in_parent
        pieces = chain.resolve(start, end) if in_parent and chain is not None else []
        while vi < len(vmas) and vmas[vi].end <= start:
            vi += 1
        j = vi
        while j < len(vmas) and vmas[j].start < end:
            n = (min(end, vmas[j].end) - max(start, vmas[j].start)) // page_size
            if n > 0:
                if pe.flags & img.PE_PRESENT:
                    counts[j][0] += n
                if pe.flags & img.PE_LAZY and not pe.flags & img.PE_PRESENT:
                    counts[j][1] += n
                if in_parent:
                    counts[j][2] += n
                for lo, hi, depth, _ in pieces:
                    k = (min(hi, vmas[j].end) - max(lo, vmas[j].start)) // page_size
                    if k > 0:
                        counts[j][3][depth] = counts[j][3].get(depth, 0) + k
            j += 1
    return counts


def _where_in_chain(ck: Checkpoint, depths: dict) -> str:
    return ", ".join(f"{n} in {ck.dir_name(d)}" for d, n in sorted(depths.items()))


def explore_mems(ck: Checkpoint) -> list[str]:
    lines = []
    for t in ck.tasks():
        mm = ck.mm(t.pid)
        vmas = sorted(mm.vmas, key=lambda v: v.start)
        _, entries = ck.pagemap(t.pid)
        counts = pages_per_vma(vmas, sorted(entries, key=lambda e: e.vaddr), chain=ck.chain(t.pid))
        lines.append(f"{t.pid}")
        lines.append(f"\t{'exe':<33} {ck.reg_path(mm.exe_file_id)}")
        lines.append(f"\t{'start-end':<33} {'prot':<4} {'flags':<24} {'dumped/pages':>14}  backing")
        for vma, (present, lazy, parent, depths) in zip(vmas, counts):
            prot = "".join(c if vma.prot & bit else "-" for c, bit in (("r", 1), ("w", 2), ("x", 4)))
            total = (vma.end - vma.start) // PAGE_SIZE
            where = f" ({_where_in_chain(ck, depths)})" if depths else ""
            extra = "".join([f" lazy {lazy}" if lazy else "", f" parent {parent}{where}" if parent else ""])
            mark = "" if vma.status & VMA_AREA_REGULAR else " *"
            stack = vma.start <= mm.mm_start_stack < vma.end
            lines.append(f"\t{vma.start:016x}-{vma.end:016x} {prot:<4} {_flags_text(vma):<24}"
                         f" {f'{present}/{total}':>14}  {vma_backing(ck, vma, stack)}{mark}{extra}")
    return lines


def explore_rss(ck: Checkpoint) -> list[str]:
    lines = []
    for t in ck.tasks():
        mm = ck.mm(t.pid)
        vmas = sorted(mm.vmas, key=lambda v: v.start)
        head, entries = ck.pagemap(t.pid)
        entries = sorted(entries, key=lambda e: e.vaddr)
        present = sum(img.pagemap_nr_pages(e) for e in entries if e.flags & img.PE_PRESENT)
        lazy = sum(img.pagemap_nr_pages(e) for e in entries
                   if e.flags & img.PE_LAZY and not e.flags & img.PE_PRESENT)
        parent = sum(img.pagemap_nr_pages(e) for e in entries
                     if (e.flags & img.PE_PARENT or e.in_parent) and not e.flags & img.PE_PRESENT)
        total = sum(img.pagemap_nr_pages(e) for e in entries)
        depths = {}
        if parent:
            chain = ck.chain(t.pid)
            for e in entries:
                if e.flags & img.PE_PARENT or e.in_parent:
                    end = e.vaddr + img.pagemap_nr_pages(e) * PAGE_SIZE
                    for lo, hi, depth, _ in chain.resolve(e.vaddr, end):
                        depths[depth] = depths.get(depth, 0) + (hi - lo) // PAGE_SIZE
        where = f" ({_where_in_chain(ck, depths)})" if depths else ""
        lines.append(f"{t.pid}: {total} resident pages ({total * PAGE_SIZE // 1024} KiB):"
                     f" {present} in pages-{head.pages_id}.img, {lazy} lazy, {parent} in parent{where}")
        vi = 0
        for pe in entries:
            n = img.pagemap_nr_pages(pe)
            end = pe.vaddr + n * PAGE_SIZE
            while vi < len(vmas) and vmas[vi].end <= pe.vaddr:
                vi += 1
            where = []
            j = vi
            while j < len(vmas) and vmas[j].start < end:
                where.append(f"{vmas[j].start:x} {vma_backing(ck, vmas[j], vmas[j].start <= mm.mm_start_stack < vmas[j].end)}")
                j += 1
            flags = " | ".join(nm for nm, bit in (("PE_PARENT", img.PE_PARENT), ("PE_LAZY", img.PE_LAZY),
                                                  ("PE_PRESENT", img.PE_PRESENT)) if pe.flags & bit)
            lines.append(f"\t{pe.vaddr:016x} / {n:<8d} {flags:<22} in {'; '.join(where) or '?'}")
    return lines


EXPLORERS = {"ps": explore_ps, "fds": explore_fds, "mems": explore_mems, "rss": explore_rss}
