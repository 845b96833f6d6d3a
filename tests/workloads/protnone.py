# Memory the dumper cannot read with process_vm_readv: 2 MiB of anonymous memory filled
# with a pattern and then made PROT_NONE (a dump reads it through /proc/PID/mem). On
# SIGUSR1 it opens the area for reading, checks it and logs "OK <pid>" or "BAD <pid>",
# and closes it again. usage: python protnone.py LOG
import ctypes
import hashlib
import mmap
import os
import signal
import sys
import time

SIZE = 2 << 20
PROT_NONE = 0
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def main():
    log = open(sys.argv[1], "a", buffering=1)
    area = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pattern = hashlib.shake_256(b"protnone").digest(SIZE)
    area[:] = pattern
    addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
    if libc.mprotect(addr, SIZE, PROT_NONE):
        raise OSError(ctypes.get_errno(), "mprotect")
    asked = []
    signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
    log.write(f"ready {os.getpid()}\n")
    while True:
        if asked:
            asked.clear()
            libc.mprotect(addr, SIZE, mmap.PROT_READ)
            good = area[:] == pattern
            libc.mprotect(addr, SIZE, PROT_NONE)
            log.write(f"{'OK' if good else 'BAD'} {os.getpid()}\n")
        time.sleep(0.01)


main()
