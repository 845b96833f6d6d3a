# The client sides of the page-server protocol (pageserver/__init__.py):
#   - Sink: `dump --page-server` sends each pagemap (PS_IOV_OPEN2, then PS_IOV_ADD_F per
#     run of at most MAX_CHUNK bytes with its data and, to a criu-py server, the CRCs of
#     its blocks; a process's pages through csrc/pagexfer.c: handed over by the task
#     itself with vmsplice and spliced to the socket, or else read while the last chunk
#     is sent) and closes the session once every page is there (PS_IOV_CLOSE; status 0);
#   - LazyClient: `lazy-pages --page-server` asks the dump's lazy server for pages
#     (PS_IOV_GET) and checks each answer's digest before the daemon copies a byte of it.
import os

from criu_py import pageserver as P
from criu_py.errors import CriuError
from criu_py.log import log

PAGE = 4096


class Sink:
    """A session with a page server that receives a dump's pages."""

    def __init__(self, address: str, port: int):
        from criu_py.native import ffi
        self.where = f"{address}:{port}"
        self.sock = P.connect(address, port)
        self.digests = False
        self.bufs = ffi.new("char[]", 2 * P.MAX_CHUNK)            # csrc/pagexfer.c's two
        self.crcs = ffi.new("uint32_t[]", 2 * P.MAX_CHUNK // PAGE)
        self.addr = int(ffi.cast("uintptr_t", self.bufs))
        self.bytes = 0

    def _fail(self, exc) -> CriuError:
        return CriuError(f"page server {self.where}: {exc}")

    def open(self, kind: int, ident: int) -> None:
        try:
            self.sock.sendall(P.pack(P.encode_cmd(P.PS_IOV_OPEN2, P.PS_FLAG_DIGEST), 0, 0,
                                     P.encode_pm(kind, ident)))
            answer = P.recv_exact(self.sock, 1)[0]
        except (OSError, EOFError) as exc:
            raise self._fail(exc) from None
        self.digests = bool(answer & P.DIGEST_ANSWER)

    def entry(self, vaddr: int, nr_pages: int, flags: int) -> None:
        """A pagemap entry without data (PE_PARENT, PE_LAZY alone)."""
        try:
            self.sock.sendall(P.pack(P.encode_cmd(P.PS_IOV_ADD_F, flags), nr_pages, vaddr, 0))
        except OSError as exc:
            raise self._fail(exc) from None

    def pages(self, vaddr: int, length: int, flags: int, read) -> None:
        """Data pages at vaddr: read(buffer address, offset in the run, n) fills the
        buffer with the next n bytes; sent MAX_CHUNK at a time."""
        from criu_py.native import ffi, lib
        done = 0
        flags |= P.PS_FLAG_DIGEST if self.digests else 0
        try:
            while done < length:
                n = min(P.MAX_CHUNK, length - done)
                read(self.addr, done, n)
                self.sock.sendall(P.pack(P.encode_cmd(P.PS_IOV_ADD_F, flags), n // PAGE,
                                         vaddr + done, 0))
                self.sock.sendall(ffi.buffer(self.bufs, n))
                if self.digests:
                    lib.cp_crc_blocks(self.bufs, n, self.crcs)
                    self.sock.sendall(ffi.buffer(self.crcs, n // PAGE * P.CRC_SIZE))
                done += n
        except OSError as exc:
            raise self._fail(exc) from None
        self.bytes += length

    def process_pages(self, pid: int, entries: list, task=None) -> int:
        """A process's pagemap entries [(start, end, PE_* flags)] in address order, the
        data of those with PE_PRESENT from pid's memory (csrc/pagexfer.c); returns the
        data bytes sent. With task (its Tracee, saved registers and pidfd: stopped and
        seized; and the addresses of its threads' rseq areas), the task vmsplices its
        pages to us (dump/parasite.py) and they go on to the socket without a copy; else
        they are read with process_vm_readv. The pages of the rseq areas are read, not
        vmspliced: the kernel writes there (the CPU) whenever the blob's thread resumes,
        so a vmspliced page could leave with other bytes than the task summed."""
        from criu_py.errors import check_errno
        from criu_py.images import PE_PRESENT
        from criu_py.native import lib
        flags = P.PS_FLAG_DIGEST if self.digests else 0
        sent = None
        present = []
        if task is not None:
            kernel_written = {a & ~(PAGE - 1) for a in task[3]}
            split = _copied_apart(entries, kernel_written)
            present = [(s, e) for s, e, f in split if f & PE_PRESENT and not f & CP_PS_COPY]
        if task is not None and present:
            from criu_py.dump import parasite
            arr, nents = _entry_array(split), len(split)

            def reader(pipe_r, crcs_remote, stop):
                return lib.cp_ps_splice_pages(pid, self.sock.fileno(), pipe_r, arr,
                                              nents, PE_PRESENT, flags,
                                              crcs_remote if self.digests else 0,
                                              self.crcs, P.MAX_CHUNK, self.bufs,
                                              P.MAX_CHUNK, stop)
            tracee, saved_regs, pidfd, _ = task
            sent = parasite.vmsplice_pages(tracee, saved_regs, pidfd, present, reader)
            if sent is not None:
                log.debug("pid %d: pages handed over by the task (vmsplice), but %d read "
                          "(rseq areas)", pid, sum(1 for *_, f in split if f & CP_PS_COPY))
        if sent is None:
            log.debug("pid %d: pages read with process_vm_readv", pid)
            sent = lib.cp_ps_send_pages(pid, self.sock.fileno(), _entry_array(entries),
                                        len(entries), PE_PRESENT, flags, int(self.digests),
                                        self.bufs, P.MAX_CHUNK, self.crcs)
        if sent < 0:
            import errno
            if -sent in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETIMEDOUT):
                raise self._fail(os.strerror(-sent))
            check_errno(sent, "process_vm_readv", pid)
        self.bytes += sent
        return sent

    def close(self) -> None:
        """PS_IOV_CLOSE: the server has written everything (status 0), or CriuError."""
        try:
            self.sock.sendall(P.pack(P.PS_IOV_CLOSE))
            self.sock.settimeout(60)
            status = int.from_bytes(P.recv_exact(self.sock, 4), "little", signed=True)
        except (OSError, EOFError) as exc:
            raise self._fail(f"no answer to the end of the session ({exc})") from None
        finally:
            self.sock.close()
        if status:
            raise self._fail(f"the session ended with status {status}")

    def abort(self) -> None:
        self.sock.close()


CP_PS_COPY = 1 << 32             # csrc/pagexfer.h: an entry read, not vmspliced


def _entry_array(entries: list):
    """[(start, end, flags)] as the struct cp_ps_entry array csrc/pagexfer.c takes."""
    from criu_py.native import ffi
    arr = ffi.new("struct cp_ps_entry[]", len(entries))
    for i, (start, end, flags) in enumerate(entries):
        arr[i].start, arr[i].end, arr[i].flags = start, end, flags
    return arr


def _copied_apart(entries: list, pages: set) -> list:
    """entries with each present page of `pages` split off into an entry of its own,
    flagged CP_PS_COPY."""
    from criu_py.images import PE_PRESENT
    out = []
    for start, end, f in entries:
        cuts = sorted(p for p in pages if start <= p < end) if f & PE_PRESENT else []
        for p in cuts:
            if p > start:
                out.append((start, p, f))
            out.append((p, p + PAGE, f | CP_PS_COPY))
            start = p + PAGE
        if start < end:
            out.append((start, end, f))
    return out


def send_process_pages(sink: Sink, pid: int, pid_for_name: int, pages, flags: list,
                       unreadable: list, task=None) -> int:
    """A process's pagemap and data pages (mem/dump.py's PagePlan and flags) to the page
    server (Sink.process_pages; with /proc/PID/mem when a run is inside `unreadable`)."""
    from criu_py.errors import check_errno
    from criu_py.images import PE_PRESENT
    from criu_py.native import lib
    sink.open(P.PS_TYPE_PID, pid_for_name)
    entries = [(start, end, f) for (start, end, _, _), f in zip(pages.flat(), flags)]
    if not any(f & PE_PRESENT and any(s <= start < e for s, e in unreadable)
               for start, end, f in entries):
        return sink.process_pages(pid, entries, task)
    mem_fd = -1
    total = 0
    try:
        for start, end, f in entries:
            if not f & PE_PRESENT:
                sink.entry(start, (end - start) // PAGE, f)
                continue
            if any(s <= start < e for s, e in unreadable):
                if mem_fd < 0:
                    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

                def read(addr, off, n, fd=mem_fd, base=start):
                    _pread_into(fd, addr, n, base + off, f"memory of pid {pid}")
            else:
                def read(addr, off, n, base=start):
                    from criu_py.native import ffi
                    got = lib.cp_vm_read(pid, ffi.cast("void *", addr), base + off, n)
                    if got != n:
                        check_errno(got if got < 0 else -5, "process_vm_readv", pid)
            sink.pages(start, end - start, f, read)
            total += end - start
    finally:
        if mem_fd >= 0:
            os.close(mem_fd)
    return total


def send_shmem_pages(sink: Sink, shmid: int, fd: int, ranges: list) -> int:
    """A shared memory object's pagemap and data pages to the page server: ranges
    [(start, end)] of offsets in it (mem/shmem.py's data_ranges), read from fd (past
    its end, a last page reads as zeros). Returns the data bytes sent."""
    from criu_py.images import PE_PRESENT
    sink.open(P.PS_TYPE_SHMEM, shmid)
    for start, end in ranges:
        def read(addr, off, n, base=start):
            _pread_into(fd, addr, n, base + off, f"shared memory {shmid}", eof_zeros=True)
        sink.pages(start, end - start, PE_PRESENT, read)
    return sum(end - start for start, end in ranges)


def _pread_into(fd: int, addr: int, n: int, offset: int, what: str,
                eof_zeros: bool = False) -> None:
    """n bytes at offset of fd (what: its name in an error) into memory at addr;
    eof_zeros: zeros past its end."""
    from criu_py.native import ffi
    view = memoryview(ffi.buffer(ffi.cast("char *", addr), n))
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0 and eof_zeros:
            view[done:] = bytes(n - done)
            return
        if got <= 0:
            raise CriuError(f"cannot read {what} at {offset + done:#x}")
        done += got


class LazyClient:
    """lazy-pages --page-server: pages fetched from the dump's lazy server."""

    def __init__(self, address: str, port: int):
        from criu_py.native import ffi
        self.where = f"{address}:{port}"
        self.sock = P.connect(address, port, timeout=30)
        self.size = 4 << 20
        self.buf = ffi.new("char[]", self.size)
        self.addr = int(ffi.cast("uintptr_t", self.buf))
        self.unchecked = False

    def fetch(self, pid: int, vaddr: int, length: int) -> int:
        """The address of a buffer holding [vaddr, vaddr + length) of pid's memory as
        the dump kept it (checked against its digest when the server sends one)."""
        from criu_py.native import ffi
        if length > self.size:
            self.size = length
            self.buf = ffi.new("char[]", length)
            self.addr = int(ffi.cast("uintptr_t", self.buf))
        view = memoryview(ffi.buffer(self.buf, length))
        done = 0
        try:
            while done < length:
                self.sock.sendall(P.pack(P.encode_cmd(P.PS_IOV_GET, P.PS_FLAG_DIGEST),
                                         (length - done) // PAGE, vaddr + done, pid))
                value, nr, at, _ = P.HEADER.unpack(P.recv_exact(self.sock, P.HEADER.size))
                cmd, flags = P.decode_cmd(value)
                n = nr * PAGE
                if cmd != P.PS_IOV_ADD_F or at != vaddr + done or not 0 < n <= length - done:
                    raise CriuError(f"unexpected answer {value:#x} ({nr} pages at {at:#x}) "
                                    f"to a request for {vaddr + done:#x}")
                P.recv_into_exact(self.sock, view[done:done + n])
                if flags & P.PS_FLAG_DIGEST:
                    want, = P.DIGEST.unpack(P.recv_exact(self.sock, P.DIGEST.size))
                    if P.digest_of(self.addr + done, n) != want:
                        raise CriuError(f"pages of pid {pid} at {at:#x} arrived damaged "
                                        f"(digest mismatch)")
                elif not self.unchecked:
                    self.unchecked = True
                    log.warning("lazy-pages: the page server at %s sends no digests: its "
                                "pages are not checked", self.where)
                done += n
        except (OSError, EOFError) as exc:
            raise CriuError(f"page server {self.where}: {exc}") from None
        return self.addr

    def close(self, ok: bool = True) -> None:
        """The end of the session: the dump may let its memory go now."""
        if self.sock is None:
            return
        try:
            if ok:
                self.sock.sendall(P.pack(P.PS_IOV_CLOSE))
                self.sock.settimeout(30)
                P.recv_exact(self.sock, 4)
        except (OSError, EOFError):
            pass
        finally:
            self.sock.close()
            self.sock = None
