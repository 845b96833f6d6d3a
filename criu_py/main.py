# Entry point of the criu-py console script and of `python -m criu_py`. A plain dump or
# restore command line (the common case, and the one whose start-up time counts) runs
# without loading click; anything else goes to the click command line in criu_py/cli.py.
import sys

from criu_py.options import normalize_verbosity, parse_plain


def main(argv: list[str] | None = None):
    args = normalize_verbosity(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["dump"], ["restore"]):
        from criu_py import interrupts
        interrupts.install()           # as early as possible: never a KeyboardInterrupt
    elif args[:1] in (["lazy-pages"], ["page-server"]):
        from criu_py import interrupts
        interrupts.raise_at_once(f"{args[0]} stopped")   # servers: a signal ends them
    plain = parse_plain(args)
    if plain is not None:
        from criu_py.commands import RUNNERS
        command, opts = plain
        RUNNERS[command](opts)
    from criu_py.usage import last_resort

    def with_click():
        from criu_py.cli import cli
        cli.main(args=args, prog_name="criu-py")
    last_resort(with_click)
