# What every command does around its work, without click: set up logging (-v, -o, the
# work dir), run the action, and turn a domain error into one "Error: ..." line and an
# exit code. Also the dump and restore actions, shared by the click commands and the
# plain fast path of criu_py.main.
import os
import sys

from criu_py.errors import CriuError


def run_command(opts: dict, action, create_work_dir: bool = False):
    """Set up logging, run `action(opts)`, map domain errors to one line and an exit code.
    create_work_dir: the command writes there (dump), so a missing dir is made (0700)
    before the log file is opened in it; an existing one keeps its mode."""
    from criu_py import log as logmod
    work_dir = opts.get("work_dir") or opts.get("images_dir")
    try:
        created = False
        if create_work_dir and work_dir:
            from criu_py.images import make_private_dir
            created = make_private_dir(work_dir)
        logmod.setup(opts.get("verbosity", 2), opts.get("log_file"), work_dir)
        if create_work_dir and work_dir and not created and opts.get("work_dir"):
            from criu_py.images import warn_if_readable
            warn_if_readable(work_dir, "work dir")
        rc = action(opts)
    except CriuError as exc:
        if logmod.log.file is not None:
            logmod.log.error("Error: %s", exc)   # the log file gets it too; stderr only once
        print(f"Error: {exc}", file=sys.stderr)
        leave(exc.exit_code)
    except OSError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        leave(1)
    except Exception as exc:  # noqa: BLE001 - a bug still gets one line, not a traceback
        if os.environ.get("CRIU_PY_TRACEBACK") == "1":
            raise
        text = str(exc).replace("\n", " ")
        print(f"Error: internal error ({type(exc).__name__}{': ' + text if text else ''})",
              file=sys.stderr)
        leave(1)
    leave(rc or 0)



def notify_status_fd(opts: dict) -> None:
    """--status-fd FD (CRIU's): one zero byte on FD, then close it, once the command is
    ready for its peers (the page server listens, the lazy-pages daemon serves, the
    lazy dump serves its pages). A peer gone already is no error."""
    fd = opts.get("status_fd")
    if fd is None:
        return
    try:
        os.write(fd, b"\0")
        os.close(fd)
    except OSError:
        pass

def leave(code: int):
    """Exit without the interpreter's finalization, which tears down every loaded module
    (~8 ms, an eighth of a small dump's wall time). Nothing is lost: images go out
    through raw fds that are closed by now; the log and stdio are flushed here."""
    from criu_py.log import log
    log.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:          # None: started with that fd closed
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def dump_action(opts: dict) -> int:
    from criu_py import kerndat
    if opts.get("pid") is None:
        raise CriuError("missing option -t/--tree PID")
    from criu_py.dump import dump_tasks
    opts["kdat"] = kerndat.load(opts["kdat_path"])
    if opts.get("leave_stopped"):
        opts["leave_running"] = True  # the tasks live on, each with a SIGSTOP (finish_tree)
    return dump_tasks(opts)


def pre_dump_action(opts: dict) -> int:
    from criu_py import kerndat
    from criu_py.dump import dump_tasks
    opts["kdat"] = kerndat.load(opts["kdat_path"])
    opts["pre_dump"] = True
    opts["track_mem"] = True          # as upstream: a pre-dump always tracks
    opts["leave_running"] = True
    return dump_tasks(opts)


def restore_action(opts: dict) -> int:
    from criu_py import kerndat
    from criu_py.restore import restore_tasks
    opts["kdat"] = kerndat.load(opts["kdat_path"])
    return restore_tasks(opts)


def lazy_pages_action(opts: dict) -> int:
    from criu_py.lazy.daemon import lazy_pages
    return lazy_pages(opts)


def page_server_action(opts: dict) -> int:
    from criu_py.pageserver.server import page_server
    return page_server(opts)


def run_dump(opts: dict):
    run_command(opts, dump_action, create_work_dir=True)


def run_pre_dump(opts: dict):
    run_command(opts, pre_dump_action, create_work_dir=True)


def run_restore(opts: dict):
    run_command(opts, restore_action)


def run_lazy_pages(opts: dict):
    run_command(opts, lazy_pages_action)


def run_page_server(opts: dict):
    run_command(opts, page_server_action, create_work_dir=True)


RUNNERS = {"dump": run_dump, "pre-dump": run_pre_dump, "restore": run_restore,
           "lazy-pages": run_lazy_pages, "page-server": run_page_server}
