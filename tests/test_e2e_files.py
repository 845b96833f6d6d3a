# End-to-end: the file descriptor table as the task sees it - numbers, positions,
# open flags, close-on-exec - and cwd and umask, compared before the dump and after the
# restore by the task's own report (one record read per report shows the offset).
import resource
import signal

import pytest

REPORT = r"report (\d+) record=(\d+) (.*) cwd=(\S+) umask=(\d+)"


def report(task):
    before = len(task.log.matches(REPORT))
    task.signal(signal.SIGUSR1)
    m = task.log.wait(REPORT, count=before + 1)
    fds = {}
    for item in m.group(3).split():
        fd, pos, flags, fdflags = item.split(":")
        fds[int(fd)] = (int(pos), int(flags, 8), int(fdflags))
    return int(m.group(1)), int(m.group(2)), fds, m.group(4), m.group(5)


# the last fd the task may have: the restorer must keep its own fds out of its way
HIGHEST_FD = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1


@pytest.mark.parametrize("high", [100, HIGHEST_FD], ids=["fd100", "fd-at-rlimit"])
def test_fd_offsets_flags_cwd_umask_survive(h, high):
    workdir = h.path("fdir")
    workdir.mkdir()
    task = h.start("files", workdir, high)
    pid, record, fds, cwd, umask = report(task)
    assert (pid, record, cwd, umask) == (task.pid, 4096 + 160, str(workdir), "027")
    assert fds[3][0] == 4096 + 176 and fds[4][0] == 1001

    restored = h.checkpoint_restore(task)
    pid2, record2, fds2, cwd2, umask2 = report(restored)
    assert pid2 == task.pid
    assert record2 == record + 16, "fd 3 did not continue from its offset"
    assert fds2[3] == (fds[3][0] + 16,) + fds[3][1:]
    assert fds2[4] == (fds[4][0] + 1,) + fds[4][1:], "fd 4 lost its position or flags"
    assert fds2[5][1:] == fds[5][1:] and fds2[5][2] == 1, "O_APPEND|O_NONBLOCK or CLOEXEC lost"
    assert fds2[high] == fds[high]
    assert (cwd2, umask2) == (cwd, umask)
    # fd 4 wrote at 1000 and 1001: nothing was truncated or rewritten by the restore
    out = (workdir / "out").read_bytes()
    assert len(out) == 1002 and out[1000:] == b"xx" and out[:1000] == b"\0" * 1000
    assert (workdir / "both").read_bytes() == b"hello\n"
