# `criu-py dump`: freeze the tree rooted at one PID (every thread of every process),
# collect everything the restore needs, write CRIU images, then kill the tree (or let it
# run on with --leave-running). dump_tasks() is the checklist; each step is a small
# function below, looping over processes and threads. Every refusal happens before the
# first image is written, and whatever happens no task is left stopped or traced: the
# ExitStack releases the tree (putting back any injected code and registers first).
import contextlib
import functools
import os
import time

from criu_py.errors import AccessDenied, NoSuchProcess, Unsupported
from criu_py.log import log
from criu_py.log import step as log_step


def dump_tasks(opts: dict) -> int:
    from criu_py.images import integrity
    pid = opts["pid"]
    t0 = time.monotonic()
    step = functools.partial(log_step, "dump")
    with contextlib.ExitStack() as stack:
        with step("check target"):
            check_target(pid)
            if opts.get("ghost_limit") is not None:
                from criu_py.files.ghost import parse_size
                parse_size(opts["ghost_limit"])
        with step("open images dir"):
            images = stack.enter_context(open_images_dir(opts))
        with step("load modules"):
            load_modules()
        from criu_py.dump.context import DumpContext
        from criu_py.dump.tree import Tree
        ctx = DumpContext(pid, opts, images)
        stack.callback(ctx.close)
        from criu_py.files.sockets.netlock import new_run_id
        ctx.run_id = new_run_id()
        with step("freeze the tree"):
            t_freeze = time.monotonic()
            ctx.tree = stack.enter_context(Tree(pid))
            ctx.tree.freeze()
            t_frozen = time.monotonic()
            ctx.times["freezing"] = int((t_frozen - t_freeze) * 1e6)
        with step("refuse unsupported"):
            refuse_unsupported(ctx)
        with step("shared kernel objects"):
            find_shared_objects(ctx)
        with step("registers and signal masks"):
            collect_registers(ctx)
        with step("plan memory"):
            plan_memory(ctx)
        with step("in-task state (parasite)"):
            collect_in_task_state(ctx)
        with step("task state from /proc"):
            collect_proc_state(ctx)
        with step("plan files"):
            plan_files(ctx)
        with step("SysV semaphores and queues"):
            from criu_py import sysvipc
            sysvipc.plan_objects(ctx)
        with step("vfork parents"):
            release_vfork_parents(ctx)
        with step("cgroups"):
            dump_cgroups(ctx)
        # ---- every check passed: images from here on
        with step("write memory"):
            write_memory(ctx)
        with step("write core, mm, ids, fs"):
            write_task_images(ctx)
        with step("write files"):
            write_file_images(ctx)
        with step("write pstree, inventory"):
            write_tree_images(ctx)
        with step("kill or release the tree"):
            from criu_py import interrupts
            interrupts.hold()          # the images are complete: finish, whatever comes
            finish_tree(ctx)
            ctx.times["frozen"] = int((time.monotonic() - t_frozen) * 1e6)
        with step("write stats"):
            write_stats(ctx)
        integrity.seal(images)
    log.info("dump of %d (%d processes, %d threads) done in %.1f ms", pid, len(ctx.procs),
             sum(len(p.threads) for p in ctx.procs), (time.monotonic() - t0) * 1e3)
    return 0


# ------------------------------------------------------------------ checks
def check_target(pid: int) -> None:
    from criu_py import proc
    if pid <= 0:
        raise NoSuchProcess(f"invalid pid {pid}")
    if pid == os.getpid() or pid == os.getppid():
        raise Unsupported(f"pid {pid} is criu-py itself or its parent")
    if not proc.pid_exists(pid):
        raise NoSuchProcess(f"no such process {pid}")
    status = proc.read_status(pid)
    if status.tgid != pid:
        raise Unsupported(f"pid {pid} is a thread of {status.tgid}: dump the process")
    if status.state == "Z":
        raise NoSuchProcess(f"pid {pid} is a zombie")
    if status.state in ("T", "t") and status.tracer_pid == 0:
        raise Unsupported(f"pid {pid} is stopped: stopped tasks are not supported")
    if status.tracer_pid:
        raise AccessDenied(f"pid {pid} is already traced by pid {status.tracer_pid}")
    st = proc.read_stat(pid)
    if st.flags & 0x00200000:         # PF_KTHREAD
        raise Unsupported(f"pid {pid} is a kernel thread")


def open_images_dir(opts: dict):
    from criu_py.images import ImageDir
    return ImageDir(opts.get("images_dir") or ".", create=True)


def load_modules() -> None:
    """Import what the frozen part needs now, so the task is not frozen while Python
    loads protobuf descriptors and the native module (most of a small dump's time)."""
    import criu_py.cgroup.dump  # noqa: F401
    import criu_py.dump.context  # noqa: F401
    import criu_py.dump.parasite  # noqa: F401
    import criu_py.dump.task  # noqa: F401
    import criu_py.dump.tree  # noqa: F401
    import criu_py.files.regular  # noqa: F401
    import criu_py.mem.dump  # noqa: F401
    import criu_py.native  # noqa: F401
    from criu_py.images.pb import (core_pb2, fdinfo_pb2, fs_pb2, inventory_pb2,  # noqa: F401
                                   mm_pb2, pagemap_pb2, pstree_pb2, stats_pb2)


def refuse_unsupported(ctx) -> None:
    """What this version cannot dump, refused while the tree is frozen and before any
    image: other namespaces than ours, seccomp, a session or process group that belongs
    to a live process outside the tree. (Fds and terminals: plan_files.)"""
    from criu_py import proc
    from criu_py.dump.context import ProcDump
    tree = ctx.tree
    ours = proc.read_ns_ids(os.getpid())
    shell_job = ctx.opts.get("shell_job")
    for p in tree.order:
        if p.zombie:
            continue
        pd = ProcDump(ctx, p)
        ctx.procs.append(pd)
        pid = p.pid
        pd.stat = proc.read_stat(pid)
        pd.status = proc.read_status(pid)
        pd.timers = proc.read_timers(pid)
        theirs = proc.read_ns_ids(pid)
        for name in sorted(set(ours) & set(theirs)):
            if ours[name] != theirs[name]:
                raise Unsupported(f"pid {pid} lives in another {name} namespace: namespaces "
                                  f"are not supported")
        if p.vfork_child:
            if ctx.opts.get("leave_running"):
                raise Unsupported(f"pid {pid} waits in vfork() for its child {p.vfork_child}, "
                                  f"which only ends when the child does: cannot dump it "
                                  f"with --leave-running")
            if len(p.tracees) > 1:
                raise Unsupported(f"pid {pid} waits in vfork() while other threads run: "
                                  f"not supported")
        try:
            pd.pidfd = os.pidfd_open(pid)
        except OSError as exc:
            from criu_py.errors import from_oserror
            raise from_oserror(exc, "pidfd_open", pid) from None
    root = tree.procs[tree.root]
    if not shell_job and (root.sid != root.pid or root.pgid != root.pid):
        raise Unsupported(f"pid {root.pid} is not a session and group leader (sid {root.sid}, "
                          f"pgid {root.pgid}): start it with setsid or use --shell-job")
    for p in tree.order:
        # A session or group id is restorable when it names a process of the tree, one
        # that no longer exists (restore recreates it with a helper task), or the
        # root's own (inherited from the caller with --shell-job).
        for what, ident, roots in (("session", p.sid, root.sid), ("process group", p.pgid, root.pgid)):
            if ident in tree.procs or ident == roots or not proc.pid_exists(ident):
                continue
            raise Unsupported(f"pid {p.pid}: its {what} {ident} belongs to a process "
                              f"outside the tree")


def find_shared_objects(ctx) -> None:
    """kcmp ids of every process's mm, fd table, fs and signal handlers; sharing that
    this version cannot restore is refused here."""
    ctx.tree.number_kernel_objects()
    seen = {}
    for pd in ctx.procs:
        p = pd.proc
        parent = ctx.tree.procs.get(p.ppid)
        for kind in ("vm", "sighand"):
            other = seen.get((kind, p.kobj[kind]))
            # A child running in its parent's memory (vfork(), or clone(CLONE_VM) with or
            # without CLONE_SIGHAND) is made by its parent's restorer: it may share both
            # with its parent, as long as it has no children of its own.
            if other is not None and parent is not None and other == parent.pid and \
                    p.kobj["vm"] == parent.kobj["vm"]:
                if p.children:
                    raise Unsupported(f"pid {p.pid} runs in its parent's memory and has "
                                      f"children of its own: not supported")
                continue
            if other is not None:
                raise Unsupported(f"pid {p.pid} shares its {'memory' if kind == 'vm' else 'signal handlers'} "
                                  f"with pid {other} (CLONE_{kind.upper()} without CLONE_THREAD), "
                                  f"which is not its parent: not supported")
            seen[(kind, p.kobj[kind])] = p.pid


# ------------------------------------------------------------------ collect
def collect_registers(ctx, procs=None) -> None:
    from criu_py import arch_x86
    from criu_py.dump.context import ThreadDump
    for pd in procs or ctx.stopped():
        for tid in pd.proc.threads:
            t = pd.proc.tracees[tid]
            th = ThreadDump(tid=tid, tracee=t)
            th.raw_gpregs = t.get_gpregs()
            th.gpregs = arch_x86.gpregs_from_bytes(th.raw_gpregs)
            if th.gpregs["cs"] != 0x33:
                raise Unsupported(f"pid {pd.pid} thread {tid} runs in 32-bit mode "
                                  f"(cs {th.gpregs['cs']:#x})")
            th.xstate = t.get_xstate()
            th.sigmask = t.get_sigmask()
            th.rseq = t.get_rseq()
            th.signals_private = t.pending_signals(shared=False)
            pd.threads.append(th)
            log.debug("pid %d tid %d: ip %#x sp %#x ax %#x orig_ax %#x, xstate %d bytes, "
                      "sigmask %#x", pd.pid, tid, th.gpregs["ip"], th.gpregs["sp"],
                      th.gpregs["ax"], th.gpregs["orig_ax"], len(th.xstate), th.sigmask)
        pd.signals_shared = pd.tracee.pending_signals(shared=True)


def collect_in_task_state(ctx, procs=None) -> None:
    from criu_py.dump import parasite
    for pd in procs or ctx.stopped():
        others = [th.tracee for th in pd.threads[1:]]
        pd.parasite = parasite.collect(pd.tracee, pd.leader.raw_gpregs, others)
        for th in pd.threads:
            th.info = pd.parasite.threads[th.tid]
        if pd.timers:
            from criu_py.dump import timers
            pd.posix_timers = timers.collect(pd)
        log.debug("pid %d: parasite ran with %d injected runs; brk %#x",
                  pd.pid, pd.parasite.injected_calls, pd.parasite.brk)


def collect_proc_state(ctx, procs=None) -> None:
    from criu_py import proc
    from criu_py.dump import task
    from criu_py.errors import from_oserror
    from criu_py.files.regular import mapped_file_id
    for pd in procs or ctx.stopped():
        pid = pd.pid
        for th in pd.threads:
            tid = th.tid
            th.status = proc.read_status(pid, tid)
            if th.status.seccomp:
                raise Unsupported(f"pid {pid} thread {tid} uses seccomp (mode "
                                  f"{th.status.seccomp}): not supported")
            th.comm = proc.read_comm(pid, tid)
            th.robust_list = task.robust_list(tid)
            try:
                th.sched_policy = os.sched_getscheduler(tid)
                th.sched_prio = os.sched_getparam(tid).sched_priority
                th.sched_nice = os.getpriority(os.PRIO_PROCESS, tid)
            except OSError as exc:
                raise from_oserror(exc, "reading the scheduling policy", tid) from None
        pd.personality = proc.read_personality(pid)
        pd.rlimits = proc.read_limits(pid)
        pd.loginuid = proc.read_loginuid(pid)
        pd.oom_score_adj = proc.read_oom_score_adj(pid)
        pd.auxv = proc.read_auxv(pid)
        pd.ns_ids = task.namespace_ids(pid)
        exe = proc.read_link(pid, "exe")
        pd.exe_id = mapped_file_id(pd, exe, os.stat(f"/proc/{pid}/exe"), os.O_RDONLY,
                                   f"/proc/{pid}/exe", f"pid {pid}: its executable")


def plan_memory(ctx, procs=None) -> None:
    from criu_py import proc
    from criu_py.mem import dump as memdump
    for pd in procs or ctx.stopped():
        pd.vma_plans = memdump.plan_vmas(pd.pid, proc.read_smaps(pd.pid), pd)


def plan_files(ctx) -> None:
    """For every fd table (once, even when processes share it): classify every fd
    (refusing unknown kinds), give each its files.img id (one per open file description
    in the whole tree), read pipe and fifo contents and file locks; kinds that name
    other fds (epoll targets, a pty slave's master) get their ids last. Then every
    process's cwd and root, and its controlling terminal."""
    from criu_py import proc
    from criu_py.dump.context import FdPlan
    from criu_py.files import FILE_KINDS, O_CLOEXEC, FdRef, classify
    from criu_py.files.locks import note_locks
    from criu_py.files.regular import path_entry_id
    tables = {}
    for pd in ctx.procs:
        if pd.proc.kobj["files"] in tables:
            continue
        tables[pd.proc.kobj["files"]] = pd
        pid = pd.pid
        refs = []
        for fd in proc.list_fds(pid):
            info = proc.read_fdinfo(pid, fd)
            refs.append(FdRef(pid=pid, fd=fd, link=proc.read_fd_link(pid, fd),
                              st=proc.stat_fd(pid, fd), pos=info.pos, flags=info.flags,
                              mnt_id=info.mnt_id, info=info))
        for ref in refs:                      # all refusals first
            kind = classify(ref)
            FILE_KINDS[kind].check(pd, ref)
            plan = FdPlan(ref=ref, kind=kind, cloexec=bool(ref.flags & O_CLOEXEC))
            pd.fds.append(plan)
            ctx.fd_index.setdefault((ref.st.st_dev, ref.st.st_ino), []).append((pid, ref.fd, plan))
    for late in (False, True):
        for pd in tables.values():
            for p in pd.fds:
                if FILE_KINDS[p.kind].late == late:
                    p.file_id = FILE_KINDS[p.kind].dump_fd(pd, p.ref)
                    log.debug("pid %d fd %d: %s %s -> file id %d", pd.pid, p.ref.fd, p.kind,
                              p.ref.link, p.file_id)
    for pd in tables.values():
        for p in pd.fds:
            finish = getattr(FILE_KINDS[p.kind], "finish", None)
            if finish is not None:
                finish(pd, p.ref, p.file_id)
            note_locks(pd, p)
    for pd in ctx.procs:
        for name in ("cwd", "root"):
            path = proc.read_link(pd.pid, name)
            if path.endswith(" (deleted)"):
                raise Unsupported(f"pid {pd.pid}: its {name} {path} was deleted")
            fid = path_entry_id(pd.files, path, os.stat(f"/proc/{pd.pid}/{name}"))
            setattr(pd, f"{name}_id", fid)
    check_terminals(ctx)


def check_terminals(ctx) -> None:
    """A controlling terminal must be a pty whose master the tree holds, or the
    caller's (--shell-job)."""
    from criu_py.files.tty import PTS_MAJOR, pty_masters
    for pd in ctx.procs:
        tty = pd.stat.tty_nr
        if not tty or ctx.opts.get("shell_job"):
            continue
        if os.major(tty) == PTS_MAJOR and os.minor(tty) in pty_masters(ctx):
            continue
        raise Unsupported(f"pid {pd.pid} has a controlling terminal: use --shell-job")


def release_vfork_parents(ctx) -> None:
    """A parent sleeping in vfork() cannot be stopped until its child exits: with
    everything else collected and checked, the child is ended (its state is in hand),
    the parent stops on its way out of vfork() (ax = the child's pid), and is collected
    like the others. Its SIGCHLD for that exit is not part of its state: dropped."""
    import signal
    import struct
    from criu_py import interrupts
    for pd in ctx.procs:
        vpid = pd.proc.vfork_child
        if not vpid:
            continue
        interrupts.hold()              # once the child is gone, the dump must go on
        ctx.tree.procs[vpid].leader.kill(wait=True)
        pd.tracee.wait_stopped(drop=(signal.SIGCHLD,))
        collect_registers(ctx, [pd])
        # siginfo: si_signo at 0, si_pid at 16
        pd.signals_shared = [raw for raw in pd.signals_shared
                             if struct.unpack_from("<i12xi", raw) != (signal.SIGCHLD, vpid)]
        plan_memory(ctx, [pd])
        collect_in_task_state(ctx, [pd])
        collect_proc_state(ctx, [pd])
        log.info("pid %d: out of vfork() once its child %d was ended", pd.pid, vpid)


def dump_cgroups(ctx) -> None:
    """Every task's cgroup set (core.tc.cg_set, thread_core.cg_set) and cgroup.img."""
    from criu_py.cgroup.dump import dump_cgroups as dump
    threads = {pd.pid: [th.tid for th in pd.threads] for pd in ctx.procs}
    ctx.cg_sets = dump([pd.pid for pd in ctx.procs], ctx.opts, ctx.images, threads=threads)


# ------------------------------------------------------------------ write
def write_memory(ctx) -> None:
    from criu_py.mem import dump as memdump
    for pd in ctx.procs:
        pd.pages_id = ctx.alloc_pages_id()
        if pd.in_parents_memory:
            # a vfork() child: its memory is its parent's, dumped there
            memdump.write_no_pages(ctx.images, pd.pages_id, pd.pid)
            continue
        pd.page_stats = memdump.dump_private_pages(pd.pid, pd.vma_plans, ctx.images,
                                                   pd.pages_id, pd.pid, ctx.opts.get("kdat"))
    if ctx.shmem:
        from criu_py.mem import shmem
        shmem.write_images(ctx)


def write_task_images(ctx) -> None:
    from criu_py.dump import task
    for pd in ctx.procs:
        pid = pd.pid
        for th in pd.threads:
            ctx.images.write_entries(f"core-{th.tid}.img", [task.build_core(pd, th)])
        ctx.images.write_entries(f"mm-{pid}.img", [task.build_mm(pd, [p.entry for p in pd.vma_plans])])
        ctx.images.write_entries(f"ids-{pid}.img", [task.build_ids(pd)])
        ctx.images.write_entries(f"fs-{pid}.img", [task.build_fs(pd)])
    for p in ctx.tree.order:
        if p.zombie:
            ctx.images.write_entries(f"core-{p.pid}.img", [task.build_zombie_core(p)])


def write_file_images(ctx) -> None:
    from criu_py.files import FD_CLOEXEC, FILE_KINDS, ghost, identity, tty
    from criu_py.files.pipe import pipes_data_entries
    from criu_py.images.pb import fdinfo_pb2
    written = set()
    for pd in ctx.procs:
        files_id = pd.proc.kobj["files"]
        if files_id in written:
            continue
        written.add(files_id)
        fdinfos = []
        for p in pd.fds:
            e = fdinfo_pb2.fdinfo_entry()
            e.id = p.file_id
            e.flags = FD_CLOEXEC if p.cloexec else 0
            e.type = FILE_KINDS[p.kind].fd_type
            e.fd = p.ref.fd
            fdinfos.append(e)
        ctx.images.write_entries(f"fdinfo-{files_id}.img", fdinfos)
    ctx.images.write_entries("files.img", ctx.files.entries)
    identity.write_image(ctx.images, ctx.files)
    for name, table in (("pipes-data.img", ctx.pipe_data), ("fifo-data.img", ctx.fifo_data)):
        data = pipes_data_entries(table)
        if data:
            ctx.images.write_entries_with_payload(name, data)
    ghost.write_images(ctx)
    tty.write_info_images(ctx)
    if ctx.sockets is not None:
        ctx.sockets.write_images()
    if ctx.file_locks:
        ctx.images.write_entries("filelocks.img", ctx.file_locks)
    if ctx.sysv is not None:
        ctx.sysv.write_images(ctx)


def write_tree_images(ctx) -> None:
    from criu_py.dump import task
    ctx.images.write_entries("pstree.img", task.build_pstree(ctx.tree))
    ctx.images.write_entries("inventory.img", [task.build_inventory(ctx)])


def finish_tree(ctx) -> None:
    """Kill the tree (its TCP connections in repair mode close without a packet; the
    network lock stays for the restore to lift), or let it run on (connections out of
    repair mode and the lock lifted first)."""
    if ctx.opts.get("leave_running"):
        if ctx.sockets is not None:
            ctx.sockets.rollback()
        ctx.tree.release()
        log.info("the tree of %d left running", ctx.pid)
    else:
        ctx.tree.kill_all()
        if ctx.sockets is not None:
            ctx.sockets.commit()
        log.info("the tree of %d killed after the dump", ctx.pid)


def write_stats(ctx) -> None:
    from criu_py.dump import task
    ctx.images.write_entries("stats-dump", [task.build_stats(ctx)])
