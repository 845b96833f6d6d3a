# The /proc parsers on processes whose answers we know: ourselves and a child we start.
import os
import subprocess
import tempfile

import pytest

from criu_py import proc
from criu_py.errors import NoSuchProcess


@pytest.fixture
def sleeper(sleeping_child):
    return sleeping_child


def test_stat_and_status_of_a_child(sleeper):
    st = proc.read_stat(sleeper.pid)
    assert st.pid == sleeper.pid and st.comm == "sleep"
    assert st.ppid == os.getpid() and st.sid == sleeper.pid and st.pgid == sleeper.pid
    assert st.start_code < st.end_code and st.arg_start < st.arg_end <= st.env_start
    status = proc.read_status(sleeper.pid)
    assert status.name == "sleep" and status.tgid == sleeper.pid and status.ppid == os.getpid()
    assert status.tracer_pid == 0 and status.threads == 1
    mask = os.umask(0)
    os.umask(mask)
    assert status.uids == (0, 0, 0, 0) and status.umask == mask


def test_comm_with_spaces_and_parens():
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "a b) (c")
        os.symlink("/bin/sleep", exe)
        p = subprocess.Popen([exe, "60"])
        try:
            st = proc.read_stat(p.pid)
            assert st.comm == "a b) (c" and st.ppid == os.getpid()
        finally:
            p.kill()
            p.wait()


def test_maps_and_smaps_agree(sleeper):
    maps = proc.read_maps(sleeper.pid)
    smaps = proc.read_smaps(sleeper.pid)
    assert [(v.start, v.end, v.perms, v.path) for v in maps] == \
           [(v.start, v.end, v.perms, v.path) for v in smaps]
    paths = {v.path for v in maps}
    assert "[stack]" in paths and "[vdso]" in paths
    stack = next(v for v in smaps if v.path == "[stack]")
    assert "gd" in stack.vm_flags and stack.perms == "rw-p"
    exe = os.path.realpath("/bin/sleep")
    text = [v for v in maps if v.path == exe and v.perms[2] == "x"]
    assert text and text[0].inode == os.stat(exe).st_ino


def test_path_with_spaces_in_maps():
    with tempfile.NamedTemporaryFile(prefix="with space ") as f:
        f.write(b"x" * 4096)
        f.flush()
        import mmap
        m = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
        try:
            vmas = [v for v in proc.read_maps(os.getpid()) if v.path == f.name]
            assert len(vmas) == 1 and vmas[0].size == 4096 and vmas[0].perms == "r--s"
        finally:
            m.close()


def test_fds_fdinfo_and_links():
    r, w = os.pipe()
    fd = os.open("/dev/null", os.O_WRONLY | os.O_APPEND)
    try:
        pid = os.getpid()
        fds = proc.list_fds(pid)
        assert {r, w, fd} <= set(fds)
        info = proc.read_fdinfo(pid, fd)
        assert info.flags & os.O_APPEND and info.flags & os.O_ACCMODE == os.O_WRONLY
        assert info.flags & 0o2000000        # O_CLOEXEC: Python's default
        assert proc.read_fd_link(pid, fd) == "/dev/null"
        assert proc.read_fd_link(pid, r).startswith("pipe:[")
        assert proc.read_fdinfo(pid, r).ino == os.fstat(r).st_ino
    finally:
        for x in (r, w, fd):
            os.close(x)


def test_auxv_and_misc(sleeper):
    auxv = proc.read_auxv(sleeper.pid)
    pairs = dict(zip(auxv[::2], auxv[1::2]))
    assert pairs[6] == 4096                  # AT_PAGESZ
    assert auxv[-2:] == [0, 0]
    assert proc.read_personality(sleeper.pid) == 0
    assert proc.read_link(sleeper.pid, "exe") == os.path.realpath("/bin/sleep")
    assert proc.list_threads(sleeper.pid) == [sleeper.pid]
    assert proc.read_children(sleeper.pid) == []
    assert sleeper.pid in proc.read_children(os.getpid())
    assert len(proc.read_limits(sleeper.pid)) == 16
    assert set(proc.read_ns_ids(sleeper.pid)) >= {"pid", "net", "mnt"}


def test_missing_pid_is_no_such_process():
    with pytest.raises(NoSuchProcess):
        proc.read_status(4194303)
    with pytest.raises(NoSuchProcess):
        proc.read_maps(4194303)


# ---- fdinfo of the fd kinds, /proc/PID/timers (issue 11): texts as this kernel prints them
FDINFO_EPOLL = """pos:\t0
flags:\t02
mnt_id:\t17
ino:\t1044
tfd:       13 events:       19 data:               5f  pos:0 ino:414 sdev:10
tfd:        5 events: 80000019 data:             1234  pos:7 ino:1313b6 sdev:fe00000
"""
FDINFO_MISC = """pos:\t0
flags:\t04002
mnt_id:\t17
ino:\t1044
eventfd-count:                5
eventfd-id: 1
eventfd-semaphore: 1
sigmask:\t0000000800000200
clockid: 9
ticks: 3
settime flags: 03
it_value: (40, 968549141)
it_interval: (0, 100000000)
lock:\t1: FLOCK  ADVISORY  WRITE 29295 fe:00:2151403 0 EOF
lock:\t2: OFDLCK ADVISORY  READ -1 fe:00:2151443 100 199
lock:\t3: -> POSIX  ADVISORY  WRITE 4 fe:00:2151443 10 29
tty-index:\t4
"""


def test_parse_fdinfo_of_the_fd_kinds():
    ep = proc.parse_fdinfo(FDINFO_EPOLL)
    assert ep.flags == 2 and ep.eventfd_count is None and ep.timerfd is None
    assert [(t.tfd, t.events, t.data, t.pos, t.ino, t.dev) for t in ep.tfds] == [
        (13, 0x19, 0x5f, 0, 0x414, os.makedev(0, 16)),
        (5, 0x80000019, 0x1234, 7, 0x1313b6, os.makedev(254, 0))]
    m = proc.parse_fdinfo(FDINFO_MISC)
    assert (m.eventfd_count, m.eventfd_semaphore, m.sigmask, m.tty_index) == (5, True, 0x800000200, 4)
    t = m.timerfd
    assert (t.clockid, t.ticks, t.settime_flags, t.value, t.interval) == \
        (9, 3, 3, (40, 968549141), (0, 100000000))
    assert [(lk.kind, lk.access, lk.pid, lk.dev, lk.ino, lk.start, lk.end, lk.blocked)
            for lk in m.locks] == [
        ("FLOCK", "WRITE", 29295, os.makedev(254, 0), 2151403, 0, None, False),
        ("OFDLCK", "READ", -1, os.makedev(254, 0), 2151443, 100, 199, False),
        ("POSIX", "WRITE", 4, os.makedev(254, 0), 2151443, 10, 29, True)]


def test_parse_timers():
    text = ("ID: 1\nsignal: 34/0000000000000000\nnotify: signal/tid.29296\nClockID: 0\n"
            "ID: 0\nsignal: 12/0000000000000abc\nnotify: signal/pid.29295\nClockID: 1\n"
            "ID: 3\nsignal: 0/0000000000000000\nnotify: none/pid.29295\nClockID: 7\n")
    got = [(t.id, t.signo, t.sival, t.notify, t.target, t.clockid) for t in proc.parse_timers(text)]
    assert got == [(1, 34, 0, proc.SIGEV_THREAD_ID, 29296, 0), (0, 12, 0xabc, 0, 29295, 1),
                   (3, 0, 0, proc.SIGEV_NONE, 29295, 7)]


def test_live_event_fds_parse():
    r, w = os.pipe()
    efd = os.eventfd(9, os.EFD_SEMAPHORE)
    try:
        info = proc.read_fdinfo(os.getpid(), efd)
        assert (info.eventfd_count, info.eventfd_semaphore) == (9, True)
        assert proc.read_fdinfo(os.getpid(), r).eventfd_count is None
        assert proc.read_timers(os.getpid()) == []
    finally:
        for fd in (r, w, efd):
            os.close(fd)


def test_ghost_limit_sizes():
    from criu_py.errors import Unsupported
    from criu_py.files.ghost import parse_size
    assert [parse_size(x) for x in ("4096", "512K", "1M", "2g")] == [4096, 512 << 10, 1 << 20, 2 << 30]
    with pytest.raises(Unsupported):
        parse_size("lots")
