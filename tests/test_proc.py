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
