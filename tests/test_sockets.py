# Unit tests of the socket modules' parts that need no dump: sock_diag parsing on live
# sockets of this process, socket options read and written back between two sockets,
# unix names, the network lock's table name and commands, the TCP repair read of a
# live connection, and the socket images through CRIU's framing and Debian's crit.
import os
import socket
import struct
import subprocess

import pytest

from criu_py.files.sockets import diag, dump_opts, netlock, restore_opts, tcp, unix


def ino(s) -> int:
    return os.fstat(s.fileno()).st_ino


def test_unix_diag_sees_names_peers_queues_and_pending_connections():
    name = f"\0criu-py-unit-{os.getpid()}".encode()
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(name)
    lst.listen(3)
    cli = socket.socket(socket.AF_UNIX)
    cli.connect(name)
    a, b = socket.socketpair()
    a.send(b"12345")
    b.shutdown(socket.SHUT_WR)
    try:
        table = diag.unix_sockets()
        dl, dc, da, db = (table[ino(s)] for s in (lst, cli, a, b))
        assert (dl.state, dl.name, dl.wqlen, dl.icons) == (10, name, 3, (ino(cli),))
        assert dc.peer == 0                       # waiting in the listener: no peer inode yet
        assert (da.peer, db.peer) == (ino(b), ino(a))
        assert db.rqlen == 5 and (da.shutdown, db.shutdown) == (1, 2)
    finally:
        for s in (lst, cli, a, b):
            s.close()


def test_inet_diag_sees_listener_backlog_and_connections():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(7)
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u6.bind(("::1", 0))
    try:
        table = diag.inet_sockets()
        dl, dc, du = table[ino(lst)], table[ino(c)], table[ino(u6)]
        port = lst.getsockname()[1]
        assert (dl.state, dl.sport, dl.wqlen, dl.src[:4]) == (10, port, 7, b"\x7f\0\0\1")
        assert (dc.state, dc.dport, dc.sport) == (1, port, c.getsockname()[1])
        assert (du.family, du.proto, du.sport) == (socket.AF_INET6, socket.IPPROTO_UDP, u6.getsockname()[1])
        assert du.src == socket.inet_pton(socket.AF_INET6, "::1")
    finally:
        for x in (lst, c, s, u6):
            x.close()


def test_diag_attribute_parser():
    body = diag.UNIX_MSG.pack(1, 2, 7, 0, 42, 0, 0)
    name = b"/tmp/x\0"
    attr = lambda kind, data: struct.pack("<HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)
    body += attr(diag.UNIX_DIAG_NAME, name) + attr(diag.UNIX_DIAG_PEER, struct.pack("<I", 43))
    body += attr(diag.UNIX_DIAG_RQLEN, struct.pack("<II", 9, 10)) + attr(diag.UNIX_DIAG_SHUTDOWN, b"\3")
    d = diag.parse_unix(body)
    assert (d.ino, d.type, d.state, d.name, d.peer, d.rqlen, d.wqlen, d.shutdown) == \
        (42, 2, 7, name, 43, 9, 10, 3)


def test_socket_options_survive_a_round_trip():
    from criu_py.images.pb import sk_opts_pb2
    src = socket.socket()
    dst = socket.socket()
    try:
        src.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        src.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50000)
        src.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 3)
        src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("<ii", 1, 9))
        src.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("<qq", 3, 250000))
        src.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x77)
        src.setsockopt(socket.SOL_SOCKET, 26, struct.pack("<H6xQ", 1, _ret_all()[1]))   # SO_ATTACH_FILTER
        e = sk_opts_pb2.sk_opts_entry()
        dump_opts(src, socket.AF_INET, e)
        assert e.so_keepalive and e.so_linger == 9 and e.so_mark == 0x77 and len(e.so_filter) == 1
        restore_opts(dst, e)
        again = sk_opts_pb2.sk_opts_entry()
        dump_opts(dst, socket.AF_INET, again)
        assert again == e
    finally:
        src.close()
        dst.close()


_KEEP = []


def _ret_all():
    """A one-instruction classic BPF program (ret #0xffff), kept alive: (buffer, address)."""
    from criu_py.native import ffi
    prog = ffi.new("uint64_t[1]", [struct.unpack("<Q", struct.pack("<HBBI", 0x06, 0, 0, 0xFFFF))[0]])
    _KEEP.append(prog)
    return prog, int(ffi.cast("uintptr_t", prog))


def test_unix_names():
    assert unix.path_of(b"/run/x.sock\0") == b"/run/x.sock"
    assert unix.show_name(b"/run/x.sock\0") == "/run/x.sock"
    assert unix.show_name(b"\0abs\0tract") == "@abs@tract"
    assert unix.show_name(b"") == "unbound"


def test_network_lock_names_and_commands():
    run_id = netlock.new_run_id()
    assert len(run_id) == 36 and run_id[14] == "4" and run_id.count("-") == 4
    # CRIU keeps 31 characters of "inet CRIU-<run id>": so must we, to delete its tables
    assert netlock.table_name(run_id, 1) == f"inet CRIU-{run_id}"[:31]
    assert netlock.table_name(None, 4242) == "inet CRIU-4242"
    cmds = netlock._nft_table_commands("inet CRIU-x")
    assert "meta mark 0xc114 accept" in cmds and "@conns4 drop" in cmds and "@conns6 drop" in cmds
    conn = netlock.Connection(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::ffff:10.1.2.3"), 80,
                              socket.inet_pton(socket.AF_INET6, "::ffff:10.9.9.9"), 5555)
    assert conn.text() == (socket.AF_INET, "10.1.2.3", "10.9.9.9")
    rule = netlock._iptables_rule(conn, True, True)
    assert rule[:6] == ["iptables", "-w", "-t", "filter", "-I", "INPUT"]
    assert rule[rule.index("--source") + 1] == "10.9.9.9" and rule[rule.index("--dport") + 1] == "80"
    assert str(conn) == "10.1.2.3:80 -> 10.9.9.9:5555"


def test_tcp_repair_reads_a_live_connection_and_puts_it_back():
    """A connection with data queued both ways, read in repair mode, then made again in
    a fresh socket pair under the same sequence numbers (loopback, no lock needed: both
    ends are ours and quiet)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    c.sendall(b"to the server")
    s.sendall(b"to the client, a bit longer")
    import time
    time.sleep(0.05)
    try:
        for sock in (c, s):
            tcp.repair_on(sock)
        state_c, ec, dc = tcp.dump_stream(c)
        state_s, es, ds = tcp.dump_stream(s)
        assert state_c == state_s == 1
        assert dc == b"to the client, a bit longer" and ds == b"to the server"
        assert (ec.inq_len, ec.outq_len, es.inq_len) == (27, 0, 13)
        assert ec.inq_seq == es.outq_seq and es.inq_seq == ec.outq_seq
        assert ec.mss_clamp > 0 and ec.opt_mask & tcp.TCPI_OPT_TIMESTAMPS
    finally:
        for sock in (c, s, lst):
            sock.close()             # closed in repair mode: without a packet


def test_socket_images_through_debian_crit(tmp_path):
    """sk-queues.img and tcp-stream-*.img as CRIU frames them (payload after each entry):
    Debian's crit reads them."""
    if not os.access("/usr/bin/crit", os.X_OK):
        pytest.skip("Debian's crit is not installed (make setup installs it)")
    from criu_py.images import ImageDir
    from criu_py.images.pb import sk_packet_pb2, tcp_stream_pb2
    p = sk_packet_pb2.sk_packet_entry(id_for=5, length=3)
    t = tcp_stream_pb2.tcp_stream_entry(inq_len=2, inq_seq=100, outq_len=3, outq_seq=200,
                                        opt_mask=7, snd_wscale=7, mss_clamp=65483, unsq_len=1)
    with ImageDir(tmp_path) as d:
        d.write_entries_with_payload("sk-queues.img", [(p, b"abc")])
        d.write_entries_with_payload("tcp-stream-1f.img", [(t, b"xxyyy")])
    for name, magic in (("sk-queues.img", "SK_QUEUES"), ("tcp-stream-1f.img", "TCP_STREAM")):
        res = subprocess.run(["/usr/bin/crit", "decode", "-i", str(tmp_path / name)],
                             capture_output=True, text=True)
        assert res.returncode == 0 and f'"magic": "{magic}"' in res.stdout, res.stderr
