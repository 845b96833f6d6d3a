# SIGINT, SIGTERM and SIGHUP during dump and restore. A handler only notes the signal;
# the orchestrators look at it between their steps (log.step), so no cleanup code is ever
# cut in half: a dump aborts with its task detached and untouched, a restore kills the
# half-made task. Once a dump has killed its task (or a restore's task runs) the
# remaining steps are not abandoned: hold() makes the note wait until the end.
import signal

from criu_py.errors import CriuError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_pending = 0
_holding = False


class Interrupted(CriuError):
    """A signal asked the command to stop; exit status 128 + the signal number."""

    def __init__(self, signo: int, text: str = ""):
        self.signo = signo
        self.exit_code = 128 + signo
        super().__init__(text or f"interrupted by {signal.Signals(signo).name}")


def _note(signo, frame) -> None:
    global _pending
    if not _pending:
        _pending = signo


def install() -> None:
    """Note these signals instead of dying (or raising KeyboardInterrupt anywhere)."""
    for sig in SIGNALS:
        signal.signal(sig, _note)


def check(where: str = "") -> None:
    """Raise Interrupted if a signal came (unless held)."""
    if _pending and not _holding:
        raise Interrupted(_pending, f"interrupted by {signal.Signals(_pending).name}"
                                    f"{' ' + where if where else ''}")


def hold() -> None:
    """From now on the command finishes what it started; a signal is only reported."""
    global _holding
    _holding = True


def raise_at_once(text: str) -> None:
    """For a final wait that has nothing to clean up: a signal raises right away."""
    def handler(signo, frame):
        raise Interrupted(signo, f"interrupted by {signal.Signals(signo).name}: {text}")
    for sig in SIGNALS:
        signal.signal(sig, handler)
    if _pending:
        handler(_pending, None)
