# The criu-py command line as click commands. Option names and meanings follow CRIU's
# (-t, -D, -W, -o, -v0..4, --leave-running, -d, --pidfile, ...); dump's and restore's
# come from the tables in criu_py/options.py. Kept light: every command imports its
# implementation only when it runs, so `criu-py --help` loads neither protobuf nor cffi.
# The console script starts in criu_py/main.py, which skips click for plain dump and
# restore command lines.
import click

from criu_py import __version__
from criu_py.commands import (run_dump, run_lazy_pages, run_page_server, run_pre_dump,
                              run_restore)
from criu_py.options import COMMANDS, Opt
from criu_py.usage import one_line_usage_errors


def _click_type(opt: Opt):
    if opt.kind == "choice":
        return click.Choice(opt.choices)
    return {"int": int, "level": click.IntRange(0, 4), "dir": click.Path(file_okay=False),
            "file": click.Path(dir_okay=False)}.get(opt.kind)


def click_options(table: list[Opt]):
    """Decorator adding the options of `table` to a click command, in table order."""
    def decorate(fn):
        for opt in reversed(table):
            kwargs = {"help": opt.help}
            if opt.default is not None:
                # An explicit default of None would satisfy `required` in click >= 8.3.
                kwargs["default"] = opt.default
            if opt.kind == "flag":
                kwargs["is_flag"] = True
            else:
                kwargs.update(required=opt.required,
                              show_default=opt.default is not None and not opt.multiple)
                if opt.multiple:
                    kwargs["multiple"] = True
                if opt.flag_value is not None:
                    kwargs.update(is_flag=False, flag_value=opt.flag_value)
                click_type = _click_type(opt)
                if click_type is not None:
                    kwargs["type"] = click_type
                if opt.metavar:
                    kwargs["metavar"] = opt.metavar
            fn = click.option(*opt.flags, opt.dest, **kwargs)(fn)
        return fn
    return decorate


one_line_usage_errors()


# no_args_is_help off: a bare `criu-py` is a usage error ("Missing command") in one line.
@click.group(context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=False)
@click.version_option(version=__version__, prog_name="criu-py")
def cli():
    """criu-py: checkpoint a running process tree to images and restore it."""


@cli.command()
@click_options(COMMANDS["dump"])
def dump(**opts):
    """Checkpoint the process tree rooted at PID into the images dir."""
    run_dump(opts)


@cli.command(name="pre-dump")
@click_options(COMMANDS["pre-dump"])
def pre_dump(**opts):
    """Copy the memory of the tree rooted at PID while it runs on, and track what it
    changes: a later dump with --track-mem --prev-images-dir writes only that."""
    run_pre_dump(opts)


@cli.command()
@click_options(COMMANDS["restore"])
def restore(**opts):
    """Restore the process tree saved in the images dir."""
    run_restore(opts)


@cli.command(name="lazy-pages")
@click_options(COMMANDS["lazy-pages"])
def lazy_pages(**opts):
    """Serve the lazy memory of `restore --lazy-pages` of the images dir (from its lazy
    source, or from a page server with --page-server) until every page is in."""
    run_lazy_pages(opts)


@cli.command(name="page-server")
@click_options(COMMANDS["page-server"])
def page_server(**opts):
    """Receive the memory pages of one `dump --page-server` into the images dir."""
    run_page_server(opts)


@cli.command()
@click.argument("fd", type=int)
def swrk(fd):
    """Serve CRIU's RPC (criu_req/criu_resp) on the SOCK_SEQPACKET socket FD, as `criu
    swrk` does for pycriu, go-criu and container runtimes."""
    from criu_py.commands import run_command
    from criu_py.rpc import swrk as serve
    run_command({"verbosity": 2, "log_file": None}, lambda opts: serve(fd))


def _add_plugin_commands():
    # Each feature keeps its click commands in a light module of its own.
    from criu_py.kerndat.cli import register as register_kerndat
    from criu_py.crit.cli import register as register_crit
    register_kerndat(cli)
    register_crit(cli)


_add_plugin_commands()
