# The options of `dump` and `restore` as data, with CRIU's names and meanings. cli.py
# builds the click commands from these tables; parse_plain() reads a well-formed dump or
# restore command line with the same tables without loading click, which costs ~30 ms,
# half of a small dump's wall time. Whatever parse_plain() does not fully understand
# (--help, a bad value, an unknown or missing option) it leaves to click, which then
# prints the usual help or error: the tables are the one definition of the options.
import os

KDAT_PATH_HELP = ("kdat cache file (default: $CRIU_PY_KDAT, else /run/criu-py.kdat, else "
                  "$XDG_RUNTIME_DIR/criu-py.kdat; 'none': no cache). Upstream CRIU's "
                  "/run/criu.kdat has another format: criu-py never reads, replaces or "
                  "removes a file it did not write.")


class Opt:
    """One option. kind: flag, int, str, dir (a path that must not be a file), file (a
    path that must not be a directory) or level (an int 0..4)."""
    __slots__ = ("flags", "dest", "kind", "default", "required", "help", "metavar")

    def __init__(self, flags, dest, kind="str", default=None, required=False, help="",
                 metavar=None):
        self.flags, self.dest, self.kind = flags, dest, kind
        self.default = False if kind == "flag" else default
        self.required, self.help, self.metavar = required, help, metavar


COMMON = [
    Opt(("-D", "--images-dir"), "images_dir", "dir", ".", help="Directory of the image files."),
    Opt(("-W", "--work-dir"), "work_dir", "dir",
        help="Directory for logs and temporary files (default: images dir)."),
    Opt(("-o", "--log-file"), "log_file",
        help="Log file name, relative to the work dir ('-' for stderr)."),
    Opt(("-v", "--verbosity"), "verbosity", "level", 2,
        help="Log level: -v0 silent .. -v4 debug (-v, -vv also work)."),
    Opt(("--kdat-path",), "kdat_path", metavar="PATH", help=KDAT_PATH_HELP),
]

COMMANDS = {
    "dump": [
        Opt(("-t", "--tree"), "pid", "int", required=True, help="PID of the tree's root task."),
        Opt(("-R", "--leave-running"), "leave_running", "flag",
            help="Let the tasks run on after the dump."),
        Opt(("--shell-job", "-j"), "shell_job", "flag",
            help="Allow a task that shares the caller's session/tty."),
    ] + COMMON,
    "restore": [
        Opt(("-d", "--restore-detached"), "detach", "flag",
            help="Return once the tasks run instead of waiting for the root task."),
        Opt(("--pidfile",), "pidfile", "file",
            help="Write the restored root task's PID to this file."),
        Opt(("--shell-job", "-j"), "shell_job", "flag",
            help="Restore into the caller's session/tty."),
        Opt(("--no-verify",), "no_verify", "flag",
            help="Do not check the images against the checksums the dump wrote "
                 "(criu-py-checksums.img)."),
    ] + COMMON,
}


def normalize_verbosity(argv: list[str]) -> list[str]:
    """CRIU accepts -v (one more than the default 2), -vv.. and -vN; click knows only -vN."""
    out = []
    for arg in argv:
        if len(arg) > 1 and arg[0] == "-" and arg[1:] == "v" * (len(arg) - 1):
            out.append(f"-v{min(4, 1 + len(arg))}")
        else:
            out.append(arg)
    return out


_BAD = object()


def _convert(kind: str, value: str):
    """The value as click would give it, or _BAD where click would complain."""
    if kind in ("int", "level"):
        try:
            number = int(value)
        except ValueError:
            return _BAD
        return number if kind == "int" or 0 <= number <= 4 else _BAD
    if kind == "dir" and os.path.isfile(value):
        return _BAD
    if kind == "file" and os.path.isdir(value):
        return _BAD
    return value


def parse_plain(argv: list[str]) -> tuple[str, dict] | None:
    """(command, options) when argv is a dump or restore command line made only of known
    options with good values; None otherwise (click handles it then)."""
    if not argv or argv[0] not in COMMANDS:
        return None
    table = COMMANDS[argv[0]]
    by_flag = {flag: opt for opt in table for flag in opt.flags}
    opts = {opt.dest: opt.default for opt in table}
    words, i = argv[1:], 0
    while i < len(words):
        word, value = words[i], None
        i += 1
        if word.startswith("--") and "=" in word:
            word, value = word.split("=", 1)
        elif word not in by_flag and len(word) > 2 and word[0] == "-" and word[1] != "-":
            word, value = word[:2], word[2:]          # -t123, -v4
        opt = by_flag.get(word)
        if opt is None:
            return None
        if opt.kind == "flag":
            if value is not None:
                return None
            opts[opt.dest] = True
            continue
        if value is None:
            if i == len(words):
                return None
            value = words[i]
            i += 1
        converted = _convert(opt.kind, value)
        if converted is _BAD:
            return None
        opts[opt.dest] = converted
    if any(opt.required and opts[opt.dest] is None for opt in table):
        return None
    return argv[0], opts
