# `criu-py dump`: freeze the tree rooted at one PID (every thread of every process),
# collect everything the restore needs, write CRIU images, then kill the tree (or let it
# run on with --leave-running). dump_tasks() is the checklist; each step is a small
# function below, looping over processes and threads. Every refusal happens before the
# first image is written, and whatever happens no task is left stopped or traced: the
# ExitStack releases the tree (putting back any injected code and registers first).
import contextlib
import functools
import gc
import os
import time

from criu_py.errors import AccessDenied, CriuError, NoSuchProcess, Unsupported
from criu_py.log import log
from criu_py.log import step as log_step


def dump_tasks(opts: dict) -> int:
    """`dump`, and with opts["pre_dump"] `pre-dump`: the same steps, a pre-dump taking
    only the memory (copied once the tree runs again) and tracking what changes next."""
    from criu_py.images import integrity
    pid = opts["pid"]
    pre = bool(opts.get("pre_dump"))
    t0 = time.monotonic()
    step = functools.partial(log_step, "pre-dump" if pre else "dump")
    with contextlib.ExitStack() as stack:
        gc.disable()        # no collector pause while modules load and the tree is frozen
        stack.callback(gc.enable)
        with step("check target"):
            check_target(pid)
            if (opts.get("timeout") or 0) < 0:
                raise CriuError(f"--timeout {opts['timeout']}: seconds, 0 or more")
            if opts.get("ghost_limit") is not None:
                from criu_py.files.ghost import parse_size
                parse_size(opts["ghost_limit"])
        if opts.get("action_script") and not pre:
            with step("pre-dump scripts"):
                from criu_py import scripts
                scripts.run(opts, "pre-dump", pid)
        with step("open images dir"):
            images = stack.enter_context(open_images_dir(opts))
        with step("load modules"):
            load_modules()
            gc.freeze()     # what the imports made is never scanned by a later collection
            stack.callback(gc.unfreeze)
        from criu_py.dump.context import DumpContext
        from criu_py.dump.tree import Tree
        ctx = DumpContext(pid, opts, images)
        stack.callback(ctx.close)
        from criu_py.files.sockets.netlock import new_run_id
        ctx.run_id = new_run_id()
        with step("previous images"):
            open_previous(ctx, stack)
        if opts.get("page_server") or opts.get("lazy_pages"):
            with step("page server"):
                open_page_server(ctx, stack)
        with step("read big memory maps"):
            preread_smaps(ctx)
            prepare_page_buffer(ctx)
        with step("snapshot: protect memory"):
            start_snapshot(ctx, stack)
        with step("freeze the tree"):
            stack.callback(frozen_priority())
            t_freeze = time.monotonic()
            ctx.tree = stack.enter_context(Tree(pid))
            ctx.tree.freeze(opts.get("timeout") or 0)
            t_frozen = time.monotonic()
            ctx.dump_uptime = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000
            ctx.times["freezing"] = int((t_frozen - t_freeze) * 1e6)
        with step("refuse unsupported"):
            refuse_unsupported(ctx)
        with step("shared kernel objects"):
            find_shared_objects(ctx)
        with step("registers and signal masks"):
            collect_registers(ctx)
        with step("plan memory"):
            plan_memory(ctx)
        if not pre:
            with step("in-task state (parasite)"):
                collect_in_task_state(ctx)
            with step("task state from /proc"):
                collect_proc_state(ctx)
        with step("plan files"):
            plan_files(ctx)
        if not pre:
            with step("SysV semaphores and queues"):
                from criu_py import sysvipc
                sysvipc.plan_objects(ctx)
            with step("vfork parents"):
                release_vfork_parents(ctx)
            with step("cgroups"):
                dump_cgroups(ctx)
        with step("memory tracking, page scan"):
            scan_memory(ctx)
        # ---- every check passed: images from here on
        if pre:
            with step("release the tree"):
                finish_tree(ctx)
                ctx.times["frozen"] = int((time.monotonic() - t_frozen) * 1e6)
                gc.enable()
                frozen_priority(restore=True)
            with step("write memory"):
                write_memory(ctx)
            with step("irmap cache"):
                write_irmap_cache(ctx)
            with step("write inventory"):
                write_inventory(ctx)
        else:
            with step("write memory"):
                write_memory(ctx)
                end_page_server_session(ctx)
            with step("write core, mm, ids, fs"):
                write_task_images(ctx)
            with step("write files"):
                write_file_images(ctx)
            with step("write pstree, inventory"):
                write_tree_images(ctx)
            with step("wait for the memory copy"):
                wait_memory_copies(ctx)
            with step("wait for the image writes"):
                finish_image_writes(ctx)   # every image on disk before the tree may go
            with step("kill or release the tree"):
                from criu_py import interrupts
                interrupts.hold()          # the images are complete: finish, whatever comes
                # with action scripts, a tree to be killed waits for post-dump's word
                ctx.kill_after_scripts = bool(opts.get("action_script")) and \
                    not opts.get("leave_running") and ctx.lazy_kept is None
                if not ctx.kill_after_scripts:
                    finish_tree(ctx)
                ctx.times["frozen"] = int((time.monotonic() - t_frozen) * 1e6)
                gc.enable()                 # its first collection comes after the freeze
                frozen_priority(restore=True)
            with step("snapshot: copy memory"):
                copy_snapshot(ctx)
            with step("write copied memory"):
                write_deferred_memory(ctx)
        with step("parent link, memory tracking"):
            finish_tracking(ctx)
        with step("write stats"):
            write_stats(ctx)
            images.finish_writes()
        integrity.seal(images)
        if opts.get("action_script") and not pre:
            with step("post-dump scripts"):
                post_dump_scripts(ctx)
        if opts.get("display_stats"):
            from criu_py.stats import display
            display(ctx.stats)
        if ctx.lazy_kept is not None:
            with step("serve lazy pages"):
                from criu_py.dump import lazy
                lazy.serve(ctx)
    log.info("%s of %d (%d processes, %d threads) done in %.1f ms",
             "pre-dump" if pre else "dump", pid, len(ctx.procs),
             sum(len(p.threads) for p in ctx.procs), (time.monotonic() - t0) * 1e3)
    return 0


FROZEN_NICE = -10
_NORMAL_NICE = None


def frozen_priority(restore: bool = False):
    """While the tree is frozen it waits for us alone: run ahead of ordinary work (the
    task we kill or wake would otherwise take the CPU from us first). Best effort;
    returns the function that puts the old priority back."""
    global _NORMAL_NICE
    if restore:
        if _NORMAL_NICE is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, _NORMAL_NICE)
            _NORMAL_NICE = None
        return None
    with contextlib.suppress(OSError):
        _NORMAL_NICE = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, min(_NORMAL_NICE, FROZEN_NICE))
    return lambda: frozen_priority(restore=True)


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
    if status.tracer_pid:
        raise AccessDenied(f"pid {pid} is already traced by pid {status.tracer_pid}")
    st = proc.read_stat(pid)
    if st.flags & 0x00200000:         # PF_KTHREAD
        raise Unsupported(f"pid {pid} is a kernel thread")


def open_images_dir(opts: dict):
    from criu_py.images import ImageDir
    return ImageDir(opts.get("images_dir") or ".", create=True, crc_on_write=True,
                    background=True)


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
    import criu_py.mem.chain  # noqa: F401
    import criu_py.track  # noqa: F401
    import criu_py.track.uffd  # noqa: F401
    import criu_py.cgroup.props  # noqa: F401
    import criu_py.files.ghost  # noqa: F401
    import criu_py.files.identity  # noqa: F401
    import criu_py.files.locks  # noqa: F401
    import criu_py.irmap.handles  # noqa: F401
    import criu_py.restore.sigframe  # noqa: F401   (injection frames)
    import criu_py.sysvipc  # noqa: F401
    import mmap  # noqa: F401   (page buffers)
    from criu_py.images.pb import (core_pb2, fdinfo_pb2, fs_pb2, inventory_pb2,  # noqa: F401
                                   mm_pb2, pagemap_pb2, pstree_pb2, stats_pb2,
                                   file_ident_pb2, ghost_file_pb2, pipe_data_pb2,
                                   remap_file_path_pb2, time_pb2)
    from criu_py.ptrace import landing_offset
    landing_offset()                   # reads our own vdso once (cached)


def refuse_unsupported(ctx) -> None:
    """What this version cannot dump, refused while the tree is frozen and before any
    image: other namespaces than ours, seccomp, a session or process group that belongs
    to a live process outside the tree, a frozen cgroup. (Fds and terminals: plan_files.)"""
    from criu_py import proc
    from criu_py.cgroup import frozen_cgroup
    from criu_py.dump.context import ProcDump
    tree = ctx.tree
    ours = proc.read_ns_ids(os.getpid())
    shell_job = ctx.opts.get("shell_job")
    frozen = {}
    for p in tree.order:
        if p.zombie:
            continue
        pd = ProcDump(ctx, p)
        ctx.procs.append(pd)
        pid = p.pid
        pd.cgroups = proc.read_cgroup(pid)
        where = frozen_cgroup(pd.cgroups, frozen)
        if where:
            raise Unsupported(f"pid {pid} is in the frozen cgroup {where}: it would not run "
                              f"the dump's code; thaw it first")
        pd.stat = proc.read_stat(pid)
        pd.status = proc.read_status(pid)
        pd.swapped = pd.status.vm_swap > 0
        pd.timers = proc.read_timers(pid)
        theirs = pd.ns_inodes = proc.read_ns_ids(pid)
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


def open_previous(ctx, stack) -> None:
    """--prev-images-dir and --track-mem: the parent images and the memory tracking
    state (track/); on a failed dump the state goes back to its holder untouched."""
    from criu_py.track import Tracking
    ctx.track = Tracking(ctx)
    stack.callback(_abort_tracking, ctx)
    ctx.track.open_previous()


def open_page_server(ctx, stack) -> None:
    """dump --page-server: connect to the page server (its session ends once every
    page is there, before the tree is killed); dump --lazy-pages: listen for the
    lazy-pages daemon now, so that a taken port fails the dump before the freeze."""
    opts = ctx.opts
    if opts.get("page_server") and opts.get("lazy_pages"):
        raise CriuError("--page-server and --lazy-pages do not go together: --lazy-pages "
                        "serves the lazy pages itself on --address/--port")
    if opts.get("pre_dump") or opts.get("track_mem") or opts.get("leave_running"):
        raise CriuError("--page-server and --lazy-pages dump a tree once: not with "
                        "--track-mem or --leave-running")
    if opts.get("port") is None:
        raise CriuError("--page-server and --lazy-pages need --port")
    if opts.get("page_server"):
        from criu_py.pageserver.client import Sink
        ctx.page_sink = Sink(opts.get("address"), opts["port"])
        stack.callback(_abort_page_server, ctx)
    else:
        from criu_py import pageserver
        from criu_py.dump.lazy import KeptMemory
        ctx.lazy_listen = pageserver.listen(opts.get("address"), opts["port"])
        stack.callback(ctx.lazy_listen.close)
        ctx.lazy_kept = KeptMemory()
        stack.callback(ctx.lazy_kept.close)


def _abort_page_server(ctx) -> None:
    if ctx.page_sink is not None:
        ctx.page_sink.abort()
        ctx.page_sink = None


def end_page_server_session(ctx) -> None:
    """The page server has written every page (or the dump fails, the tree unharmed)."""
    if ctx.page_sink is not None:
        sink, ctx.page_sink = ctx.page_sink, None
        sink.close()
        log.info("dump: %d MiB sent to the page server %s", sink.bytes >> 20, sink.where)


def _abort_tracking(ctx) -> None:
    if not ctx.finished and ctx.track is not None:
        ctx.track.abort()


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
    if ctx.snapshot is not None:
        ctx.snapshot.before_injection(procs or ctx.stopped())
    for pd in procs or ctx.stopped():
        others = [th.tracee for th in pd.threads[1:]]
        pd.parasite = parasite.collect(pd.tracee, pd.leader.raw_gpregs, others,
                                       [plan.vma for plan in pd.vma_plans] or None,
                                       {th.tid: (th.raw_gpregs, th.xstate, th.sigmask)
                                        for th in pd.threads})
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
        pd.ns_ids = task.namespace_ids(pid, pd.ns_inodes)   # frozen: as when checked
        exe = proc.read_link(pid, "exe")
        pd.exe_id = mapped_file_id(pd, exe, os.stat(f"/proc/{pid}/exe"), os.O_RDONLY,
                                   f"/proc/{pid}/exe", f"pid {pid}: its executable")


# Reading /proc/PID/smaps walks every resident page (~25 ms per GiB); for processes this
# big it is read just before the freeze, and used when the maps read once frozen show
# the same layout and the same locked memory.
PREREAD_SMAPS_KB = 64 << 10


def preread_smaps(ctx) -> None:
    from criu_py import proc
    todo, seen = [ctx.pid], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            st = proc.read_status(pid)
            if st.vm_rss >= PREREAD_SMAPS_KB:
                ctx.smaps_cache[pid] = (proc.read_smaps(pid), st.vm_lck)
            todo += proc.read_children(pid)
        except CriuError:
            continue                    # gone or unreadable: the frozen steps will say


def prepare_page_buffer(ctx) -> None:
    """An incremental dump copies the pages changed since its parent while the tree is
    frozen: memory for them, faulted in now (about the size tracking reports so far,
    with room for what is written until the freeze)."""
    from criu_py.mem import dump as memdump
    if ctx.opts.get("pre_dump") or ctx.track is None or not ctx.track.taken:
        return
    estimate = ctx.track.estimate_changed()
    if estimate:
        size = min(memdump.BUFFER_MAX, estimate + estimate // 2 + (4 << 20))
        ctx.page_buffer = memdump.PageBuffer(size)
        log.debug("%d KiB changed since the parent dump: a buffer of %d KiB is ready",
                  estimate >> 10, size >> 10)


def _layout(vmas) -> list:
    return [(v.start, v.end, v.perms, v.offset, v.dev_major, v.dev_minor, v.inode, v.path)
            for v in vmas]


def current_smaps(ctx, pd) -> list:
    """pd's VMAs with their VmFlags (the frozen process's)."""
    from criu_py import proc
    cached = ctx.smaps_cache.pop(pd.pid, None)
    if cached is not None:
        vmas, locked = cached
        if pd.status is not None and pd.status.vm_lck == locked and \
                _layout(proc.read_maps(pd.pid)) == _layout(vmas):
            return vmas
        log.debug("pid %d: its memory map changed before the freeze: read again", pd.pid)
    return proc.read_smaps(pd.pid)


def plan_memory(ctx, procs=None) -> None:
    from criu_py.mem import dump as memdump
    for pd in procs or ctx.stopped():
        pd.vma_plans = memdump.plan_vmas(pd.pid, current_smaps(ctx, pd), pd)


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
    from criu_py.files.regular import mapped_file_id
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
    if ctx.opts.get("pre_dump"):
        # what a kind can do early while the tree runs on (inotify/fanotify: find the
        # paths of watched files for the irmap cache)
        for pd in tables.values():
            for p in pd.fds:
                pre_dump = getattr(FILE_KINDS[p.kind], "pre_dump", None)
                if pre_dump is not None:
                    pre_dump(pd, p.ref)
        return
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
            if name == "root" and path.endswith(" (deleted)"):
                raise Unsupported(f"pid {pd.pid}: its root {path} was deleted")
            # a deleted cwd (a shell left in a dir `rm -rf` took) is a ghost directory
            fid = mapped_file_id(pd, path, os.stat(f"/proc/{pd.pid}/{name}"), os.O_RDONLY,
                                 f"/proc/{pd.pid}/{name}", f"pid {pd.pid}: its {name}")
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
    ctx.cg_sets = dump([pd.pid for pd in ctx.procs], ctx.opts, ctx.images, threads=threads,
                       known={pd.pid: pd.cgroups for pd in ctx.procs})


def scan_memory(ctx) -> None:
    """Which private pages each process's pagemap holds, decided while it is frozen:
    a PAGEMAP_SCAN per VMA, or with memory tracking the pages written since the parent
    images (the others become PE_PARENT), the tracking re-armed when it goes on."""
    from criu_py.mem import dump as memdump
    track = ctx.track
    scanner = memdump.page_scanner(ctx.opts.get("kdat"))
    for pd in ctx.procs:
        if pd.in_parents_memory:
            continue
        track.prepare(pd)
        hook = ctx.snapshot.vma_scan(pd) if ctx.snapshot is not None else None
        pd.pages = memdump.private_page_ranges(pd.pid, pd.vma_plans, scanner,
                                               hook or track.vma_scan(pd))
        track.after_scan(pd)
        if ctx.opts.get("pre_dump"):
            # the copy happens once the tree runs again: an exec or exit meanwhile must
            # show (the pagemap fd of this mm stops reading)
            pd.mm_fd = os.open(f"/proc/{pd.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)


# ------------------------------------------------------------------ write
def write_memory(ctx) -> None:
    from criu_py.mem import dump as memdump
    pre = ctx.opts.get("pre_dump")
    for pd in ctx.procs:
        pd.pages_id = ctx.alloc_pages_id()
        if pd.in_parents_memory:
            # a vfork() child: its memory is its parent's, dumped there
            if not pre:
                memdump.write_no_pages(ctx.images, pd.pages_id, pd.pid)
            continue
        if ctx.snapshot is not None and pd.pid in ctx.snapshot.targets:
            ctx.snapshot.write_frozen(pd, ctx.images, pd.pages_id, ctx.page_buffer)
            continue
        if ctx.lazy_kept is not None:
            stacks = [th.gpregs["sp"] for th in pd.threads] + [pd.stat.start_stack]
            ctx.lazy_kept.add(pd.pid, pd.pages.keep_lazy(stacks))
        if ctx.page_sink is not None:
            pd.page_stats = memdump.send_private_pages(
                pd.pid, pd.vma_plans, ctx.page_sink, pd.pages,
                task=(pd.tracee, pd.leader.raw_gpregs, pd.pidfd,
                      [th.rseq["pointer"] for th in pd.threads if th.rseq]))
            continue
        try:
            pd.page_stats = memdump.dump_private_pages(pd.pid, pd.vma_plans, ctx.images,
                                                       pd.pages_id, pd.pid, pages=pd.pages,
                                                       defer=not pre, pool=ctx.page_buffer)
        except CriuError as exc:
            if not pre:
                raise
            pd.page_stats = None
            exc_text = str(exc)
        else:
            exc_text = None
        if pre and (exc_text or not _same_mm(pd)):
            # It exited or exec'ed while its memory was copied: no pagemap, so the next
            # dump takes it whole; its tracking ends here.
            for name in (f"pagemap-{pd.pid}.img", f"pages-{pd.pages_id}.img"):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=ctx.images.dirfd)
            ctx.track.drop(pd.pid, exc_text or "it exited or exec'ed during the pre-dump")
            pd.page_stats = None
    if ctx.lazy_kept is not None:
        n = ctx.lazy_kept.copy()
        log.info("dump: %d MiB of lazy pages kept for the lazy-pages daemon", n >> 20)
    if ctx.shmem and not pre:
        from criu_py.mem import shmem
        shmem.write_images(ctx)
    if ctx.snapshot is not None:
        ctx.snapshot.copy_mode()       # from now on a write waits for its copy


def start_snapshot(ctx, stack) -> None:
    """dump --leave-running of big processes: write-protect their memory while they
    still run, to copy it once they run again (track/snapshot.py)."""
    from criu_py.track import snapshot
    if not snapshot.wanted(ctx):
        return
    ctx.snapshot = snapshot.Snapshot(ctx)
    stack.callback(ctx.snapshot.close)
    ctx.snapshot.prepare()
    if not ctx.snapshot.targets:
        ctx.snapshot.close()
        ctx.snapshot = None


def copy_snapshot(ctx) -> None:
    if ctx.snapshot is None:
        return
    for pid, st in ctx.snapshot.copy(ctx.images).items():
        for pd in ctx.procs:
            if pd.pid == pid:
                pd.page_stats = st
    ctx.times["frozen"] += ctx.snapshot.stop_us
    ctx.snapshot.close()


def wait_memory_copies(ctx) -> None:
    """The page data being copied into memory (while the images above were written) is
    all there: the tree may go."""
    for pd in ctx.procs:
        if pd.page_stats is not None and pd.page_stats.copied is not None:
            pd.page_stats.copied()
            pd.page_stats.copied = None


# While the image writer still works, copied page data of processes up to this size is
# written meanwhile (a bigger one could keep the tree frozen after the writer is done).
PENDING_MEANWHILE_MAX = 4 << 20


def finish_image_writes(ctx) -> None:
    """Wait for the image writer thread (ImageDir background), which raises the first
    failure. While it is still at it, the small processes' page data copied into memory
    (written once the tree is gone otherwise) goes to their pages files meanwhile."""
    for pd in ctx.procs:
        if not ctx.images.writing():
            break
        st = pd.page_stats
        if st is not None and st.pending is not None and st.copied is None and \
                st.pages_written * 4096 <= PENDING_MEANWHILE_MAX:
            _write_pending(pd)
    ctx.images.finish_writes()


def write_deferred_memory(ctx) -> None:
    """The page data copied into memory while the tree was frozen, now on disk."""
    for pd in ctx.procs:
        if pd.page_stats is not None and pd.page_stats.pending is not None:
            _write_pending(pd)


def _write_pending(pd) -> None:
    t = time.monotonic()
    pd.page_stats.pending()
    pd.page_stats.pending = None
    pd.page_stats.memwrite_us += int((time.monotonic() - t) * 1e6)


def _same_mm(pd) -> bool:
    from criu_py.track.uffd import mm_alive
    return pd.mm_fd < 0 or mm_alive(pd.mm_fd)


def write_irmap_cache(ctx) -> None:
    """Pre-dump: the paths of the inodes that inotify/fanotify fds watch, found now
    (the tree runs again), in irmap-cache.img for the dump to revalidate."""
    from criu_py.irmap.handles import watch_path
    if not ctx.irmap_queue:
        return
    for dev, ino, htype, handle in ctx.irmap_queue:
        try:
            watch_path(ctx.irmap, bool(ctx.opts.get("force_irmap")), dev, ino, htype, handle,
                       "a watch")
        except CriuError as exc:
            log.warning("irmap: %s (the dump will look again)", exc)
    from criu_py.irmap import CACHE_IMAGE
    ctx.images.write_entries(CACHE_IMAGE, ctx.irmap.cache_entries())


def write_inventory(ctx) -> None:
    from criu_py.dump import task
    ctx.images.write_entries("inventory.img", [task.build_inventory(ctx)])


def finish_tracking(ctx) -> None:
    """The `parent` link; the tracking state handed to a new holder (pre-dump, or a
    dump that leaves the tree running with --track-mem) or ended."""
    track = ctx.track
    track.dump_uptime = ctx.dump_uptime
    track.link_parent()
    track.hand_over()
    ctx.finished = True
    track.close()


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


def post_dump_scripts(ctx) -> None:
    """--action-script post-dump, the images complete and sealed. A tree to be killed
    is still frozen: killed once every script succeeded, else let go, as CRIU does (a
    migration whose copy failed leaves the program running here)."""
    from criu_py import scripts
    try:
        scripts.run(ctx.opts, "post-dump", ctx.pid)
    except scripts.ScriptFailed as exc:
        if not ctx.kill_after_scripts:
            raise
        finish_tree(ctx, keep=True)
        raise scripts.ScriptFailed(f"{exc}: the tree runs on") from None
    if ctx.kill_after_scripts:
        finish_tree(ctx)


def finish_tree(ctx, keep: bool | None = None) -> None:
    """Kill the tree (its TCP connections in repair mode close without a packet; the
    network lock stays for the restore to lift), or let it run on (connections out of
    repair mode and the lock lifted first): keep, by default --leave-running."""
    if ctx.opts.get("leave_running") if keep is None else keep:
        if ctx.sockets is not None:
            ctx.sockets.rollback()
        stop = bool(ctx.opts.get("leave_stopped"))
        ctx.tree.release(stop=stop)
        log.info("the tree of %d left %s", ctx.pid, "stopped" if stop else "running")
    else:
        ctx.tree.kill_all()
        if ctx.sockets is not None:
            ctx.sockets.commit()
        log.info("the tree of %d killed after the dump", ctx.pid)


def write_stats(ctx) -> None:
    from criu_py.dump import task
    ctx.stats = task.build_stats(ctx)
    ctx.images.write_entries("stats-dump", [ctx.stats])
