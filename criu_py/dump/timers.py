# POSIX timers (timer_create): /proc/PID/timers gives each timer's id, clock, signal,
# sigev_value and notification target; its time left, interval and overrun count only
# the task itself can read, so timer_gettime and timer_getoverrun run inside it (two
# injected syscalls per timer, into a scratch page). They go into the leader's core
# (tc.timers.posix, upstream's posix_timer_entry). Restore: the restorer recreates them
# with their ids (PR_TIMER_CREATE_RESTORE_IDS) and arms them with the time that was left.
import struct

from criu_py.errors import DumpError

NR_TIMER_GETTIME, NR_TIMER_GETOVERRUN = 224, 225


def collect(pd) -> list:
    """posix_timer_entry for every timer of the stopped process `pd`."""
    from criu_py.images.pb import timer_pb2
    from criu_py.ptrace import Injection
    out = []
    with Injection(pd.tracee, pd.leader.raw_gpregs) as inj:
        with inj.scratch_page() as page:
            for t in pd.timers:
                ret = inj.syscall(NR_TIMER_GETTIME, t.id, page)
                if ret < 0:
                    raise DumpError(f"pid {pd.pid}: timer_gettime of timer {t.id} failed ({ret})")
                isec, insec, vsec, vnsec = struct.unpack("<qqqq", pd.tracee.read_mem(page, 32))
                overrun = inj.syscall(NR_TIMER_GETOVERRUN, t.id)
                e = timer_pb2.posix_timer_entry()
                e.it_id, e.clock_id, e.si_signo = t.id, t.clockid, t.signo
                e.it_sigev_notify, e.sival_ptr = t.notify, t.sival
                e.overrun = max(overrun, 0)
                e.isec, e.insec, e.vsec, e.vnsec = isec, insec, vsec, vnsec
                if t.notify & 4:               # SIGEV_THREAD_ID: the thread it signals
                    e.notify_thread_id = t.target
                out.append(e)
    return out
