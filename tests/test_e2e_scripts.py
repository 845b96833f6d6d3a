# End-to-end: --action-script, CRIU's hooks. A script sees each action with CRIU's
# environment ($CRTOOLS_SCRIPT_ACTION, $CRTOOLS_IMAGE_DIR, $CRTOOLS_INIT_PID). The
# migration case: post-dump copies the sealed images elsewhere while the tree is still
# frozen, and the copy restores; a failing post-dump leaves the program running where it
# was. pre-dump and pre-restore failures stop the command before anything happens;
# post-restore's kills the half-restored tree.
import os
import shutil
import subprocess

import pytest

from conftest import Task, assert_one_line_error, assert_running_untraced, proc_is_running

SCRIPT = """#!/bin/sh
state=$(awk '/^State/ {print $2}' /proc/${CRTOOLS_INIT_PID:-0}/status 2>/dev/null)
echo "$CRTOOLS_SCRIPT_ACTION ${CRTOOLS_INIT_PID:--} $CRTOOLS_IMAGE_DIR ${state:--}" >> "$SCRIPT_LOG"
if [ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] && [ -n "$COPY_TO" ]; then
    cp -a "$CRTOOLS_IMAGE_DIR" "$COPY_TO" || exit 9
fi
[ "$CRTOOLS_SCRIPT_ACTION" = "$FAIL_AT" ] && exit 3
exit 0
"""


@pytest.fixture
def script(h):
    path = h.path("hook.sh")
    path.write_text(SCRIPT)
    path.chmod(0o755)
    return path


def cli(h, script, *args, fail_at="", copy_to=""):
    env = dict(os.environ, SCRIPT_LOG=str(h.path("hook.log")), FAIL_AT=fail_at,
               COPY_TO=str(copy_to))
    return subprocess.run(h.cli_argv(*args, "--action-script", script, "-o", "cli.log", "-v4"),
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, cwd=h.dir)


def calls(h) -> list[list[str]]:
    log = h.path("hook.log")
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_migration_through_post_dump(h, script):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.images_dir()
    copy = h.path("copy")
    res = cli(h, script, "dump", "-t", task.pid, "-D", images, copy_to=copy)
    assert res.returncode == 0, res.stderr
    task.reap()
    pid = str(task.pid)
    assert calls(h) == [["pre-dump", pid, str(images), "S"],
                        ["post-dump", pid, str(images), "t"]]   # frozen while it copies
    assert (copy / "criu-py-checksums.img").exists() and (copy / "stats-dump").exists()
    shutil.rmtree(images)                 # only the copy is left: restore from it
    h.path("hook.log").unlink()
    last = int(task.log.lines()[-1].split()[1])
    restored = Task(task.pid, task.marker, task.log)
    h.tasks.append(restored)
    res = cli(h, script, "restore", "-D", copy, "-d")
    assert res.returncode == 0, res.stderr
    got = calls(h)
    assert [c[0] for c in got] == ["pre-restore", "post-restore", "pre-resume", "post-resume"]
    assert got[0][1] == "-" and all(c[1] == pid for c in got[1:])
    assert all(c[2] == str(copy) for c in got)
    assert got[1][3] != "-" and got[3][3] in ("S", "R")     # exists before, runs after
    task.log.wait(rf"{pid} {last + 3}")
    assert restored.running()


def test_failing_post_dump_keeps_the_tree_running(h, script):
    task = h.start("counter", ready=r"\d+ 5")
    res = cli(h, script, "dump", "-t", task.pid, "-D", h.images_dir(), fail_at="post-dump")
    assert_one_line_error(res, "post-dump script", "exited with 3", "the tree runs on")
    assert_running_untraced(task)
    last = int(task.log.lines()[-1].split()[1])
    task.log.wait(rf"{task.pid} {last + 3}")


def test_failing_pre_dump_dumps_nothing(h, script):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.images_dir()
    res = cli(h, script, "dump", "-t", task.pid, "-D", images, fail_at="pre-dump")
    assert_one_line_error(res, "pre-dump script", "exited with 3")
    assert_running_untraced(task)
    assert not [p for p in images.iterdir() if p.name.endswith(".img")]
    assert [c[0] for c in calls(h)] == ["pre-dump"]


@pytest.mark.parametrize("action", ["pre-restore", "post-restore"])
def test_failing_restore_script_leaves_nothing(h, script, action):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task)
    res = cli(h, script, "restore", "-D", images, "-d", fail_at=action)
    assert_one_line_error(res, f"{action} script", "exited with 3")
    assert not proc_is_running(task.pid)
    assert [c[0] for c in calls(h)][-1] == action
    # and the images still restore
    restored = h.restore(images, task=task)
    assert restored.running()


def test_a_script_that_cannot_run(h):
    task = h.start("counter", ready=r"\d+ 5")
    res = subprocess.run(h.cli_argv("dump", "-t", task.pid, "-D", h.images_dir(),
                                    "--action-script", str(h.path("missing.sh"))),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                         cwd=h.dir)
    assert_one_line_error(res, "pre-dump script", "missing.sh", "cannot run")
    assert_running_untraced(task)
