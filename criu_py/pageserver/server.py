# The serving sides of the page-server protocol (pageserver/__init__.py):
#   - `criu-py page-server -D DIR --port N [--address A]`: takes one session of a
#     `dump --page-server` and writes what it receives as pagemap-ID.img /
#     pagemap-shmem-ID.img + pages-N.img into DIR (pages ids from 1, as they are opened;
#     contiguous PS_IOV_ADD_F of the same flags make one pagemap entry), and at the end
#     seals the files it wrote into criu-py-checksums-ps.img
#     (images/integrity.py); then it exits. From a criu-py dump, the data goes from the
#     socket to the pages file through a pipe (splice: it never comes up here) and the
#     CRCs of its blocks, sent after it, seal the file (a page damaged on the way fails
#     the restore's check). From an upstream dump (no CRCs), this thread receives into a
#     ring of buffers and a writer thread (_Writer) computes the CRC of each 4 KiB block
#     of a chunk while it writes it; either way the seal never reads a pages file again;
#   - LazyServer, used by `dump --lazy-pages`: answers the PS_IOV_GET of one
#     `lazy-pages --page-server` from the memory the dump keeps (dump/lazy.py) until the
#     client closes the session.
import os
import time

from criu_py import pageserver as P
from criu_py.commands import notify_status_fd
from criu_py.errors import CriuError
from criu_py.log import log

PAGE = 4096


class SessionError(CriuError):
    pass


class _Xfer:
    """One pagemap being received."""

    def __init__(self, images, kind: int, ident: int, pages_id: int):
        self.images = images
        self.name = (f"pagemap-{ident}.img" if kind == P.PS_TYPE_PID
                     else f"pagemap-shmem-{ident}.img")
        self.pages_id = pages_id
        self.pages_name = f"pages-{pages_id}.img"
        self.fd = images.open_raw(self.pages_name, write=True)
        self.entries = []            # [vaddr, nr_pages, flags]
        self.bytes = 0
        self.crcs = bytearray()      # the CRC of each 4 KiB block written (the writer's)
        self.written = 0

    def add(self, vaddr: int, nr: int, flags: int) -> None:
        last = self.entries[-1] if self.entries else None
        if last and last[2] == flags and last[0] + last[1] * PAGE == vaddr:
            last[1] += nr
        else:
            self.entries.append([vaddr, nr, flags])

    def close(self) -> None:
        from criu_py.images import set_pagemap_nr_pages
        from criu_py.images.pb import pagemap_pb2
        os.close(self.fd)
        head = pagemap_pb2.pagemap_head(pages_id=self.pages_id)
        out = [head]
        for vaddr, nr, flags in self.entries:
            pe = pagemap_pb2.pagemap_entry(vaddr=vaddr, flags=flags)
            set_pagemap_nr_pages(pe, nr)
            out.append(pe)
        self.images.write_entries(self.name, out)
        if hasattr(self.images, "block_crcs") and \
                self.written == len(self.crcs) // P.CRC_SIZE * PAGE:
            from criu_py.native import ffi
            # seal() takes the file's digests from these (no second read of the file)
            self.images.block_crcs[self.pages_name] = (
                self.written, ffi.from_buffer("uint32_t[]", self.crcs))


class _Writer:
    """The thread that writes what an upstream dump sends: for each chunk (a buffer of
    the ring), the CRC of each 4 KiB block (kept for the seal), then write(2) to the
    pages file; the buffer goes back to the ring. The first failure is kept for the
    receiving thread (raise_error) and the chunks after it are dropped."""

    RING = 4

    def __init__(self):
        import queue
        import threading
        from criu_py.native import ffi
        self.cbuf = ffi.new("char[]", self.RING * P.MAX_CHUNK)
        self.addr = int(ffi.cast("uintptr_t", self.cbuf))
        self.view = memoryview(ffi.buffer(self.cbuf))
        self.free, self.todo = queue.SimpleQueue(), queue.SimpleQueue()
        for i in range(self.RING):
            self.free.put(i)
        self.error = None
        self.thread = threading.Thread(target=self._run, name="ps-write", daemon=True)
        self.thread.start()

    def slot(self, i: int) -> tuple[int, memoryview]:
        at = i * P.MAX_CHUNK
        return self.addr + at, self.view[at:at + P.MAX_CHUNK]

    def _run(self) -> None:
        from criu_py.native import ffi, lib
        crcs = ffi.new("uint32_t[]", P.MAX_CHUNK // PAGE)
        while True:
            job = self.todo.get()
            if job is None:
                return
            if isinstance(job, list):            # a barrier: job[0] set when reached
                job[0].set()
                continue
            i, xfer, n = job
            try:
                if self.error is None:
                    addr, view = self.slot(i)
                    lib.cp_crc_blocks(ffi.cast("void *", addr), n, crcs)
                    w = 0
                    while w < n:
                        w += os.write(xfer.fd, view[w:n])
                    xfer.crcs += ffi.buffer(crcs, n // PAGE * P.CRC_SIZE)
                    xfer.written += n
            except BaseException as exc:         # noqa: BLE001 - raised by the receiver
                self.error = exc
            finally:
                self.free.put(i)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def sync(self) -> None:
        """Every chunk handed over is written (or the first failure is raised)."""
        import threading
        done = threading.Event()
        self.todo.put([done])
        while not done.wait(0.5):
            if not self.thread.is_alive():
                break
        self.raise_error()

    def stop(self) -> None:
        self.todo.put(None)
        self.thread.join()


def _pipe() -> tuple[int, int, int]:
    """The pipe data crosses from socket to file: as large as we may make it."""
    import fcntl
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, P.MAX_CHUNK)
    except OSError:
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, size


class Receiver:
    """One session of `page-server`: a criu-py dump's data spliced to the files by this
    thread; an upstream dump's received here and written by a _Writer (serve() stops it
    on its way out)."""

    def __init__(self, images):
        self.images = images
        self.xfer = None
        self.written = []
        self.digests = False
        self.next_pages_id = 1
        self.pages = self.bytes = 0
        self.writer = None           # _Writer, for an upstream dump
        self.pipe = None             # (read end, write end, size), for a criu-py dump

    def _new_pages_id(self) -> int:
        while self.images.exists(f"pages-{self.next_pages_id}.img"):
            self.next_pages_id += 1
        self.next_pages_id += 1
        return self.next_pages_id - 1

    def _finish_xfer(self) -> None:
        if self.xfer is not None:
            if self.writer is not None:
                self.writer.sync()
            self.xfer.close()
            self.written += [self.xfer.name, self.xfer.pages_name]
            log.debug("page-server: %s: %d entries, %d KiB -> %s", self.xfer.name,
                      len(self.xfer.entries), self.xfer.bytes >> 10, self.xfer.pages_name)
            self.xfer = None

    def _has_parent(self, kind: int, ident: int) -> bool:
        name = (f"pagemap-{ident}.img" if kind == P.PS_TYPE_PID else f"pagemap-shmem-{ident}.img")
        return os.path.exists(os.path.join(self.images.dirpath, "parent", name))

    def serve(self, sock) -> None:
        try:
            self._serve(sock)
        finally:
            if self.writer is not None:
                self.writer.stop()
            if self.pipe is not None:
                os.close(self.pipe[0])
                os.close(self.pipe[1])

    def _serve(self, sock) -> None:
        while True:
            try:
                head = P.recv_exact(sock, P.HEADER.size)
            except EOFError:
                raise SessionError("the dump hung up before closing the session") from None
            value, nr, vaddr, dst_id = P.HEADER.unpack(head)
            cmd, flags = P.decode_cmd(value)
            if cmd in (P.PS_IOV_OPEN, P.PS_IOV_OPEN2):
                self._finish_xfer()
                kind, ident = P.decode_pm(dst_id)
                if not kind:
                    raise SessionError(f"unknown pagemap type in {dst_id:#x}")
                self.xfer = _Xfer(self.images, kind, ident, self._new_pages_id())
                if cmd == P.PS_IOV_OPEN2:
                    self.digests = bool(flags & P.PS_FLAG_DIGEST)
                    answer = int(self._has_parent(kind, ident))
                    if self.digests:
                        answer |= P.DIGEST_ANSWER
                    sock.sendall(bytes([answer]))
            elif cmd in (P.PS_IOV_ADD_F, P.PS_IOV_ADD, P.PS_IOV_HOLE):
                from criu_py.images import PE_PARENT, PE_PRESENT
                if self.xfer is None:
                    raise SessionError("pages sent before any PS_IOV_OPEN")
                pe_flags = flags & ~P.PS_FLAG_DIGEST if cmd == P.PS_IOV_ADD_F else \
                    PE_PRESENT if cmd == P.PS_IOV_ADD else PE_PARENT
                self.xfer.add(vaddr, nr, pe_flags)
                if pe_flags & PE_PRESENT:
                    self._receive(sock, nr * PAGE, vaddr)
            elif cmd == P.PS_IOV_PARENT:
                kind, ident = P.decode_pm(dst_id)
                sock.sendall(int(self._has_parent(kind, ident)).to_bytes(4, "little"))
            elif cmd in (P.PS_IOV_CLOSE, P.PS_IOV_FORCE_CLOSE):
                self._finish_xfer()
                self.seal()
                sock.sendall((0).to_bytes(4, "little"))
                return
            else:
                raise SessionError(f"unknown command {value:#x}")

    def _receive(self, sock, length: int, vaddr: int) -> None:
        if self.digests:
            self._splice(sock, length, vaddr)
        else:
            self._receive_upstream(sock, length)
        self.xfer.bytes += length
        self.bytes += length

    def _splice(self, sock, length: int, vaddr: int) -> None:
        """length bytes of data from socket to pages file (csrc/pagexfer.c), then the
        CRC of each of its blocks."""
        import errno
        from criu_py.native import lib
        if length > P.MAX_CHUNK:
            raise SessionError(f"{length} bytes at {vaddr:#x} in one command (at most "
                               f"{P.MAX_CHUNK} with CRCs)")
        if self.pipe is None:
            self.pipe = _pipe()
        r, w, size = self.pipe
        got = lib.cp_ps_recv_to_file(sock.fileno(), r, w, self.xfer.fd, length, size)
        if got == -errno.ECONNRESET:
            raise EOFError("the connection was closed")
        if got < 0:
            raise OSError(-got, os.strerror(-got))
        self.xfer.crcs += P.recv_exact(sock, length // PAGE * P.CRC_SIZE)
        self.xfer.written += length

    def _receive_upstream(self, sock, length: int) -> None:
        """length bytes of data into buffers of the writer's ring, one recv (MSG_WAITALL)
        per chunk, handed to the writer."""
        import socket
        if self.writer is None:
            self.writer = _Writer()
        done = 0
        while done < length:
            n = min(P.MAX_CHUNK, length - done)
            i = self.writer.free.get()
            self.writer.raise_error()
            _, view = self.writer.slot(i)
            try:
                got = sock.recv_into(view, n, socket.MSG_WAITALL)
                if got < n:
                    P.recv_into_exact(sock, view[got:n])
            except BaseException:
                self.writer.free.put(i)
                raise
            self.writer.todo.put((i, self.xfer, n))
            done += n

    def seal(self) -> None:
        from criu_py.images import integrity
        if self.written:
            integrity.seal(self.images, names=self.written, image=integrity.PS_CHECKSUM_IMAGE)


def page_server(opts: dict) -> int:
    """The page-server command: one session, then exit."""
    from criu_py.images import ImageDir
    port = opts.get("port")
    if port is None:
        raise CriuError("page-server needs --port")
    images = ImageDir(opts.get("images_dir") or ".", create=True)
    # what a session needs, loaded before the dump can connect: done after its last
    # byte, these imports (~30 ms, protobuf's runtime) kept the dump waiting
    from criu_py.images import integrity  # noqa: F401
    from criu_py.images.pb import integrity_pb2, pagemap_pb2  # noqa: F401
    from criu_py.native import lib  # noqa: F401
    try:
        lsock = P.listen(opts.get("address"), port)
        try:
            log.info("page-server: listening on %s:%d for %s", opts.get("address") or
                     P.DEFAULT_ADDRESS, port, images.dirpath)
            notify_status_fd(opts)
            conn, peer = lsock.accept()
        finally:
            lsock.close()
        t0 = time.monotonic()
        rx = Receiver(images)
        try:
            conn.setsockopt(6, 1, 1)          # TCP_NODELAY: the answers go out at once
            rx.serve(conn)
            conn.settimeout(10)
            try:
                conn.recv(1)                  # the dump closes first (no TIME_WAIT here)
            except OSError:
                pass
        except (EOFError, OSError) as exc:
            raise SessionError(f"page server session with {peer[0]}: {exc}") from None
        finally:
            conn.close()
        dt = time.monotonic() - t0
        log.info("page-server: %d MiB received from %s in %.1f ms (%.2f GB/s), %d files",
                 rx.bytes >> 20, peer[0], dt * 1e3, rx.bytes / dt / 1e9 if dt else 0,
                 len(rx.written))
    finally:
        images.close()
    return 0


class LazyServer:
    """dump --lazy-pages: answer PS_IOV_GET from `memory` (dump/lazy.py's KeptMemory:
    .read(pid, vaddr, length) -> (address, length available)) until the client closes."""

    def __init__(self, lsock, memory):
        self.lsock = lsock
        self.memory = memory
        self.bytes = self.requests = 0

    def serve(self, check=lambda: None) -> None:
        import select
        while True:
            check()
            if select.select([self.lsock], [], [], 0.5)[0]:
                break
        conn, peer = self.lsock.accept()
        log.info("dump: lazy pages asked for by %s", peer[0])
        conn.setsockopt(6, 1, 1)
        try:
            self._session(conn, check)
        finally:
            conn.close()

    def _session(self, conn, check) -> None:
        import select
        while True:
            while not select.select([conn], [], [], 0.5)[0]:
                check()
            try:
                head = P.recv_exact(conn, P.HEADER.size)
            except EOFError:
                raise SessionError("the lazy-pages daemon hung up before it had every "
                                   "page") from None
            value, nr, vaddr, dst_id = P.HEADER.unpack(head)
            cmd, flags = P.decode_cmd(value)
            if cmd == P.PS_IOV_GET:
                self._get(conn, dst_id, vaddr, nr, bool(flags & P.PS_FLAG_DIGEST))
            elif cmd in (P.PS_IOV_CLOSE, P.PS_IOV_FORCE_CLOSE):
                conn.sendall((0).to_bytes(4, "little"))
                return
            else:
                raise SessionError(f"unexpected command {value:#x} while serving lazy pages")

    def _get(self, conn, pid: int, vaddr: int, nr: int, digest: bool) -> None:
        from criu_py.images import PE_PRESENT
        from criu_py.native import ffi
        address, length = self.memory.read(pid, vaddr, nr * PAGE)
        if length <= 0:
            raise SessionError(f"pid {pid}: no lazy pages at {vaddr:#x}")
        flags = PE_PRESENT | (P.PS_FLAG_DIGEST if digest else 0)
        conn.sendall(P.pack(P.encode_cmd(P.PS_IOV_ADD_F, flags), length // PAGE, vaddr, pid))
        conn.sendall(ffi.buffer(ffi.cast("char *", address), length))
        if digest:
            conn.sendall(P.DIGEST.pack(P.digest_of(address, length)))
        self.bytes += length
        self.requests += 1
