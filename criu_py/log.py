# Logging in CRIU's manner: -v0..4 picks how much is said (1 errors, 2 warnings, 3 info,
# 4 debug), -o names a log file (relative to the work dir), every line starts with the
# seconds since start. Errors also go to stderr as one line, from the CLI. A small logger
# of our own rather than the logging module: that costs ~10 ms of start-up, a sixth of
# a small dump's wall time, for features we do not use.
import contextlib
import os
import sys
import time

_T0 = time.monotonic()
ERROR, WARNING, INFO, DEBUG = 1, 2, 3, 4


class Logger:
    """log.debug/info/warning/error(fmt, *args) with %-formatting, like logging's."""

    def __init__(self):
        self.verbosity = WARNING
        self.disabled = False          # set in a child whose fds are being replaced
        self.file = None               # the -o file, when there is one
        self.sinks = []                # extra callables getting each message (tests)

    def _emit(self, level: int, msg: str, args) -> None:
        if self.disabled or (level > self.verbosity and not self.sinks):
            return
        text = msg % args if args else msg
        for sink in self.sinks:
            sink(level, text)
        if level <= self.verbosity:
            (self.file or sys.stderr).write(f"({time.monotonic() - _T0:10.6f}) {text}\n")

    def debug(self, msg, *args):
        self._emit(DEBUG, msg, args)

    def info(self, msg, *args):
        self._emit(INFO, msg, args)

    def warning(self, msg, *args):
        self._emit(WARNING, msg, args)

    def error(self, msg, *args):
        self._emit(ERROR, msg, args)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


log = Logger()


class FdWriter:
    """The log file as a bare fd it does not own (closing is left to whoever parked it):
    each line one write(2), as a line-buffered text file does, names that are not UTF-8
    as their bytes. What a restore's tasks log through: opening a text file would cost
    each of hundreds of forked tasks ~50 copy-on-write faults (its buffers, ...)."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "surrogateescape"))
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def setup(verbosity: int = 2, log_file: str | None = None, work_dir: str | None = None) -> None:
    """Configure the criu-py logger. A log file gets everything at the chosen level;
    without one, messages at the chosen level go to stderr."""
    log.close()
    log.verbosity = max(0, min(verbosity, 4))
    if log_file and log_file != "-":
        path = log_file if os.path.isabs(log_file) or not work_dir else os.path.join(work_dir, log_file)
        try:
            # line-buffered: whole lines; names that are not UTF-8 go out as their bytes
            log.file = open(open_log_file(path), "w", buffering=1, errors="surrogateescape")
        except OSError as exc:
            from criu_py.errors import CriuError
            raise CriuError(f"cannot open log file {path}: {exc.strerror}") from None


def open_log_file(path: str) -> int:
    """An fd to write the log to. A new file is made 0600 whatever the umask (logs name
    paths, fds and addresses); an existing one (a previous log, /dev/null, a fifo) is
    truncated if it is a regular file and keeps its mode."""
    flags = os.O_WRONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = os.open(path, flags)
        try:
            import stat
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)
        except OSError:
            os.close(fd)
            raise
        return fd
    os.fchmod(fd, 0o600)
    return fd


@contextlib.contextmanager
def step(phase: str, name: str):
    """One named step of an orchestrator: logged at -v4 when it starts, at -v3 with its
    duration when it ends. A SIGINT/SIGTERM noted since the last step aborts here."""
    from criu_py import interrupts
    interrupts.check(f"before the {phase} step '{name}'")
    log.debug("%s: %s", phase, name)
    t = time.monotonic()
    yield
    log.info("%s: %-28s %7.2f ms", phase, name, (time.monotonic() - t) * 1e3)
