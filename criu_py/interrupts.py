# SIGINT, SIGTERM and SIGHUP during dump and restore. A handler only notes the signal;
# the orchestrators look at it between their steps (log.step), so no cleanup code is ever
# cut in half: a dump aborts with its task detached and untouched, a restore kills the
# half-made task. Once a dump has killed its task (or a restore's task runs) the
# remaining steps are not abandoned: hold() makes the note wait until the end.
# A wait that may never end (for a task to stop: one frozen by a cgroup freezer never
# does) is abortable(): a signal cuts it short, and so does a deadline() (dump
# --timeout), both raising from within the wait.
import contextlib
import signal

from criu_py.errors import CriuError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_pending = 0
_holding = False
_waiting = False         # inside abortable()
_expired = False         # the deadline() in force has passed


class Interrupted(CriuError):
    """A signal asked the command to stop; exit status 128 + the signal number."""

    def __init__(self, signo: int, text: str = ""):
        self.signo = signo
        self.exit_code = 128 + signo
        super().__init__(text or f"interrupted by {signal.Signals(signo).name}")


class DeadlineExpired(CriuError):
    """The deadline() around an abortable() wait passed; the waiter names what it waited for."""


def _note(signo, frame) -> None:
    global _pending
    if not _pending:
        _pending = signo
    if _waiting:
        check()


def install() -> None:
    """Note these signals instead of dying (or raising KeyboardInterrupt anywhere)."""
    for sig in SIGNALS:
        signal.signal(sig, _note)


def check(where: str = "") -> None:
    """Raise Interrupted if a signal came (unless held)."""
    if _pending and not _holding:
        raise Interrupted(_pending, f"interrupted by {signal.Signals(_pending).name}"
                                    f"{' ' + where if where else ''}")


@contextlib.contextmanager
def abortable():
    """Around a blocking wait that leaves nothing half-done when cut short: a signal
    (come before or during it) raises Interrupted, a passed deadline() DeadlineExpired,
    from within the wait."""
    global _waiting
    _waiting = True
    try:
        _raise_if_due()
        yield
    finally:
        _waiting = False


def _raise_if_due() -> None:
    check()
    if _expired:
        raise DeadlineExpired("deadline passed")


@contextlib.contextmanager
def deadline(seconds: float):
    """SIGALRM after `seconds` (0: never): the abortable() wait in progress then, or the
    next one before the block ends, raises DeadlineExpired."""
    global _expired
    if not seconds:
        yield
        return

    def on_alarm(signo, frame):
        global _expired
        _expired = True
        if _waiting:
            _raise_if_due()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _expired = False


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
