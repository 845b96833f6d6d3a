# Files a restore must find again, and must not write: in DIR it maps "lib.bin" (a copy
# of an ELF program, so it has a build-id) MAP_PRIVATE read-write and writes a pattern
# into its first page (a private copy the dump saves), maps "ro.bin" MAP_PRIVATE
# read-only, and holds "data.txt" open read-only. Every 10 ms it logs
# "<pid> <count> <sha256 of the private page>"; the count lives only in memory.
# usage: python mapper.py LOG DIR
import hashlib
import mmap
import os
import sys
import time


def main():
    log = open(sys.argv[1], "a", buffering=1)
    d = sys.argv[2]
    with open(os.path.join(d, "lib.bin"), "rb") as f:
        lib = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with open(os.path.join(d, "ro.bin"), "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    data = os.open(os.path.join(d, "data.txt"), os.O_RDONLY)
    lib[:4096] = bytes((i * 7 + 3) % 251 for i in range(4096))
    n = 0
    log.write(f"ready {os.getpid()} fd={data} ro={ro[:4].hex()}\n")
    while True:
        n += 1
        log.write(f"{os.getpid()} {n} {hashlib.sha256(lib[:4096]).hexdigest()[:16]}\n")
        time.sleep(0.01)


main()
