# `criu-py swrk FD`: CRIU's RPC worker, the way pycriu, go-criu and container runtimes
# drive CRIU. The client makes a SOCK_SEQPACKET pair, starts us with one end as FD and
# sends criu_req messages (proto/rpc.proto, CRIU's numbering); each gets one criu_resp.
# A dump, pre-dump or restore runs in a child of ours exactly as the command line runs
# it (criu_opts mapped to the command's options, its one-line error returned as
# cr_errmsg); the client's images and work dir fds are reached through
# /proc/CLIENT/fd/N, as CRIU does, so the client need not make them inheritable.
import os
import socket
import struct
import tempfile

from criu_py.errors import CriuError

RECV_MAX = 1 << 20
CG_MODES = {0: "ignore", 1: "none", 2: "props", 3: "soft", 4: "full", 5: "strict", 6: "soft"}
LOCKS = {1: "iptables", 2: "nftables", 3: "skip"}
FLAGS = {"leave_running": "leave_running", "ext_unix_sk": "ext_unix_sk",
         "tcp_established": "tcp_established", "shell_job": "shell_job",
         "file_locks": "file_locks", "track_mem": "track_mem", "link_remap": "link_remap",
         "force_irmap": "force_irmap", "tcp_skip_in_flight": "skip_in_flight",
         "tcp_close": "tcp_close", "leave_stopped": "leave_stopped",
         "display_stats": "display_stats"}


def swrk(fd: int) -> int:
    """Serve requests on socket `fd` until the client closes it (or a request without
    keep_open was answered)."""
    from criu_py.images.pb import rpc_pb2
    for std in (0, 1, 2):              # clients close them (pycriu does): keep 0-2 taken
        try:
            os.fstat(std)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != std:
                os.dup2(null, std)
                os.close(null)
    try:
        sk = socket.socket(fileno=fd)
    except OSError as exc:
        raise CriuError(f"swrk: fd {fd} is not a socket: {exc.strerror}") from None
    with sk:
        client = struct.unpack("3i", sk.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   12))[0]
        while True:
            data = sk.recv(RECV_MAX)
            if not data:
                return 0
            req = rpc_pb2.criu_req()
            try:
                req.ParseFromString(data)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
                resp = rpc_pb2.criu_resp(type=rpc_pb2.EMPTY, success=False,
                                         cr_errmsg="a request that does not parse")
                sk.send(resp.SerializeToString())
                return 1
            sk.send(serve(req, client).SerializeToString())
            if not req.keep_open:
                return 0


def serve(req, client: int):
    """The criu_resp to one criu_req."""
    from criu_py.images.pb import rpc_pb2
    resp = rpc_pb2.criu_resp(type=req.type, success=False)
    try:
        if req.type == rpc_pb2.VERSION:
            from criu_py import __version__
            parts = [int(x) for x in __version__.split(".")[:3]] + [0, 0, 0]
            resp.version.major_number, resp.version.minor_number = parts[0], parts[1]
            resp.version.sublevel = parts[2]
            resp.version.name = "criu-py"
            resp.success = True
        elif req.type == rpc_pb2.FEATURE_CHECK:
            from criu_py import kerndat
            facts = kerndat.load(None)
            resp.features.mem_track = bool(facts.mem_tracking)
            resp.features.lazy_pages = bool(facts.uffd_syscall and facts.uffd_missing)
            resp.features.pidfd_store = False
            resp.success = True
        elif req.type == rpc_pb2.CHECK:
            from criu_py import kerndat
            from criu_py.kerndat import check
            verdicts = check.evaluate(kerndat.load(None), None, False)
            resp.success = check.exit_status(verdicts) != 1
            if not resp.success:
                resp.cr_errmsg = "; ".join(f"{v.feature.name}: {v.text}" for v in verdicts
                                           if not v.ok)
        elif req.type in (rpc_pb2.DUMP, rpc_pb2.PRE_DUMP, rpc_pb2.RESTORE):
            command = {rpc_pb2.DUMP: "dump", rpc_pb2.PRE_DUMP: "pre-dump",
                       rpc_pb2.RESTORE: "restore"}[req.type]
            opened = []
            try:
                opts = options(command, req.opts, client, opened)
                ok, message, pid = run_in_child(command, opts)
            finally:
                for fd in opened:
                    os.close(fd)
            resp.success = ok
            if not ok:
                resp.cr_errmsg = message
            elif command == "restore":
                resp.restore.pid = pid
            else:
                resp.dump.restored = False
        else:
            name = rpc_pb2.criu_req_type.Name(req.type) if req.type in \
                rpc_pb2.criu_req_type.values() else str(req.type)
            resp.cr_errmsg = f"criu-py does not serve {name} requests"
    except CriuError as exc:
        resp.success = False
        resp.cr_errmsg = str(exc)
    return resp


def _client_path(client: int, fd: int, what: str) -> str:
    """The path of the client's fd: where its /proc link points when that is the same
    directory for us, else the /proc link itself."""
    link = f"/proc/{client}/fd/{fd}"
    try:
        target = os.readlink(link)
        st = os.stat(link)
    except OSError as exc:
        raise CriuError(f"{what}: the client's fd {fd}: {exc.strerror}") from None
    try:
        if os.path.samestat(os.stat(target), st):
            return target
    except OSError:
        pass
    return link


def options(command: str, o, client: int, opened: list) -> dict:
    """The command line options of `command` for the criu_opts `o`."""
    from criu_py.options import COMMANDS
    table = COMMANDS[command]
    known = {opt.dest for opt in table}
    opts = {opt.dest: opt.default for opt in table}
    if o.images_dir_fd >= 0:
        opts["images_dir"] = _client_path(client, o.images_dir_fd, "images_dir_fd")
    elif o.HasField("images_dir"):
        opts["images_dir"] = os.path.join(f"/proc/{client}/cwd", o.images_dir)
    else:
        raise CriuError("neither images_dir_fd nor images_dir is set")
    if o.HasField("work_dir_fd") and o.work_dir_fd >= 0:
        opts["work_dir"] = _client_path(client, o.work_dir_fd, "work_dir_fd")
    if o.HasField("log_file"):
        if "/" in o.log_file:
            raise CriuError(f"log_file {o.log_file!r}: a name in the work dir, without '/'")
        opts["log_file"] = o.log_file
    opts["verbosity"] = min(max(o.log_level, 0), 4)
    if command != "restore":
        if not o.HasField("pid"):
            raise CriuError("opts.pid is not set (criu-py does not dump its caller)")
        opts["pid"] = o.pid
    for field, dest in FLAGS.items():
        if o.HasField(field) and dest in known:
            opts[dest] = getattr(o, field)
    if o.HasField("parent_img"):
        opts["prev_images_dir"] = o.parent_img
    if o.HasField("manage_cgroups_mode"):
        opts["manage_cgroups"] = CG_MODES[o.manage_cgroups_mode]
    if o.HasField("network_lock") and "network_lock" in known:
        opts["network_lock"] = LOCKS[o.network_lock]
    if o.HasField("ghost_limit") and "ghost_limit" in known:
        opts["ghost_limit"] = str(o.ghost_limit)
    if o.HasField("timeout") and "timeout" in known:
        opts["timeout"] = o.timeout
    for field in ("cgroup_props", "cgroup_props_file", "cgroup_yard"):
        if o.HasField(field) and field in known:
            opts[field] = getattr(o, field)
    if o.cgroup_dump_controller and "cgroup_dump_controller" in known:
        opts["cgroup_dump_controller"] = tuple(o.cgroup_dump_controller)
    if o.cg_root:
        opts["cgroup_root"] = tuple(f"{r.ctrl}:{r.path}" if r.HasField("ctrl") else r.path
                                    for r in o.cg_root)
    if o.irmap_scan_paths and "irmap_scan_path" in known:
        opts["irmap_scan_path"] = tuple(o.irmap_scan_paths)
    if o.inherit_fd:
        if command != "restore":
            raise CriuError("inherit_fd is for restore requests")
        opts["inherit_fd"] = tuple(f"fd[{_client_fd(client, i.fd, i.key, opened)}]:{i.key}"
                                   for i in o.inherit_fd)
    if command == "restore":
        opts["detach"] = True
    return opts


def _client_fd(client: int, fd: int, key: str, opened: list) -> int:
    """Our fd for the client's fd: the same number when we inherited it (the only way
    for a socket), else the client's file opened again through /proc with its access
    mode and O_APPEND (a pipe, a regular file)."""
    link = f"/proc/{client}/fd/{fd}"
    try:
        theirs = os.stat(link)
        with open(f"/proc/{client}/fdinfo/{fd}") as f:
            flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
    except (OSError, StopIteration) as exc:
        raise CriuError(f"inherit_fd {key}: the client's fd {fd}: "
                        f"{getattr(exc, 'strerror', None) or 'not open'}") from None
    try:
        if os.path.samestat(os.fstat(fd), theirs):
            return fd
    except OSError:
        pass
    try:
        ours = os.open(link, flags & (os.O_ACCMODE | os.O_APPEND) | os.O_CLOEXEC)
    except OSError as exc:
        raise CriuError(f"inherit_fd {key}: cannot reach the client's fd {fd} "
                        f"({exc.strerror}): let the worker inherit it") from None
    opened.append(ours)
    return ours


def run_in_child(command: str, opts: dict) -> tuple[bool, str, int]:
    """Run the command as the command line would, in a child: (ok, its one-line error,
    the restored root's pid)."""
    from criu_py.commands import RUNNERS
    tmp = tempfile.mkdtemp(prefix="criu-py-swrk-")
    pidfile = os.path.join(tmp, "pid")
    if command == "restore":
        opts["pidfile"] = pidfile
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                import sys
                os.close(r)
                os.dup2(w, 2)
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                from criu_py import interrupts
                interrupts.install()
                RUNNERS[command](opts)            # leaves through os._exit
            finally:
                os._exit(70)
        os.close(w)
        w = -1
        err = b""
        while chunk := os.read(r, 65536):
            err += chunk
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        lines = [x for x in err.decode(errors="replace").splitlines() if x.startswith("Error: ")]
        message = lines[-1][len("Error: "):] if lines else f"{command} exited with {rc}"
        root = 0
        if rc == 0 and command == "restore":
            with open(pidfile) as f:
                root = int(f.read())
        return rc == 0, message, root
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass
        os.rmdir(tmp)
