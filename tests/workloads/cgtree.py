# A small process tree for the cgroup tests: the parent forks N children (each sleeping
# until its parent dies, PR_SET_PDEATHSIG), logs "children <pid> ..." and then, on every
# SIGUSR1, forks one more such child and logs "forked <pid>": a child forked after a
# restore shows where new children of the restored parent are born.
# usage: python cgtree.py LOG N
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)


def child(parent: int) -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)
    while True:
        time.sleep(1)


def spawn() -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        child(parent)
    return pid


def main():
    log = open(sys.argv[1], "a", buffering=1)
    wanted = []
    signal.signal(signal.SIGUSR1, lambda *_: wanted.append(1))
    kids = [spawn() for _ in range(int(sys.argv[2]))]
    log.write("children " + " ".join(map(str, kids)) + "\n")
    while True:
        while wanted:
            wanted.pop()
            log.write(f"forked {spawn()}\n")
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.01)


if __name__ == "__main__":
    main()
