# The console scripts' last word on what goes wrong before a command's own error handling
# runs: click's usage errors become one "Error: ..." line (click prints usage and a hint),
# and an unexpected exception anywhere becomes one line too instead of a traceback
# (CRIU_PY_TRACEBACK=1 shows the traceback, for debugging).
import os
import sys


def one_line_usage_errors() -> None:
    """Make click print every usage error as "Error: <cause>" alone (idempotent)."""
    import click

    def show(self, file=None):
        click.echo("Error: " + " ".join(self.format_message().split()), err=True)

    click.exceptions.UsageError.show = show


def last_resort(fn):
    """Run fn(); an exception nobody mapped to a domain error is reported in one line,
    exit status 1 (SystemExit and a closed stdout pass as they are)."""
    try:
        return fn()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BrokenPipeError:
        os._exit(1)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into one line
        if os.environ.get("CRIU_PY_TRACEBACK") == "1":
            raise
        text = str(exc).replace("\n", " ")
        print(f"Error: internal error ({type(exc).__name__}{': ' + text if text else ''})",
              file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
