# Unix and inet sockets through the real CLI (issue 12): a parent and child with every
# kind of unix channel full of unread data both ways; unix sockets of every shape
# (bound, abstract, relative and deleted names, a connection waiting to be accepted,
# shutdown states, a peer that closed, options); TCP and UDP over IPv4 and IPv6 with
# options and an established connection inside the tree; and the refusals: file
# descriptors in flight, peers outside the tree, established TCP without
# --tcp-established, other socket families. A failed dump leaves the tree running and
# untraced, with no network lock left behind.
import os
import signal
import socket
import stat
import subprocess

import pytest

from conftest import Task, assert_one_line_error, assert_running_untraced, wait_for
from servers import need_nftables, no_lock_left, our_locks

assert no_lock_left            # an autouse fixture: every test here cleans up its locks


def assert_debian_crit_reads(images) -> None:
    """Every CRIU image of the dump (criu-py's own two excepted) decodes with Debian's crit."""
    import json
    import subprocess
    if not os.access("/usr/bin/crit", os.X_OK):
        return
    for p in sorted(images.iterdir()):
        if not p.name.endswith(".img") or p.name.startswith(("criu-py-", "pages-")):
            continue
        res = subprocess.run(["/usr/bin/crit", "decode", "-i", str(p)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, f"crit cannot decode {p.name}: {res.stderr[-300:]}"
        assert json.loads(res.stdout)["entries"] is not None


def queued(log, pid: int) -> dict:
    return {m.group(1): int(m.group(2)) for m in log.matches(rf"queued {pid} (\w+) (\d+)")}


# ---------------------------------------------------------------- unix
def test_pair_with_data_queued_both_ways(h):
    """The issue's C pair: a socketpair (stream, seqpacket, datagram) and a unix stream
    connection between parent and child, every buffer full both ways at dump time:
    after restore every byte and message arrives, in order, with its boundaries."""
    task = h.start("sockpair", h.path("pair.sock"), h.path("go"), ready=r"ready \d+ \d+")
    images = h.dump(task)
    assert not task.running() or h.no_cr
    h.restore(images, task=task)
    check_pair(h, task)


def check_pair(h, task):
    """After restore: every channel of sockpair.c delivers what the other side queued."""
    child = int(task.log.matches(r"ready \d+ (\d+)")[0].group(1))
    sent = {p: queued(task.log, p) for p in (task.pid, child)}
    assert all(n > 100 for q in sent.values() for n in q.values()), sent
    assert int(open(f"/proc/{child}/stat").read().split()[3]) == task.pid
    h.path("go").write_text("")
    for me, peer in ((task.pid, child), (child, task.pid)):
        task.log.wait(rf"done {me}", timeout=30)
        assert not task.log.matches(rf"bad {me} .*"), task.log.matches(rf"bad {me} .*")[0].group(0)
        got = {m.group(1): int(m.group(2)) for m in task.log.matches(rf"ok {me} (\w+) (\d+)")}
        want = {ch: (n + 3) // 4 if ch in ("stream", "unix") else n for ch, n in sent[peer].items()}
        assert got == want, (me, got, want)
    assert len(task.log.matches(r"ready .*")) == 1, "the pair started over"
    n = len(task.log.matches(rf"beat {child} .*"))
    task.log.wait(rf"beat {child} .*", count=n + 2)


def test_unix_socket_shapes(h):
    sockdir = h.path("socks")
    sockdir.mkdir()
    task = h.start("unixsk", sockdir, h.path("go"))
    assert not (sockdir / "gone.sock").exists()
    images = h.dump(task)
    if not h.no_cr:
        assert (images / "sk-queues.img").exists()
        assert_debian_crit_reads(images)
    h.restore(images, task=task)
    check_unix_shapes(h, task)


def check_unix_shapes(h, task):
    """After restore: the bound files are there (the deleted one is not) and every check
    of unixsk.c passes, one of them needing a datagram from outside to DIR/rel.sock."""
    sockdir = h.path("socks")
    mode = os.stat(sockdir / "dgram.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o640
    assert not (sockdir / "gone.sock").exists(), "the deleted path came back"
    h.path("go").write_text("")
    # only a socket bound at DIR/rel.sock receives this
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        wait_for(lambda: _try_send(s, str(sockdir / "rel.sock"), b"from-outside"), timeout=10,
                 what="rel.sock to take a datagram")
    finally:
        s.close()
    m = task.log.wait(rf"done {task.pid} .*", timeout=20)
    bad = task.log.matches(rf"check {task.pid} \S+ bad .*")
    assert not bad, [b.group(0) for b in bad]
    assert m.group(0).endswith("all-ok")
    assert len(task.log.matches(rf"check {task.pid} \S+ ok")) == 9


def _try_send(s, path, data) -> bool:
    try:
        s.sendto(data, path)
        return True
    except OSError:
        return False


@pytest.mark.needs_tool
def test_fds_in_flight_are_refused(h):
    task = h.start("sockmisc", "scm", "-", python=True)
    fd = task.log.matches(r"ready \d+ (\d+)")[0].group(1)
    images = h.images_dir()
    res = h.cli("dump", "-t", task.pid, "-D", images)
    assert_one_line_error(res, f"pid {task.pid} fd {fd}", "SCM_RIGHTS")
    assert_running_untraced(task)
    assert not [p for p in images.iterdir() if p.name.endswith(".img")]


@pytest.mark.needs_tool
def test_peer_outside_the_tree(h):
    """A datagram socket connected to a named socket outside the tree: refused, unless
    --ext-unix-sk (then restored connected to that name, and the restore needs the
    option too). A stream connection to outside (a service's stdout to a log collector):
    refused, unless --ext-unix-sk; then only the caller can give a connection back, with
    --inherit-fd fd[N]:socket:[INODE] (without, the restore fails in one line), and the
    restored task echoes what arrives on the connection it was given."""
    path = str(h.path("outside.sock"))
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    outside.bind(path)
    outside.settimeout(10)
    try:
        task = h.start("sockmisc", "ext-dgram", path, python=True)
        fd = task.log.matches(r"ready \d+ (\d+)")[0].group(1)
        res = h.cli("dump", "-t", task.pid, "-D", h.images_dir("refused"))
        assert_one_line_error(res, f"pid {task.pid} fd {fd}", "outside the tree", "--ext-unix-sk")
        assert_running_untraced(task)
        task.signal(signal.SIGUSR1)
        assert outside.recv(100) == f"ping {task.pid} 1".encode()
        images = h.dump(task, None, "--ext-unix-sk")
        res = h.cli("restore", "-D", images, "-d")
        assert_one_line_error(res, "--ext-unix-sk")
        assert not os.path.exists(f"/proc/{task.pid}")
        restored = h.restore(images, "--ext-unix-sk", task=task)
        restored.signal(signal.SIGUSR1)
        assert outside.recv(100) == f"ping {task.pid} 2".encode()
    finally:
        outside.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    spath = str(h.path("listener.sock"))
    listener.bind(spath)
    listener.listen(1)
    try:
        task = h.start("sockmisc", "ext-stream", spath, python=True)
        fd = int(task.log.matches(r"ready \d+ (\d+)")[0].group(1))
        ino = os.stat(f"/proc/{task.pid}/fd/{fd}").st_ino
        conn, _ = listener.accept()
        conn.settimeout(10)
        res = h.cli("dump", "-t", task.pid, "-D", h.images_dir("stream"))
        assert_one_line_error(res, f"pid {task.pid} fd {fd}", "outside the tree", "--ext-unix-sk")
        assert_running_untraced(task)
        conn.sendall(b"before")
        assert conn.recv(100) == b"before"
        images = h.dump(task, h.images_dir("stream"), "--ext-unix-sk")
        conn.close()
        res = h.cli("restore", "-D", images, "-d")
        assert_one_line_error(res, "--inherit-fd", f"socket:[{ino}]")
        assert not os.path.exists(f"/proc/{task.pid}")
        given = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        given.connect(spath)
        conn2, _ = listener.accept()
        conn2.settimeout(10)
        restored = Task(task.pid, task.marker, task.log)
        h.tasks.append(restored)
        res = subprocess.run(h.cli_argv("restore", "-D", images, "-d", "--inherit-fd",
                                        f"fd[{given.fileno()}]:socket:[{ino}]"),
                             capture_output=True, text=True, timeout=60, cwd=h.dir,
                             stdin=subprocess.DEVNULL, pass_fds=(given.fileno(),))
        given.close()
        assert res.returncode == 0, res.stderr
        conn2.sendall(b"after")
        assert conn2.recv(100) == b"after"
        assert restored.running()
        conn2.close()
    finally:
        listener.close()


@pytest.mark.needs_tool
def test_other_socket_families_are_refused(h):
    task = h.start("unsupported", "socket")
    fd = task.log.matches(r"ready \d+ (\d+)")[0].group(1)
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir())
    assert_one_line_error(res, f"pid {task.pid} fd {fd}", "packet", "socket", "not supported")
    assert_running_untraced(task)


# ---------------------------------------------------------------- inet
def check_inet(h, task):
    """After restore: the listeners answer the test, the UDP socket too, and every check
    of inetsk.c passes."""
    m = task.log.matches(r"ready \d+ (\d+) (\d+) (\d+) .*")[0]
    p4, p6, pu = int(m.group(1)), int(m.group(2)), int(m.group(3))
    h.path("go").write_text("")
    for family, host, port in ((socket.AF_INET, "127.0.0.1", p4), (socket.AF_INET6, "::1", p6)):
        with socket.create_connection((host, port), timeout=20) as c:
            c.sendall(b"hi")
            assert c.recv(10) == b"hi back"
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(20)
    try:
        u.sendto(b"udp-hello", ("127.0.0.1", pu))
        data, addr = u.recvfrom(100)
        assert (data, addr) == (b"udp-back", ("127.0.0.1", pu))
    finally:
        u.close()
    done = task.log.wait(rf"done {task.pid} .*", timeout=30)
    bad = task.log.matches(rf"check {task.pid} \S+ bad .*")
    assert not bad, [b.group(0) for b in bad]
    assert done.group(0).endswith("all-ok")


def test_tcp_udp_ipv4_ipv6_and_established_connection(h):
    """Listeners (backlog, IPv6-only), UDP bound and connected, options, a bound TCP
    socket, and a connection inside the tree whose buffers were full both ways (data
    received and not read, sent and not acknowledged, never sent): all back, the
    connection carrying every byte in order, with --tcp-established."""
    need_nftables()
    task = h.start("inetsk", h.path("go"))
    images = h.dump(task, None, "--tcp-established")
    if not h.no_cr:
        assert len([p for p in images.iterdir() if p.name.startswith("tcp-stream-")]) == 2
        assert_debian_crit_reads(images)
    h.restore(images, "--tcp-established", task=task)
    assert not our_locks(h), "the network lock was left behind"
    check_inet(h, task)


@pytest.mark.needs_tool
def test_established_tcp_needs_the_option(h):
    task = h.start("inetsk", h.path("go"))
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir())
    line = assert_one_line_error(res, f"pid {task.pid}", "ESTABLISHED", "--tcp-established")
    assert "127.0.0.1" in line
    assert_running_untraced(task)


@pytest.mark.needs_tool
def test_restore_needs_tcp_established_and_leaves_nothing(h):
    need_nftables()
    task = h.start("inetsk", h.path("go"))
    images = h.dump(task, None, "--tcp-established")
    res = h.cli("restore", "-D", images, "-d")
    assert_one_line_error(res, "--tcp-established")
    assert not os.path.exists(f"/proc/{task.pid}")
    assert any("CRIU-" in line for line in our_locks(h)), \
        "the lock must stay until a restore succeeds"
    h.restore(images, "--tcp-established", task=task)
    assert not our_locks(h)


@pytest.mark.needs_tool
def test_failed_dump_lifts_the_lock(h):
    """The connection is locked and in repair mode when a later fd makes the dump fail:
    the task runs on untraced, the connection works, no lock is left."""
    need_nftables()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        task = h.start("sockmisc", "tcp-scm", server.getsockname()[1], python=True)
        conn, _ = server.accept()
        conn.settimeout(10)
        m = task.log.matches(r"ready \d+ (\d+) (\d+)")[0]
        assert int(m.group(1)) < int(m.group(2))
        res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), "--tcp-established", "-v4",
                    "-o", h.path("dump.log"))
        assert_one_line_error(res, "SCM_RIGHTS")
        assert "network lock (nftables)" in h.path("dump.log").read_text()
        assert_running_untraced(task)
        assert not our_locks(h)
        conn.sendall(b"still there")
        assert conn.recv(100) == b"still there"
        conn.close()
    finally:
        server.close()
