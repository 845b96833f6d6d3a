# End-to-end lazy restore (criu_py/lazy/): `crit make-lazy` images restored with
# `restore --lazy-pages` while `lazy-pages -D` serves the memory the task touches and
# pushes the rest; the workloads check their own memory, so zeros or stale pages where
# data belongs show as BAD. Also: what happens when the daemon dies mid-way.
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import assert_one_line_error, proc_is_running, wait_for

SEED = 0x5EED1234


def ask(task, verdict=r"(OK|BAD) \d+.*", timeout=60):
    before = len(task.log.matches(verdict))
    task.signal(signal.SIGUSR1)
    return task.log.wait(verdict, timeout=timeout, count=before + 1).group(0)


@pytest.fixture(autouse=True)
def no_guard_left():
    yield
    wait_for(lambda: not guards_of(), 10, "the lazy-pages guards to exit")


def start_daemon(h, images, *extra, env=None):
    """`lazy-pages -D images` in the background; returns once its socket listens."""
    args = h.cli_argv("lazy-pages", "-D", images, "-v4", "-o", "lazy.log", *extra)
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=h.dir, start_new_session=True,
                         env={**os.environ, **(env or {})})
    h.popens.append(p)
    sock = images / "lazy-pages.socket"
    wait_for(lambda: sock.exists() or p.poll() is not None, 30, "the lazy-pages socket")
    assert p.poll() is None, f"lazy-pages exited early: {p.stderr.read()}"
    return p


def lazy_images(h, task):
    full = h.dump(task, h.images_dir("full"))
    lazy = h.dir / "lazy"
    res = h.cli("crit", "make-lazy", full, lazy)
    assert res.returncode == 0, res.stderr
    return full, lazy


def test_memhog_256mib_make_lazy_restore(h):
    task = h.start("memhog", 256, SEED, ready=r"ready \d+")
    assert ask(task) == f"OK {task.pid}"
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy)
    restored = h.restore(lazy, "--lazy-pages", task=task)
    assert ask(restored) == f"OK {task.pid}"
    assert daemon.wait(60) == 0, daemon.stderr.read()
    assert not (lazy / "lazy-pages.socket").exists()
    assert ask(restored) == f"OK {task.pid}"


def test_fork_munmap_dontneed_mremap_while_pages_arrive(h):
    """The daemon pushes nothing for a while (a test hook): the task's fork, munmap,
    madvise(DONTNEED) and mremap all happen before its pages are in."""
    task = h.start("lazyevents", 64, SEED, ready=r"ready \d+")
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy, env={"CRIU_PY_TEST_LAZY_DELAY": "3"})
    restored = h.restore(lazy, "--lazy-pages", task=task)
    assert ask(restored) == f"OK {task.pid}"
    assert daemon.wait(60) == 0, daemon.stderr.read()
    log = (lazy / "lazy.log").read_text()
    for what in ("forked", "mremap", "remove", "unmap"):
        assert re.search(rf"lazy-pages: .*{what}", log), what


def test_daemon_killed_midway_kills_the_task(h):
    """SIGKILL to the daemon while most pages are missing: its guard SIGKILLs the task
    (and the child it forks) before the uffd closes - with the uffd gone the kernel
    would fill the missing pages with zeros and the task would run on wrong memory."""
    task = h.start("memhog", 64, SEED, ready=r"ready \d+")
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy, env={"CRIU_PY_TEST_LAZY_DELAY": "30"})
    restored = h.restore(lazy, "--lazy-pages", task=task)
    daemon.kill()
    daemon.wait(10)
    assert restored.reap(timeout=10) == -signal.SIGKILL
    assert not restored.log.matches(rf"BAD {task.pid}")
    wait_for(lambda: not guards_of(), 10, "the guard to exit")


def test_damaged_lazy_source_is_never_served(h):
    """One byte of a lazy page flipped in the lazy source after the dump: the daemon
    finds the piece damaged by its digest before it copies any of it, fails naming the
    file, and its guard SIGKILLs the task before the uffd closes: the task never runs on
    the wrong byte (nor on zeros)."""
    task = h.start("memhog", 64, SEED, ready=r"ready \d+")
    full, lazy = lazy_images(h, task)
    pages = max(full.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        where = f.seek(0, os.SEEK_END) * 3 // 4
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x01]))
    # no background fill for 2 s: the restore sees its task running first
    daemon = start_daemon(h, lazy, env={"CRIU_PY_TEST_LAZY_DELAY": "2"})
    restored = h.restore(lazy, "--lazy-pages", task=task)
    assert daemon.wait(60) != 0
    err = daemon.stderr.read()
    assert f"{pages.name}: damaged page run" in err and "not served" in err, err
    assert restored.reap(timeout=10) == -signal.SIGKILL
    assert not restored.log.matches(rf"BAD {task.pid}")


def guards_of():
    """Live lazy-pages guards (comm criu-py-guard) reparented to us, the subreaper;
    the exited ones are reaped here."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
        fields = stat[stat.rindex(b")") + 2:].split()
        if comm != b"criu-py-guard" or int(fields[1]) != os.getpid():
            continue
        if fields[0] == b"Z":
            os.waitpid(int(name), 0)
        else:
            out.append(int(name))
    return out


def test_lazy_restore_errors(h):
    task = h.start("memhog", 16, SEED, ready=r"ready \d+")
    _, lazy = lazy_images(h, task)
    # no --lazy-pages: the lazy pages have no data here
    res = h.cli("restore", "-D", lazy, "-d")
    assert_one_line_error(res, "lazy pages")
    # --lazy-pages without a daemon
    res = h.cli("restore", "-D", lazy, "-d", "--lazy-pages")
    assert_one_line_error(res, "lazy-pages daemon")
    assert not proc_is_running(task.pid)
    # a daemon for images without their lazy source
    os.unlink(lazy / "lazy-source")
    res = h.cli("lazy-pages", "-D", lazy)
    assert_one_line_error(res, "lazy source")


def test_cpython_restored_lazily(h):
    task = h.start("pyworker", 200000, python=True, ready=r"ready \d+ [0-9a-f]{32}")
    digest = task.log.matches(r"ready \d+ ([0-9a-f]{32})")[0].group(1)
    pattern = r"state \d+ [0-9a-f]{32} ticks \d+"
    _, lazy = lazy_images(h, task)
    daemon = start_daemon(h, lazy, env={"CRIU_PY_TEST_LAZY_DELAY": "1"})
    restored = h.restore(lazy, "--lazy-pages", task=task)
    restored.signal(signal.SIGUSR1)
    line = task.log.wait(pattern, count=1).group(0)
    assert line.startswith(f"state {task.pid} {digest} "), line
    assert daemon.wait(60) == 0, daemon.stderr.read()
    assert re.search(r"lazy-pages: pid \d+ done: \d+ KiB on faults \([1-9]\d* faults\)",
                     (lazy / "lazy.log").read_text())


# ------------------------------------------------------------------ page server
def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_with_status(h, *args):
    """criu-py ARGS --status-fd W in the background; returns once it wrote its byte."""
    r, w = os.pipe()
    p = subprocess.Popen(h.cli_argv(*args, "--status-fd", w), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=h.dir,
                         start_new_session=True, pass_fds=[w])
    h.popens.append(p)
    os.close(w)
    try:
        got = os.read(r, 1)
    finally:
        os.close(r)
    assert got == b"\0", f"{args[0]} did not get ready: {p.stderr.read() if p.poll() is not None else ''}"
    return p


def copy_images(src, dst):
    import shutil
    for path in src.iterdir():
        if path.suffix == ".img" or path.name == "stats-dump":
            shutil.copy2(path, dst / path.name)


def dump_to_page_server(h, task):
    """`dump` of task to a `page-server` on 127.0.0.1 (logs at -v4): (src, dst), the
    dump's dir and the server's, once the server's session ended well."""
    src, dst = h.images_dir("src"), h.images_dir("dst")
    port = free_port()
    server = start_with_status(h, "page-server", "-D", dst, "--address", "127.0.0.1",
                               "--port", port, "-o", "ps.log", "-v4")
    h.dump(task, src, "--page-server", "--address", "127.0.0.1", "--port", port)
    assert server.wait(30) == 0, server.stderr.read()
    return src, dst


def test_page_server_dump_then_restore(h):
    task = h.start("memhog", 64, SEED, ready=r"ready \d+")
    src, dst = dump_to_page_server(h, task)
    assert not list(src.glob("pages-*.img")) and list(dst.glob("pages-*.img"))
    assert oct((dst / "pages-1.img").stat().st_mode & 0o777) == "0o600"
    copy_images(src, dst)
    restored = h.restore(dst, task=task)
    assert ask(restored) == f"OK {task.pid}"
    # a damaged page in the server's dir is found by the restore
    restored.kill()
    with open(dst / "pages-1.img", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"\xff" * 8)
    res = h.cli("restore", "-D", dst, "-d")
    assert_one_line_error(res, "pages-1.img")


@pytest.mark.parametrize("workload", ["shmem", "protnone"])
def test_page_server_dump_of_other_memory(h, workload):
    """Memory read otherwise than by process_vm_readv comes back through the page server:
    shared anonymous memory and a memfd (saved from their fds), and a PROT_NONE area
    (read through /proc/PID/mem)."""
    if workload == "shmem":
        task = h.start("shmem", h.path("mapped.data"), 0x5EED1234)
    else:
        task = h.start("protnone", python=True, ready=r"ready \d+")
    assert ask(task) == f"OK {task.pid}"
    src, dst = dump_to_page_server(h, task)
    # every page went to the server: shared memory's pagemaps too, as upstream sends them
    assert not list(src.glob("pages-*.img")) and not list(src.glob("pagemap-*.img"))
    assert list(dst.glob("pages-*.img"))
    if workload == "shmem":
        assert len(list(dst.glob("pagemap-shmem-*.img"))) >= 2    # anonymous and memfd
    copy_images(src, dst)
    restored = h.restore(dst, task=task)
    assert ask(restored) == f"OK {task.pid}"


@pytest.mark.parametrize("catch", [False, True])
def test_page_server_dump_handed_over_by_the_task_or_read(h, catch):
    """The task vmsplices its pages to the dump (a blob that ends with a signal the task
    ignores); a task that catches every such signal has its pages read instead. Either
    way it comes back from the server's dir with its registers and ticks going on."""
    task = h.start("regwatch", *(["catch"] if catch else []), ready=r"ready \d+")
    src, dst = dump_to_page_server(h, task)
    # with vmsplice, the page of the thread's rseq area is read all the same: the kernel
    # writes the CPU there whenever the blob's thread resumes, after the blob summed it
    how = "read with process_vm_readv" if catch else \
        "handed over by the task (vmsplice), but 1 read (rseq areas)"
    assert f"pid {task.pid}: pages {how}" in (src / "dump.log").read_text()
    copy_images(src, dst)
    ticks = len(task.log.matches(r"tick .*"))
    restored = h.restore(dst, task=task)
    restored.log.wait(r"tick \d+ \d+ ok", count=ticks + 3, timeout=10)
    assert not restored.log.matches(r"BAD .*")


def _raw_session(port, chunks, digests=True):
    """A client of our own: one pagemap (pid 4242) with `chunks` [(vaddr, data, CRCs to
    send instead of the right ones, or None)] as PS_IOV_ADD_F; returns the socket after
    the last chunk (PS_IOV_CLOSE not sent)."""
    import socket

    from criu_py import pageserver as P
    from criu_py.images import PE_PRESENT
    from criu_py.native import ffi, lib
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    flags = P.PS_FLAG_DIGEST if digests else 0
    sock.sendall(P.pack(P.encode_cmd(P.PS_IOV_OPEN2, flags), 0, 0,
                        P.encode_pm(P.PS_TYPE_PID, 4242)))
    answer = P.recv_exact(sock, 1)[0]
    assert bool(answer & P.DIGEST_ANSWER) == digests
    for vaddr, data, crcs in chunks:
        sock.sendall(P.pack(P.encode_cmd(P.PS_IOV_ADD_F, PE_PRESENT | flags),
                            len(data) // 4096, vaddr, 0) + data)
        if digests:
            right = ffi.new("uint32_t[]", len(data) // 4096)
            lib.cp_crc_blocks(ffi.from_buffer(data), len(data), right)
            sock.sendall(crcs if crcs is not None else bytes(ffi.buffer(right)))
    return sock


def _sealed_and_actual(dst, name):
    """(the runs' digests the page server sealed, those of the file as it is)."""
    from criu_py.images import ImageDir, integrity
    with ImageDir(dst) as images:
        entries = images.read_entries(integrity.PS_CHECKSUM_IMAGE)
        sealed = [e for e in entries[1:] if e.name == name][0]
        size, whole, runs = integrity.digest(images.dirfd, name,
                                             [(r.offset, r.length) for r in sealed.runs])
    return (sealed.size, sealed.digest, [r.digest for r in sealed.runs]), (size, whole, runs)


def test_page_server_damaged_chunk_in_transit(h):
    """A chunk that does not match the CRCs the dump read is written as it came, and the
    seal, made from the dump's CRCs, gives it away: the restore's check fails on that
    run and no other."""
    from criu_py import pageserver as P
    dst = h.images_dir("dst")
    port = free_port()
    server = start_with_status(h, "page-server", "-D", dst, "--address", "127.0.0.1",
                               "--port", port)
    mib = 1 << 20
    chunks = [(0x10000000 + i * mib, os.urandom(mib), None) for i in range(6)]
    chunks[4] = (chunks[4][0], chunks[4][1], bytes(mib // 4096 * 4))   # zeros: damaged
    sock = _raw_session(port, chunks)
    sock.sendall(P.pack(P.PS_IOV_CLOSE))
    assert int.from_bytes(P.recv_exact(sock, 4), "little") == 0
    sock.close()
    assert server.wait(30) == 0, server.stderr.read()
    (size, whole, runs), (size2, whole2, runs2) = _sealed_and_actual(dst, "pages-1.img")
    assert size == size2 == 6 * mib and whole != whole2
    assert [a == b for a, b in zip(runs, runs2)] == [True] * 4 + [False, True]


def test_page_server_takes_an_upstream_client(h):
    """No digest flag (upstream CRIU's dump) and commands larger than 1 MiB: written as
    sent, sealed from the CRCs computed while writing (the same digests as a re-read)."""
    from criu_py import pageserver as P
    from criu_py.images import ImageDir, integrity
    dst = h.images_dir("dst")
    port = free_port()
    server = start_with_status(h, "page-server", "-D", dst, "--address", "127.0.0.1",
                               "--port", port, "-o", "ps.log", "-v4")
    data = [os.urandom(3 << 20), os.urandom(5 * 4096)]
    sock = _raw_session(port, [(0x20000000, data[0], None), (0x30000000, data[1], None)],
                        digests=False)
    sock.sendall(P.pack(P.PS_IOV_CLOSE))
    assert int.from_bytes(P.recv_exact(sock, 4), "little") == 0
    sock.close()
    assert server.wait(30) == 0, server.stderr.read()
    assert (dst / "pages-1.img").read_bytes() == b"".join(data)
    assert "digest from the block CRCs" in (dst / "ps.log").read_text()
    sealed, actual = _sealed_and_actual(dst, "pages-1.img")
    assert sealed == actual
    runs = sealed[2]
    assert len(runs) == 4                 # 3 pieces of 1 MiB, then 5 pages


def test_page_server_dies_mid_dump(h):
    """The server goes away while the pages flow: the dump fails in one line and the task
    runs on, untouched."""
    task = h.start("memhog", 256, SEED, ready=r"ready \d+")
    port = free_port()
    import socket
    import threading
    lsock = socket.create_server(("127.0.0.1", port))

    def serve():                     # answers OPEN2, takes ~8 MiB, then hangs up
        conn, _ = lsock.accept()
        conn.recv(32, socket.MSG_WAITALL)
        conn.sendall(b"\x80")
        got = 0
        while got < (8 << 20):
            got += len(conn.recv(1 << 20))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), "--page-server",
                    "--address", "127.0.0.1", "--port", port)
    finally:
        t.join(30)
        lsock.close()
    assert_one_line_error(res, "page server")
    assert ask(task) == f"OK {task.pid}"


def test_page_server_unreachable(h):
    task = h.start("memhog", 16, SEED, ready=r"ready \d+")
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), "--page-server",
                "--address", "127.0.0.1", "--port", free_port())
    assert_one_line_error(res, "page server")
    assert ask(task) == f"OK {task.pid}"      # untouched, still running


def test_live_migration_through_the_page_server(h):
    """The README's recipe: dump --lazy-pages on the source keeps the lazy pages and
    serves them; the images (without those pages) go to another dir; there lazy-pages
    --page-server fetches them on demand while restore --lazy-pages runs the task."""
    task = h.start("lazyevents", 64, SEED, ready=r"ready \d+")
    src, dst = h.images_dir("src"), h.images_dir("dst")
    port = free_port()
    dump = start_with_status(h, "dump", "-t", task.pid, "-D", src, "--lazy-pages",
                             "--address", "127.0.0.1", "--port", port, "-o", "dump.log", "-v4")
    task.reap(timeout=10)
    kept = sum(p.stat().st_size for p in src.glob("pages-*.img"))
    assert kept < (4 << 20), f"{kept} bytes of pages in the images: the lazy ones stayed out"
    copy_images(src, dst)
    daemon = start_daemon(h, dst, "--page-server", "--address", "127.0.0.1", "--port", port,
                          env={"CRIU_PY_TEST_LAZY_DELAY": "1"})
    restored = h.restore(dst, "--lazy-pages", task=task)
    assert ask(restored) == f"OK {task.pid}"
    assert daemon.wait(60) == 0, daemon.stderr.read()
    assert dump.wait(30) == 0, dump.stderr.read()
    assert "lazy pages served" in (src / "dump.log").read_text()
