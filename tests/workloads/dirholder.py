# A process that holds a directory open (an fd from open(O_DIRECTORY)) and keeps
# ticking: logs "ready <pid>" once it holds DIR, then every 20 ms "tick <pid> <n> <what
# its fd names> <mode of its fd>". The test removes DIR meanwhile: a restore must give
# the fd a directory again, with DIR's mode, deleted as it was.
# usage: python dirholder.py LOG DIR
import os
import sys
import time


def main():
    log = open(sys.argv[1], "a", buffering=1)
    fd = os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY)
    log.write(f"ready {os.getpid()}\n")
    n = 0
    while True:
        n += 1
        st = os.fstat(fd)
        log.write(f"tick {os.getpid()} {n} {os.readlink(f'/proc/self/fd/{fd}')} "
                  f"{st.st_mode:o} {st.st_nlink}\n")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
