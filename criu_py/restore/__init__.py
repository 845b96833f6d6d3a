# `criu-py restore`: bring a dumped task back with its PID, memory, registers, files and
# signal state. restore_tasks() is the checklist: read and check every image, fork the
# task with its PID, let it set itself up and hand over to the PIE restorer
# (csrc/pie_restorer.c), then wait for it (or return at once with -d). A failure at any
# stage kills what was created and reports one line naming the stage.
import contextlib
import os
import signal

from criu_py.errors import RestoreError
from criu_py.log import log
from criu_py.log import step as log_step


def _step(name: str):
    return log_step("restore", name)


def restore_tasks(opts: dict) -> int:
    from criu_py.images import integrity
    from criu_py.restore import images as restore_images
    integrity.verify(opts.get("images_dir") or ".", opts)
    with _step("read and check images"):
        t = restore_images.load(opts.get("images_dir") or ".")
    with contextlib.ExitStack() as stack:
        stack.callback(t.images.close)
        with _step("check pid and vdso"):
            check_pid_free(t.pid)
            check_vdso(t)
            plan_region_removal(t)
        if opts.get("pidfile"):
            write_pidfile(opts["pidfile"], t, stack)
        with _step("fork with pid"):
            child, status_r = fork_task(t, opts, stack)
        with _step("wait for the restorer"):
            wait_for_restorer(t, child, status_r)
        t.restored = True         # keeps the pidfile
    log.info("restore: pid %d runs", t.pid)
    if opts.get("detach"):
        return 0
    from criu_py import interrupts
    interrupts.raise_at_once(f"pid {t.pid} is restored and keeps running")
    return wait_for_task(t.pid)


def check_pid_free(pid: int) -> None:
    if os.path.exists(f"/proc/{pid}"):
        raise RestoreError(f"pid {pid} is in use: cannot restore the task with its PID")


def check_vdso(t) -> None:
    from criu_py.mem.restore import check_vdso as check
    check(t.memory, t.mm, t.pid)


class Child:
    """The forked task while it is being restored: killed on any failure."""

    def __init__(self, pid: int):
        self.pid = pid
        self.running = False
        self.reaped = False

    def kill_unless_running(self) -> None:
        if self.running or self.reaped:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except OSError:
            pass


def plan_region_removal(t) -> None:
    """Whether the parent will unmap the restorer region with ptrace at the end (needs
    the dumped vdso, a `syscall` in it, and room for the sigframe on the task's stack)."""
    from criu_py import mem as M
    from criu_py.restore.task import frame_fits_on_stack, task_registers
    from criu_py.restore.tracer import vdso_syscall_offset
    vdso = [v for v in t.mm.vmas if v.status & M.VMA_AREA_VDSO]
    off = vdso_syscall_offset()
    if vdso and off is not None and frame_fits_on_stack(t, task_registers(t.core)):
        t.syscall_addr = vdso[0].start + off
    else:
        log.info("restore: the restorer region will stay mapped in the task")


def fork_task(t, opts: dict, stack) -> tuple["Child", int]:
    """Fork the task; in the child run its set-up (never returns). Returns the child and
    the read end of the status pipe; the stack kills the child unless it runs."""
    from criu_py.restore.fork import clone_with_pid
    from criu_py.restore.task import run_child
    from criu_py.restore.tracer import seize
    r, w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = clone_with_pid(t.pid)
    except BaseException:
        for fd in (r, w, go_r, go_w):
            os.close(fd)
        raise
    if pid == 0:
        os.close(r)
        os.close(go_w)
        run_child(t, w, go_r, bool(opts.get("shell_job")), trap=bool(t.syscall_addr))
        os._exit(1)
    os.close(w)
    os.close(go_r)
    stack.callback(os.close, r)
    child = Child(pid)
    stack.callback(child.kill_unless_running)
    try:
        if t.syscall_addr:
            seize(pid)
        os.write(go_w, b"g")
    finally:
        os.close(go_w)
    return child, r


def wait_for_restorer(t, child: "Child", status_r: int) -> None:
    from criu_py.restore.fork import read_status
    from criu_py.restore.tracer import unmap_region_and_release
    done, msg = read_status(status_r, child.pid)
    if done:
        if t.syscall_addr:
            start, length = done
            unmap_region_and_release(child.pid, start, length, t.syscall_addr)
        child.running = True
        return
    if not msg:
        # The pipe closed without a word: only the task's death does that.
        _, st = os.waitpid(child.pid, 0)
        child.reaped = True
        msg = f"the task died during restore ({_describe(st)})"
    raise RestoreError(f"restore of pid {child.pid} failed: {msg}")


def write_pidfile(path: str, t, stack) -> None:
    """Written before the fork (a bad path fails early); removed if the restore fails."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RestoreError(f"cannot write the pidfile {path}: {exc.strerror}") from None
    with open(fd, "w") as f:
        f.write(f"{t.pid}\n")
    stack.callback(_remove_unless_restored, path, t)


def _remove_unless_restored(path: str, t) -> None:
    if not t.restored:
        try:
            os.unlink(path)
        except OSError:
            pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def wait_for_task(pid: int) -> int:
    """Like `criu restore` without -d: wait for the task; its exit status, 128+signal."""
    while True:
        try:
            _, st = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if os.WIFEXITED(st):
            return os.WEXITSTATUS(st)
        if os.WIFSIGNALED(st):
            return 128 + os.WTERMSIG(st)
