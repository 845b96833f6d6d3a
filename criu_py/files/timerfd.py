# timerfd: clock, flags, settime flags (TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET), the
# time left and the interval, and expirations not read yet (ticks), all from fdinfo
# (files.img TIMERFD entry, upstream's timerfd_entry). Restore creates the timer
# unarmed; it is armed by the restorer of the first task holding it, as late as
# possible (right before the task returns to its code), with the time that was left
# at the dump: the time the task spent dumped does not count, as in CRIU. An ABSTIME
# timer is armed at "now + time left" on its clock. Unread ticks are put back with
# TFD_IOC_SET_TICKS. A timerfd no task holds (an epoll's target only) is armed at once.
import os
import time

from criu_py.files import O_CLOEXEC, FdRef, FileOps, fown_entry

FD_TYPE_TIMERFD = 17
TFD_TIMER_ABSTIME = 1
TFD_IOC_SET_TICKS = 0x40085400          # _IOW('T', 0, u64)
NSEC = 1_000_000_000


def timerfd_entry(fid: int, ref: FdRef):
    from criu_py.images.pb import fdinfo_pb2
    t = ref.info.timerfd
    fe = fdinfo_pb2.file_entry()
    fe.type = FD_TYPE_TIMERFD
    fe.id = fid
    e = fe.tfd
    e.id = fid
    e.flags = ref.flags & ~O_CLOEXEC
    fown_entry(e.fown)
    e.clockid = t.clockid
    e.ticks = t.ticks
    e.settime_flags = t.settime_flags
    e.vsec, e.vnsec = t.value
    e.isec, e.insec = t.interval
    return fe


def arming(e) -> tuple:
    """(settime flags, time left (s, ns), interval (s, ns), ticks) to arm a restored
    timerfd with. A periodic timer about to fire shows 0 left: it gets 1 ns, so that it
    stays armed (0 would disarm it)."""
    value, interval = (e.vsec, e.vnsec), (e.isec, e.insec)
    if value == (0, 0) and interval != (0, 0):
        value = (0, 1)
    return e.settime_flags, value, interval, e.ticks


def arm(fd: int, e) -> None:
    """Arm now (Python side; the restorer does the same in C)."""
    import fcntl
    import struct
    from criu_py.files import kcall
    flags, value, interval, ticks = arming(e)
    if flags & TFD_TIMER_ABSTIME and value != (0, 0):
        now = time.clock_gettime_ns(e.clockid)
        at = now + value[0] * NSEC + value[1]
        value = (at // NSEC, at % NSEC)
    kcall.timerfd_settime(fd, flags, value, interval)
    if ticks:
        fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", ticks))


class TimerfdOps(FileOps):
    fd_type = FD_TYPE_TIMERFD
    restore_imports = ("criu_py.files.kcall",)

    def claims(self, ref: FdRef) -> bool:
        return ref.link == "anon_inode:[timerfd]" and ref.info.timerfd is not None

    def dump_fd(self, ctx, ref: FdRef) -> int:
        key = ("fd", ctx.file_description_key(ref))
        return ctx.files.add(key, lambda fid: timerfd_entry(fid, ref))

    def restore_fd(self, ctx, entry, fdinfo) -> int:
        from criu_py.files import kcall
        e = entry.tfd
        fd = kcall.timerfd_create(e.clockid, O_CLOEXEC | (e.flags & os.O_NONBLOCK))
        if not ctx.armed_by_restorer(entry.id):
            arm(fd, e)
        return fd


OPS = TimerfdOps()
