# End-to-end: restore --inherit-fd, CRIU's way of handing the tasks a file from outside
# the tree. A program whose stdout is a pipe read by a process outside the tree (a shell
# pipeline, a supervisor) is dumped; without --inherit-fd it would come back writing into
# a pipe nobody reads (and die of SIGPIPE); with `--inherit-fd fd[N]:pipe:[INODE]` its
# stdout is the pipe the restoring caller passes as fd N, and the count goes on there.
# A regular file's path (without its first '/') hands in a file the same way: output
# dumped to a log that is gone since goes to a new one. Bad specs give one line.
import os
import subprocess
import sys
import time

from conftest import Task, assert_one_line_error, wait_for

PRINTER = """# criu-py inherit-fd printer
import sys, time
i = 0
while True:
    i += 1
    sys.stdout.write(f"{i} {time.time():.3f}\\n")
    sys.stdout.flush()
    time.sleep(0.05)
"""


def start_printer(h, stdout) -> Task:
    script = h.path("printer.py")
    script.write_text(PRINTER)
    p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.DEVNULL, stdout=stdout,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    task = Task(p.pid, str(script), None, p)
    h.tasks.append(task)
    return task


def read_lines(fd: int, want: int, timeout: float = 10) -> list[tuple[int, float]]:
    """At least `want` lines (want 0: whatever is there now)."""
    out, buf = [], b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while len(out) < want or not want:
        assert time.monotonic() < deadline, f"got only {out}"
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            if not want:
                break
            time.sleep(0.01)
            continue
        if not chunk:
            assert not want, f"EOF after {out}"
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out += [(int(n), float(t)) for n, t in (line.split() for line in lines)]
    return out


def dumped_printer_on_a_pipe(h, lines: int):
    """A printer whose stdout is a pipe read here, outside the tree, dumped once it
    printed `lines` lines; then the reader is gone too. (task, the pipe's inode, images,
    every line it printed)."""
    r, w = os.pipe()
    task = start_printer(h, w)
    os.close(w)
    try:
        inode = os.fstat(r).st_ino
        seen = read_lines(r, lines)
        images = h.dump(task)
        seen += read_lines(r, 0)
    finally:
        os.close(r)
    return task, inode, images, seen


def restore_with(h, images, task, *extra, pass_fds=()):
    restored = Task(task.pid, task.marker, None)
    h.tasks.append(restored)
    res = subprocess.run(h.cli_argv("restore", "-D", images, "-d", "-o", "restore.log", "-v4",
                                    *extra),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60, cwd=h.dir, pass_fds=pass_fds)
    return res, restored


def test_stdout_pipe_to_outside_the_tree(h):
    task, inode, images, seen = dumped_printer_on_a_pipe(h, 5)
    last = max(n for n, _ in seen)
    r2, w2 = os.pipe()
    try:
        res, restored = restore_with(h, images, task, "--inherit-fd", f"fd[{w2}]:pipe:[{inode}]",
                                     pass_fds=(w2,))
        os.close(w2)
        assert res.returncode == 0, res.stderr
        got = read_lines(r2, 10)
    finally:
        os.close(r2)
    numbers = [n for n, _ in got]
    assert numbers == list(range(last + 1, last + 1 + len(numbers))), (last, numbers)
    # it runs at its own pace (a printer that failed its sleep would race)
    assert got[-1][1] - got[0][1] >= 0.04 * (len(got) - 1), got
    assert restored.running()


def test_stdout_file_handed_in_by_path(h):
    log = h.path("out.log")
    with open(log, "ab") as f:
        task = start_printer(h, f)
    wait_for(lambda: log.exists() and log.stat().st_size > 20, timeout=10, what="output")
    images = h.dump(task)
    last = int(log.read_text().splitlines()[-1].split()[0])
    log.unlink()                        # gone: only --inherit-fd can stand for it
    res, _ = restore_with(h, images, task)
    assert_one_line_error(res, "out.log")
    new = h.path("new.log")
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        res, restored = restore_with(h, images, task, "--inherit-fd",
                                     f"fd[{fd}]:{str(log)[1:]}", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: len(new.read_text().splitlines()) >= 3, timeout=10, what="new output")
    numbers = [int(line.split()[0]) for line in new.read_text().splitlines()]
    assert numbers[:3] == [last + 1, last + 2, last + 3]
    assert not log.exists() and restored.running()


def test_bad_inherit_fd_specs(h):
    task, inode, images, _ = dumped_printer_on_a_pipe(h, 2)
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    for spec, words in (("fd3:pipe", ["not fd[N]:RESOURCE"]),
                        (f"fd[{closed}]:pipe:[{inode}]", [f"fd {closed} is not open"]),
                        ("fd[0]:pipe:[1]", ["no file of the dump is", "pipe:[1]"])):
        res, _ = restore_with(h, images, task, "--inherit-fd", spec)
        assert_one_line_error(res, *words)
        assert not task.running()
