# Domain exceptions, and the one place where errno values become them (like psutil):
# every layer raises these, and the CLI maps them to a one-line message and an exit code.
import errno as _errno


class CriuError(Exception):
    """Base of every error criu-py reports to a user. str() is the one-line cause."""
    exit_code = 1


class NoSuchProcess(CriuError):
    """The PID does not exist (or died while we worked on it)."""


class AccessDenied(CriuError):
    """The kernel refused us (EPERM/EACCES)."""


class ImageError(CriuError):
    """An image file is missing, short, corrupt or of the wrong kind."""


class Unsupported(CriuError):
    """The process uses something criu-py cannot checkpoint or restore (yet)."""


class RestoreError(CriuError):
    """A restore stage failed; the message names the stage."""


class DumpError(CriuError):
    """A dump stage failed; the message names the stage."""


class KernelError(CriuError):
    """A syscall failed for a reason that is none of the above."""


def from_oserror(exc: OSError, what: str, pid: int | None = None) -> CriuError:
    """Map an OSError raised while doing `what` (to `pid`) to a domain exception."""
    code = exc.errno
    where = f" (pid {pid})" if pid is not None else ""
    text = f"{what}{where}: {_errno.errorcode.get(code, code)} {exc.strerror or ''}".rstrip()
    if code == _errno.ESRCH or (pid is not None and code == _errno.ENOENT):
        return NoSuchProcess(f"{what}: no such process {pid}" if pid is not None else text)
    if code in (_errno.EPERM, _errno.EACCES):
        return AccessDenied(text)
    return KernelError(text)


def check_errno(ret: int, what: str, pid: int | None = None) -> int:
    """For native wrappers that return -errno: raise the mapped exception, else pass ret."""
    if ret < 0:
        import os
        raise from_oserror(OSError(-ret, os.strerror(-ret)), what, pid)
    return ret
