# Syscalls the fd kinds need that Python's os module lacks (epoll_ctl with our own event
# data, signalfd, timerfd, kcmp of an epoll's target), as thin wrappers over the native
# raw-syscall entry: each returns its result or raises OSError with the errno.
import os
import struct

NR_TIMERFD_CREATE, NR_TIMERFD_SETTIME, NR_TIMERFD_GETTIME = 283, 286, 287
NR_EPOLL_CTL, NR_EPOLL_CREATE1, NR_SIGNALFD4, NR_KCMP = 233, 291, 289, 312
EPOLL_CTL_ADD = 1
KCMP_EPOLL_TFD = 7


def _call(nr: int, *args) -> int:
    from criu_py.native import lib
    ret = lib.criu_py_raw_syscall6(nr, *(list(args) + [0] * (6 - len(args))))
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return ret


def _addr(buf) -> int:
    from criu_py.native import ffi
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def epoll_create1(flags: int) -> int:
    return _call(NR_EPOLL_CREATE1, flags)


def epoll_add(epfd: int, fd: int, events: int, data: int) -> None:
    """EPOLL_CTL_ADD with the given events and 64-bit data (struct epoll_event is packed
    on x86_64: u32 events, u64 data)."""
    ev = bytearray(struct.pack("<IQ", events & 0xFFFFFFFF, data & 0xFFFFFFFFFFFFFFFF))
    _call(NR_EPOLL_CTL, epfd, EPOLL_CTL_ADD, fd, _addr(ev))


def signalfd(mask: int, flags: int) -> int:
    m = bytearray(struct.pack("<Q", mask))
    return _call(NR_SIGNALFD4, -1, _addr(m), 8, flags)


def timerfd_create(clockid: int, flags: int) -> int:
    return _call(NR_TIMERFD_CREATE, clockid, flags)


def timerfd_settime(fd: int, flags: int, value: tuple[int, int], interval: tuple[int, int]) -> None:
    its = bytearray(struct.pack("<qqqq", interval[0], interval[1], value[0], value[1]))
    _call(NR_TIMERFD_SETTIME, fd, flags, _addr(its), 0)


def kcmp_epoll_tfd(pid1: int, fd1: int, pid2: int, efd: int, tfd: int, toff: int) -> bool:
    """True when pid1's fd1 is the file pid2's epoll efd watches as its toff-th item
    added with fd number tfd."""
    from criu_py.native import lib
    slot = bytearray(struct.pack("<III", efd, tfd, toff))
    return lib.criu_py_raw_syscall6(NR_KCMP, pid1, pid2, KCMP_EPOLL_TFD, fd1, _addr(slot), 0) == 0
