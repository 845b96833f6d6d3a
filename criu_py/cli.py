# The criu-py command line. Option names and meanings follow CRIU's (-t, -D, -W, -o,
# -v0..4, --leave-running, -d, --pidfile, ...). Kept light: every command imports its
# implementation only when it runs, so `criu-py --help` loads neither protobuf nor cffi.
import functools
import os
import re
import sys

import click

from criu_py import __version__
from criu_py.errors import CriuError


def _normalize_verbosity(argv: list[str]) -> list[str]:
    """CRIU accepts -v (one more than the default 2), -vv.. and -vN; click knows only -vN."""
    out = []
    for arg in argv:
        m = re.fullmatch(r"-(v+)", arg)
        out.append(f"-v{min(4, 2 + len(m.group(1)))}" if m else arg)
    return out


def common_options(fn):
    """-D/-W/-o/-v as CRIU has them on every command."""
    @click.option("-D", "--images-dir", "images_dir", type=click.Path(file_okay=False),
                  default=".", show_default=True, help="Directory of the image files.")
    @click.option("-W", "--work-dir", "work_dir", type=click.Path(file_okay=False),
                  default=None, help="Directory for logs and temporary files (default: images dir).")
    @click.option("-o", "--log-file", "log_file", default=None,
                  help="Log file name, relative to the work dir ('-' for stderr).")
    @click.option("-v", "--verbosity", "verbosity", type=click.IntRange(0, 4), default=2,
                  show_default=True, help="Log level: -v0 silent .. -v4 debug (-v, -vv also work).")
    @click.option("--kdat-path", "kdat_path", default=None, metavar="PATH",
                  help="kdat cache file (default: $CRIU_PY_KDAT, else /run/criu.kdat, else "
                       "$XDG_RUNTIME_DIR/criu.kdat; 'none': no cache).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def run_command(opts: dict, action, create_work_dir: bool = False):
    """Set up logging, run `action(opts)`, map domain errors to one line and an exit code.
    create_work_dir: the command writes there (dump), so a missing dir is made (0700)
    before the log file is opened in it."""
    from criu_py import log as logmod
    work_dir = opts.get("work_dir") or opts.get("images_dir")
    try:
        if create_work_dir and work_dir:
            os.makedirs(work_dir, mode=0o700, exist_ok=True)
        logmod.setup(opts.get("verbosity", 2), opts.get("log_file"), work_dir)
        rc = action(opts)
    except CriuError as exc:
        import logging
        if any(isinstance(h, logging.FileHandler) for h in logmod.log.handlers):
            logmod.log.error("Error: %s", exc)   # the log file gets it too; stderr only once
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    sys.exit(rc or 0)


def _show_usage_error(self, file=None):
    """Usage errors too are one line, "Error: <cause>" (click adds usage and a hint)."""
    click.echo(f"Error: {self.format_message()}", err=True)


click.exceptions.UsageError.show = _show_usage_error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="criu-py")
def cli():
    """criu-py: checkpoint a running process tree to images and restore it."""


@cli.command()
@click.option("-t", "--tree", "pid", type=int, required=True, help="PID of the tree's root task.")
@click.option("-R", "--leave-running", is_flag=True, help="Let the tasks run on after the dump.")
@click.option("--shell-job", "-j", is_flag=True, help="Allow a task that shares the caller's session/tty.")
@common_options
def dump(**opts):
    """Checkpoint the process tree rooted at PID into the images dir."""
    def action(o):
        from criu_py import kerndat
        from criu_py.dump import dump_tasks
        o["kdat"] = kerndat.load(o["kdat_path"])
        return dump_tasks(o)
    run_command(opts, action, create_work_dir=True)


@cli.command()
@click.option("-d", "--restore-detached", "detach", is_flag=True,
              help="Return once the tasks run instead of waiting for the root task.")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None,
              help="Write the restored root task's PID to this file.")
@click.option("--shell-job", "-j", is_flag=True, help="Restore into the caller's session/tty.")
@common_options
def restore(**opts):
    """Restore the process tree saved in the images dir."""
    def action(o):
        from criu_py import kerndat
        from criu_py.restore import restore_tasks
        o["kdat"] = kerndat.load(o["kdat_path"])
        return restore_tasks(o)
    run_command(opts, action)


def _add_plugin_commands():
    # Each feature keeps its click commands in a light module of its own.
    from criu_py.kerndat.cli import register as register_kerndat
    from criu_py.crit.cli import register as register_crit
    register_kerndat(cli)
    register_crit(cli)


_add_plugin_commands()


def main(argv: list[str] | None = None):
    args = _normalize_verbosity(sys.argv[1:] if argv is None else argv)
    cli.main(args=args, prog_name="criu-py")
