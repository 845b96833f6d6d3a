# End-to-end: `criu-py swrk FD`, CRIU's RPC as pycriu, go-criu and container runtimes
# speak it (criu_req / criu_resp over a SOCK_SEQPACKET pair, the images dir given as the
# client's fd). A client dumps the counter and restores it: same PID, the count goes on.
# Also VERSION, CHECK and FEATURE_CHECK, errors as success=false with the one-line
# message, and several requests on one connection (keep_open). The client starts the
# worker as pycriu does: stdin, stdout and stderr closed, the images dir fd not
# inheritable (the worker reaches it through /proc, as CRIU does).
import os
import socket
import subprocess

from conftest import Task, assert_running_untraced
from criu_py.images.pb import rpc_pb2


class Client:
    """A minimal RPC client: starts `criu-py swrk FD` on one end of a seqpacket pair."""

    def __init__(self, h):
        self.sk, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(h.cli_argv("swrk", str(theirs.fileno())),
                                     pass_fds=(theirs.fileno(),), cwd=h.dir,
                                     preexec_fn=lambda: [os.close(i) for i in (0, 1, 2)])
        h.popens.append(self.proc)
        theirs.close()

    def call(self, req):
        self.sk.send(req.SerializeToString())
        resp = rpc_pb2.criu_resp()
        resp.ParseFromString(self.sk.recv(1 << 20))
        assert resp.type == req.type
        return resp

    def close(self) -> int:
        self.sk.close()
        return self.proc.wait(30)


def request(kind, images_fd=-1, keep_open=False, **opts):
    req = rpc_pb2.criu_req(type=kind, keep_open=keep_open)
    req.opts.images_dir_fd = images_fd
    for name, value in opts.items():
        setattr(req.opts, name, value)
    return req


def test_dump_and_restore_over_rpc(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.images_dir()
    fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)      # not inheritable: reached by /proc
    try:
        c = Client(h)
        resp = c.call(request(rpc_pb2.DUMP, fd, pid=task.pid, log_level=4, log_file="dump.log"))
        assert resp.success, resp.cr_errmsg
        assert not resp.dump.restored
        assert c.close() == 0
        task.reap()
        assert (images / "dump.log").exists() and (images / f"core-{task.pid}.img").exists()
        last = int(task.log.lines()[-1].split()[1])
        restored = Task(task.pid, task.marker, task.log)
        h.tasks.append(restored)
        c = Client(h)
        resp = c.call(request(rpc_pb2.RESTORE, fd, log_level=4, log_file="restore.log"))
        assert resp.success, resp.cr_errmsg
        assert resp.restore.pid == task.pid
        assert c.close() == 0
    finally:
        os.close(fd)
    task.log.wait(rf"{task.pid} {last + 3}")
    assert restored.running()


def test_version_check_features_and_errors_on_one_connection(h):
    c = Client(h)
    resp = c.call(rpc_pb2.criu_req(type=rpc_pb2.VERSION, keep_open=True))
    assert resp.success and resp.version.name == "criu-py"
    resp = c.call(rpc_pb2.criu_req(type=rpc_pb2.CHECK, keep_open=True))
    assert resp.success, resp.cr_errmsg
    resp = c.call(rpc_pb2.criu_req(type=rpc_pb2.FEATURE_CHECK, keep_open=True))
    assert resp.success and resp.features.mem_track and resp.features.lazy_pages
    fd = os.open(h.images_dir(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        resp = c.call(request(rpc_pb2.DUMP, fd, keep_open=True, pid=4194304))
        assert not resp.success and "no such process 4194304" in resp.cr_errmsg
        resp = c.call(request(rpc_pb2.RESTORE, fd, keep_open=True))
        assert not resp.success and "inventory.img" in resp.cr_errmsg, resp.cr_errmsg
    finally:
        os.close(fd)
    resp = c.call(rpc_pb2.criu_req(type=rpc_pb2.PAGE_SERVER))
    assert not resp.success and "PAGE_SERVER" in resp.cr_errmsg
    assert c.close() == 0


def test_a_failed_rpc_dump_leaves_the_task_running(h):
    task = h.start("unsupported", "socket", ready=r"ready \d+ -?\d+.*")
    fd = os.open(h.images_dir(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        c = Client(h)
        resp = c.call(request(rpc_pb2.DUMP, fd, pid=task.pid))
        assert not resp.success and "packet" in resp.cr_errmsg and "\n" not in resp.cr_errmsg
        c.close()
    finally:
        os.close(fd)
    assert_running_untraced(task)


def test_restore_with_inherit_fd_over_rpc(h):
    """inherit_fd in criu_opts: the client's pipe (not inheritable: reopened through
    /proc) becomes the restored printer's stdout."""
    from test_e2e_inherit_fd import dumped_printer_on_a_pipe, read_lines
    task, inode, images, _ = dumped_printer_on_a_pipe(h, 3)
    r2, w2 = os.pipe()
    fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    try:
        restored = Task(task.pid, task.marker, None)
        h.tasks.append(restored)
        c = Client(h)
        req = request(rpc_pb2.RESTORE, fd, log_level=4, log_file="restore.log")
        req.opts.inherit_fd.add(key=f"pipe:[{inode}]", fd=w2)
        resp = c.call(req)
        assert resp.success, resp.cr_errmsg
        c.close()
        os.close(w2)
        got = [n for n, _ in read_lines(r2, 5)]
    finally:
        os.close(fd)
        os.close(r2)
    assert got == list(range(got[0], got[0] + len(got))) and got[0] > 3
    assert restored.running()
