# `dump --lazy-pages` (the source side of lazy migration): the pages of lazy-eligible
# VMAs (lazy/ranges.py's rule) are left out of the images - their pagemap entries say
# PE_LAZY without PE_PRESENT - and kept by the dump instead, which then serves them to
# one `lazy-pages --page-server` over the page-server protocol (PS_IOV_GET) until that
# daemon closes the session, and only then exits.
#
# Where upstream CRIU leaves the source tree frozen and reads its memory on demand, we
# copy the lazy pages out of the frozen tasks into our own memory (one process_vm_readv
# pass, ~5 GB/s here) and let the tree be killed as usual: its PIDs are free at once, so a
# migration on one machine can restore the same PIDs while the pages are still served,
# and nothing needs a pipe bigger than fs.pipe-max-size (upstream's lazy page server
# needs CAP_SYS_RESOURCE for that, which these machines lack).
import bisect
import mmap
import os

from criu_py.commands import notify_status_fd
from criu_py.errors import DumpError
from criu_py.log import log


class KeptMemory:
    """The lazy pages of every process, back to back in one anonymous mapping."""

    def __init__(self):
        self.ranges = {}            # pid -> sorted [(start, end, offset in buf)]
        self.starts = {}
        self.parts = []             # (pid, [(start, end)]) still to copy
        self.buf = None
        self.base = 0
        self.size = 0

    def add(self, pid: int, ranges: list) -> None:
        if ranges:
            self.parts.append((pid, ranges))

    def copy(self) -> int:
        """Read every kept range out of its (frozen) task; returns the bytes kept."""
        from criu_py.native import ffi, lib
        total = sum(e - s for _, rs in self.parts for s, e in rs)
        self.buf = mmap.mmap(-1, max(total, 4096))
        cbuf = ffi.from_buffer(self.buf)
        self.base = int(ffi.cast("uintptr_t", cbuf))
        at = 0
        for pid, rs in self.parts:
            out = self.ranges.setdefault(pid, [])
            for k in range(0, len(rs), 256):
                part = rs[k:k + 256]
                triples = ffi.new("uint64_t[]", [x for s, e in part for x in (s, e, 0)])
                n = lib.cp_vm_read_triples(pid, cbuf + at, triples, len(part))
                want = sum(e - s for s, e in part)
                if n != want:
                    raise DumpError(f"pid {pid}: reading its lazy pages failed "
                                    f"({os.strerror(-n) if n < 0 else f'{n} of {want} bytes'})")
                for s, e in part:
                    out.append((s, e, at))
                    at += e - s
            self.starts[pid] = [s for s, _, _ in out]
        self.size = at
        self.parts = []
        return at

    def read(self, pid: int, vaddr: int, length: int) -> tuple[int, int]:
        """(address, bytes available from vaddr on, at most length); (0, 0) if none."""
        rs = self.ranges.get(pid)
        if not rs:
            return 0, 0
        i = bisect.bisect_right(self.starts[pid], vaddr) - 1
        if i < 0 or rs[i][1] <= vaddr:
            return 0, 0
        s, e, off = rs[i]
        return self.base + off + (vaddr - s), min(length, e - vaddr)

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()
            self.buf = None


def serve(ctx) -> None:
    """After the images are complete: answer the lazy-pages daemon until it is done."""
    from criu_py.pageserver.server import LazyServer
    kept = ctx.lazy_kept
    _reap_tracees(ctx.tree)
    server = LazyServer(ctx.lazy_listen, kept)
    notify_status_fd(ctx.opts)
    log.info("dump: %d MiB of lazy pages kept, served on port %d until a lazy-pages "
             "daemon has them all", kept.size >> 20, ctx.opts["port"])
    server.serve()
    log.info("dump: lazy pages served: %d MiB in %d requests", server.bytes >> 20,
             server.requests)


def _reap_tracees(tree, timeout: float = 5.0) -> None:
    """The killed tasks stay our tracees until we wait for them: only then does their
    parent (or a subreaper) get to reap them, and their PIDs become free."""
    import time
    left = {tid for p in tree.procs.values() for tid in p.tracees}
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for tid in list(left):
            try:
                pid, _ = os.waitpid(tid, os.WNOHANG | 0x40000000)     # __WALL
            except ChildProcessError:
                left.discard(tid)
                continue
            if pid:
                left.discard(tid)
        if left:
            time.sleep(0.001)
