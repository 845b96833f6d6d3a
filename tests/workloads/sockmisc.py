# Sockets for the refusal and lock tests, one mode per run; logs "ready <pid> ..." once
# set up, then serves until killed.
#   scm PATH           a socketpair with a file descriptor in flight (SCM_RIGHTS sent,
#                      not received) ... refused by dump; PATH unused
#   ext-dgram PATH     a datagram socket connected to a socket outside the tree bound at
#                      PATH; on each SIGUSR1 it sends "ping <pid> <n>"
#   ext-stream PATH    a stream socket connected to a listener outside the tree at PATH,
#                      echoing what arrives
#   tcp-scm PORT       a TCP connection to 127.0.0.1:PORT (echoing what arrives) and,
#                      at a higher fd, a socketpair with a descriptor in flight
#   tcp-echo PORT      a TCP connection to 127.0.0.1:PORT, echoing what arrives
# usage: sockmisc.py LOG MODE ARG
import os
import select
import signal
import socket
import sys
import time

log = open(sys.argv[1], "a", buffering=1)
mode, arg = sys.argv[2], sys.argv[3]
pid = os.getpid()
keep = []


def scm_pair():
    a, b = socket.socketpair()
    fd = os.open("/dev/null", os.O_RDONLY)
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
    os.close(fd)
    keep.extend([a, b])
    return b


def echo(conn):
    conn.setblocking(True)
    while True:
        r, _, _ = select.select([conn], [], [], 0.05)
        if r:
            data = conn.recv(65536)
            if not data:
                log.write(f"eof {pid}\n")
                break
            conn.sendall(data)


if mode == "scm":
    b = scm_pair()
    log.write(f"ready {pid} {b.fileno()}\n")
    while True:
        time.sleep(0.05)
elif mode == "ext-dgram":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(arg)
    n = [0]

    def ping(*_):
        n[0] += 1
        s.send(f"ping {pid} {n[0]}".encode())
    signal.signal(signal.SIGUSR1, ping)
    log.write(f"ready {pid} {s.fileno()}\n")
    while True:
        time.sleep(0.05)
elif mode == "ext-stream":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(arg)
    log.write(f"ready {pid} {s.fileno()}\n")
    echo(s)
    while True:
        time.sleep(0.05)
elif mode in ("tcp-scm", "tcp-echo"):
    conn = socket.create_connection(("127.0.0.1", int(arg)))
    extra = scm_pair().fileno() if mode == "tcp-scm" else -1
    log.write(f"ready {pid} {conn.fileno()} {extra}\n")
    echo(conn)
    while True:
        time.sleep(0.05)
else:
    sys.exit(f"unknown mode {mode}")
