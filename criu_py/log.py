# Logging in CRIU's manner: -v0..4 picks how much is said, -o names a log file
# (relative to the work dir). Errors also go to stderr as one line, from the CLI.
import contextlib
import logging
import os
import sys
import time

_T0 = time.monotonic()
LEVELS = {0: logging.CRITICAL + 10, 1: logging.ERROR, 2: logging.WARNING,
          3: logging.INFO, 4: logging.DEBUG}

log = logging.getLogger("criu-py")


class _Fmt(logging.Formatter):
    def format(self, record):
        return f"({time.monotonic() - _T0:10.6f}) {record.getMessage()}"


def setup(verbosity: int = 2, log_file: str | None = None, work_dir: str | None = None) -> None:
    """Configure the criu-py logger. A log file gets everything at the chosen level;
    without one, messages at the chosen level go to stderr."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(LEVELS.get(max(0, min(verbosity, 4))))
    if log_file and log_file != "-":
        path = log_file if os.path.isabs(log_file) or not work_dir else os.path.join(work_dir, log_file)
        try:
            handler = logging.FileHandler(path, mode="w")
        except OSError as exc:
            from criu_py.errors import CriuError
            raise CriuError(f"cannot open log file {path}: {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Fmt())
    log.addHandler(handler)


@contextlib.contextmanager
def step(phase: str, name: str):
    """One named step of an orchestrator: logged at -v4 when it starts, at -v3 with its
    duration when it ends."""
    log.debug("%s: %s", phase, name)
    t = time.monotonic()
    yield
    log.info("%s: %-28s %7.2f ms", phase, name, (time.monotonic() - t) * 1e3)
