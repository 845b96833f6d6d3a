# --action-script (CRIU's): programs the user runs at fixed points of a dump or restore,
# told which by $CRTOOLS_SCRIPT_ACTION, with $CRTOOLS_IMAGE_DIR and $CRTOOLS_INIT_PID.
# The migration hook is post-dump: the images are complete and sealed while the tree is
# still frozen; a script that copies them elsewhere and fails keeps the tree running
# here. Which failures stop the command follows CRIU: pre-dump, post-dump, pre-restore
# and post-restore do; pre-resume and post-resume are only reported.
import os
import subprocess

from criu_py.errors import CriuError
from criu_py.log import log


class ScriptFailed(CriuError):
    """An action script exited non-zero (or could not run)."""


def run(opts: dict, action: str, root_pid: int = 0) -> None:
    """Run every --action-script for `action`, in the order given; ScriptFailed names
    the first that failed (all of them run)."""
    scripts = opts.get("action_script") or ()
    if not scripts:
        return
    env = dict(os.environ, CRTOOLS_SCRIPT_ACTION=action,
               CRTOOLS_IMAGE_DIR=os.path.abspath(opts.get("images_dir") or "."))
    if root_pid:
        env["CRTOOLS_INIT_PID"] = str(root_pid)
    failed = None
    for path in scripts:
        log.debug("action script %s: %s", action, path)
        try:
            rc = subprocess.run([path], env=env, stdin=subprocess.DEVNULL,
                                close_fds=True).returncode
            why = f"exited with {rc}" if rc >= 0 else f"was killed by signal {-rc}"
        except OSError as exc:
            rc, why = 127, f"cannot run: {exc.strerror}"
        if rc:
            log.info("%s script %s %s", action, path, why)
            failed = failed or f"{action} script {path} {why}"
    if failed:
        raise ScriptFailed(failed)


def report(opts: dict, action: str, root_pid: int = 0) -> None:
    """The same for an action whose failure changes nothing: a warning only."""
    try:
        run(opts, action, root_pid)
    except ScriptFailed as exc:
        log.warning("%s", exc)
