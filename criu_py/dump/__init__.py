# `criu-py dump`: freeze one task, collect everything the restore needs, write CRIU
# images, then kill the task (or let it run on with --leave-running). dump_tasks() is the
# checklist; each step is a small function below. Every refusal happens before the first
# image is written, and whatever happens the task is never left stopped or traced: the
# ExitStack detaches it (putting back any injected code and registers first).
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
        with step("open images dir"):
            images = stack.enter_context(open_images_dir(opts))
        with step("load modules"):
            load_modules()
        from criu_py.dump.context import DumpContext
        from criu_py.ptrace import seized
        ctx = DumpContext(pid, opts, images)
        stack.callback(ctx.close)
        with step("freeze (seize + interrupt)"):
            t_freeze = time.monotonic()
            ctx.tracee = stack.enter_context(seized(pid))
            t_frozen = time.monotonic()
            ctx.times["freezing"] = int((t_frozen - t_freeze) * 1e6)
        with step("refuse unsupported"):
            refuse_unsupported(ctx)
        with step("registers and signal mask"):
            collect_registers(ctx)
        with step("in-task state (parasite)"):
            collect_in_task_state(ctx)
        with step("task state from /proc"):
            collect_proc_state(ctx)
        with step("plan memory"):
            plan_memory(ctx)
        with step("plan files"):
            plan_files(ctx)
        # ---- every check passed: images from here on
        with step("write memory"):
            write_memory(ctx)
        with step("write core, mm, ids"):
            write_task_images(ctx)
        with step("write files"):
            write_file_images(ctx)
        with step("write pstree, inventory"):
            write_tree_images(ctx)
        with step("kill or release task"):
            from criu_py import interrupts
            interrupts.hold()          # the images are complete: finish, whatever comes
            finish_task(ctx)
            ctx.times["frozen"] = int((time.monotonic() - t_frozen) * 1e6)
        with step("write stats"):
            write_stats(ctx)
        integrity.seal(images)
    log.info("dump of %d done in %.1f ms", pid, (time.monotonic() - t0) * 1e3)
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
    import criu_py.dump.context  # noqa: F401
    import criu_py.dump.parasite  # noqa: F401
    import criu_py.dump.task  # noqa: F401
    import criu_py.files.regular  # noqa: F401
    import criu_py.mem.dump  # noqa: F401
    import criu_py.native  # noqa: F401
    from criu_py.images.pb import (core_pb2, fdinfo_pb2, fs_pb2, inventory_pb2,  # noqa: F401
                                   mm_pb2, pagemap_pb2, pstree_pb2, stats_pb2)


def refuse_unsupported(ctx) -> None:
    """What this version cannot dump, refused while the task is frozen and before any
    image: threads, children, other namespaces than ours, POSIX timers, seccomp, a
    terminal or a foreign session."""
    from criu_py import proc
    pid = ctx.pid
    ctx.stat = proc.read_stat(pid)
    ctx.status = proc.read_status(pid)
    threads = proc.list_threads(pid)
    if len(threads) > 1:
        raise Unsupported(f"pid {pid} has {len(threads)} threads: multi-threaded tasks "
                          f"are not supported")
    kids = proc.read_children(pid)
    if kids:
        raise Unsupported(f"pid {pid} has child processes ({', '.join(map(str, kids))}): "
                          f"only a single process is supported")
    if proc.read_timers(pid):
        raise Unsupported(f"pid {pid} has POSIX timers: not supported")
    ours, theirs = proc.read_ns_ids(os.getpid()), proc.read_ns_ids(pid)
    for name in sorted(set(ours) & set(theirs)):
        if ours[name] != theirs[name]:
            raise Unsupported(f"pid {pid} lives in another {name} namespace: namespaces "
                              f"are not supported")
    if ctx.status.seccomp:
        raise Unsupported(f"pid {pid} uses seccomp (mode {ctx.status.seccomp}): not supported")
    if not ctx.opts.get("shell_job"):
        st = ctx.stat
        if st.tty_nr:
            raise Unsupported(f"pid {pid} has a controlling terminal: use --shell-job")
        if st.sid != pid or st.pgid != pid:
            raise Unsupported(f"pid {pid} is not a session and group leader (sid {st.sid}, "
                              f"pgid {st.pgid}): start it with setsid or use --shell-job")


# ------------------------------------------------------------------ collect
def collect_registers(ctx) -> None:
    from criu_py import arch_x86
    t = ctx.tracee
    ctx.raw_gpregs = t.get_gpregs()
    ctx.gpregs = arch_x86.gpregs_from_bytes(ctx.raw_gpregs)
    if ctx.gpregs["cs"] != 0x33:
        raise Unsupported(f"pid {ctx.pid} runs in 32-bit mode (cs {ctx.gpregs['cs']:#x})")
    ctx.xstate = t.get_xstate()
    ctx.sigmask = t.get_sigmask()
    ctx.rseq = t.get_rseq()
    ctx.signals_private = t.pending_signals(shared=False)
    ctx.signals_shared = t.pending_signals(shared=True)
    log.debug("pid %d: ip %#x sp %#x ax %#x orig_ax %#x, xstate %d bytes, sigmask %#x",
              ctx.pid, ctx.gpregs["ip"], ctx.gpregs["sp"], ctx.gpregs["ax"],
              ctx.gpregs["orig_ax"], len(ctx.xstate), ctx.sigmask)


def collect_in_task_state(ctx) -> None:
    from criu_py.dump import parasite
    ctx.parasite = parasite.collect(ctx.tracee, ctx.raw_gpregs)
    log.debug("pid %d: parasite ran with %d injected runs; brk %#x, clear_tid %#x",
              ctx.pid, ctx.parasite.injected_calls, ctx.parasite.brk, ctx.parasite.clear_tid_addr)


def collect_proc_state(ctx) -> None:
    from criu_py import proc
    from criu_py.dump import task
    from criu_py.files.regular import path_entry_id
    pid = ctx.pid
    ctx.personality = proc.read_personality(pid)
    ctx.rlimits = proc.read_rlimits(pid)
    ctx.robust_list = task.robust_list(pid)
    ctx.sched_policy = os.sched_getscheduler(pid)
    ctx.sched_prio = os.sched_getparam(pid).sched_priority
    ctx.sched_nice = os.getpriority(os.PRIO_PROCESS, pid)
    ctx.loginuid = proc.read_loginuid(pid)
    ctx.oom_score_adj = proc.read_oom_score_adj(pid)
    ctx.auxv = proc.read_auxv(pid)
    ctx.ns_ids = task.namespace_ids(pid)
    exe = proc.read_link(pid, "exe")
    if exe.endswith(" (deleted)"):
        raise Unsupported(f"pid {pid}: its executable {exe} was deleted")
    ctx.exe_id = path_entry_id(ctx.files, exe, os.stat(f"/proc/{pid}/exe"))
    try:
        ctx.pidfd = os.pidfd_open(pid)
    except OSError as exc:
        from criu_py.errors import from_oserror
        raise from_oserror(exc, "pidfd_open", pid) from None


def plan_memory(ctx) -> None:
    from criu_py import proc
    from criu_py.mem import dump as memdump
    ctx.vma_plans = memdump.plan_vmas(ctx.pid, proc.read_smaps(ctx.pid), ctx)


def plan_files(ctx) -> None:
    """Classify every fd (refusing unknown kinds), give each its files.img id, read pipe
    contents; then cwd and root."""
    from criu_py import proc
    from criu_py.dump.context import FdPlan
    from criu_py.files import FILE_KINDS, O_CLOEXEC, FdRef, classify
    from criu_py.files.regular import path_entry_id
    pid = ctx.pid
    refs = []
    for fd in proc.list_fds(pid):
        info = proc.read_fdinfo(pid, fd)
        refs.append(FdRef(pid=pid, fd=fd, link=proc.read_fd_link(pid, fd), st=proc.stat_fd(pid, fd),
                          pos=info.pos, flags=info.flags, mnt_id=info.mnt_id,
                          fdinfo_extra=info.extra))
    plans = []
    for ref in refs:                      # all refusals first
        kind = classify(ref)
        FILE_KINDS[kind].check(ref)
        plans.append(FdPlan(ref=ref, kind=kind, cloexec=bool(ref.flags & O_CLOEXEC)))
    for p in plans:
        p.file_id = FILE_KINDS[p.kind].dump_fd(ctx, p.ref)
        log.debug("pid %d fd %d: %s %s -> file id %d", pid, p.ref.fd, p.kind, p.ref.link, p.file_id)
    ctx.fds = plans
    for name in ("cwd", "root"):
        path = proc.read_link(pid, name)
        if path.endswith(" (deleted)"):
            raise Unsupported(f"pid {pid}: its {name} {path} was deleted")
        fid = path_entry_id(ctx.files, path, os.stat(f"/proc/{pid}/{name}"))
        setattr(ctx, f"{name}_id", fid)


# ------------------------------------------------------------------ write
def write_memory(ctx) -> None:
    from criu_py.mem import dump as memdump
    ctx.page_stats = memdump.dump_private_pages(ctx.pid, ctx.vma_plans, ctx.images, 1, ctx.pid,
                                                ctx.opts.get("kdat"))
    if ctx.shmem:
        from criu_py.mem import shmem
        shmem.write_images(ctx)


def write_task_images(ctx) -> None:
    from criu_py.dump import task
    pid = ctx.pid
    ctx.images.write_entries(f"core-{pid}.img", [task.build_core(ctx)])
    ctx.images.write_entries(f"mm-{pid}.img", [task.build_mm(ctx, [p.entry for p in ctx.vma_plans])])
    ctx.images.write_entries(f"ids-{pid}.img", [task.build_ids(ctx)])
    ctx.images.write_entries(f"fs-{pid}.img", [task.build_fs(ctx)])


def write_file_images(ctx) -> None:
    from criu_py.dump.task import TASK_OBJ_ID
    from criu_py.files import FD_CLOEXEC, FILE_KINDS
    from criu_py.files.pipe import pipes_data_entries
    from criu_py.images.pb import fdinfo_pb2
    fdinfos = []
    for p in ctx.fds:
        e = fdinfo_pb2.fdinfo_entry()
        e.id = p.file_id
        e.flags = FD_CLOEXEC if p.cloexec else 0
        e.type = FILE_KINDS[p.kind].fd_type
        e.fd = p.ref.fd
        fdinfos.append(e)
    ctx.images.write_entries("files.img", ctx.files.entries)
    ctx.images.write_entries(f"fdinfo-{TASK_OBJ_ID}.img", fdinfos)
    data = pipes_data_entries(ctx.pipe_data)
    if data:
        ctx.images.write_entries_with_payload("pipes-data.img", data)


def write_tree_images(ctx) -> None:
    from criu_py.dump import task
    ctx.images.write_entries("pstree.img", [task.build_pstree(ctx)])
    ctx.images.write_entries("inventory.img", [task.build_inventory(ctx)])


def finish_task(ctx) -> None:
    if ctx.opts.get("leave_running"):
        ctx.tracee.detach()
        log.info("pid %d left running", ctx.pid)
    else:
        ctx.tracee.kill(wait=False)
        log.info("pid %d killed after the dump", ctx.pid)


def write_stats(ctx) -> None:
    from criu_py.dump import task
    ctx.images.write_entries("stats-dump", [task.build_stats(ctx)])
