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
    path that must not be a directory), level (an int 0..4) or choice (one of `choices`;
    with `flag_value` the value may be left out, as `--manage-cgroups` alone, and is
    then only taken from `--opt=value`, like getopt's optional arguments).
    multiple: the option may repeat; its value is the tuple of all given."""
    __slots__ = ("flags", "dest", "kind", "default", "required", "help", "metavar",
                 "choices", "flag_value", "multiple")

    def __init__(self, flags, dest, kind="str", default=None, required=False, help="",
                 metavar=None, choices=None, flag_value=None, multiple=False):
        self.flags, self.dest, self.kind = flags, dest, kind
        self.default = False if kind == "flag" else () if multiple else default
        self.required, self.help, self.metavar = required, help, metavar
        self.choices, self.flag_value, self.multiple = choices, flag_value, multiple


MANAGE_CGROUPS_MODES = ("none", "props", "soft", "full", "strict", "ignore")
CGROUP_BOTH = [
    Opt(("--manage-cgroups",), "manage_cgroups", "choice", "soft", choices=MANAGE_CGROUPS_MODES,
        flag_value="soft", metavar="[=MODE]",
        help="How to treat cgroups: none, props, soft (default), full, strict or ignore."),
    Opt(("--cgroup-root",), "cgroup_root", multiple=True, metavar="[CONTROLLER:]/ROOT",
        help="Dump: read the hierarchy from this root. Restore: put the tasks' cgroups under "
             "this root. Repeatable; ':/ROOT' names cgroup2."),
    Opt(("--cgroup-yard",), "cgroup_yard", "dir", metavar="PATH",
        help="A directory with the cgroup hierarchies already mounted (unified, memory, "
             "cpu,cpuacct, ...) instead of criu-py's own yard."),
]
CGROUP_DUMP = [
    Opt(("--cgroup-props",), "cgroup_props", metavar="STRING",
        help="Extra cgroup properties to dump, in CRIU's description format."),
    Opt(("--cgroup-props-file",), "cgroup_props_file", "file", metavar="FILE",
        help="Like --cgroup-props, read from a file."),
    Opt(("--cgroup-dump-controller",), "cgroup_dump_controller", multiple=True, metavar="NAME",
        help="Dump only these hierarchies (repeatable; 'unified' names cgroup2)."),
]


NETWORK_LOCK_METHODS = ("nftables", "iptables", "skip", "none")
SOCKETS_DUMP = [
    Opt(("--tcp-established",), "tcp_established", "flag",
        help="Dump established TCP connections (TCP_REPAIR); without it they are refused."),
    Opt(("--tcp-close",), "tcp_close", "flag",
        help="Do not dump the state of established TCP connections: they come back closed "
             "(restore needs --tcp-close too)."),
    Opt(("--skip-in-flight",), "skip_in_flight", "flag",
        help="Let connections a TCP listener has not accepted yet be lost (reset) instead of "
             "refusing the dump."),
    Opt(("--ext-unix-sk", "-x"), "ext_unix_sk", "flag",
        help="Allow unix sockets connected outside the tree: a datagram one to a named "
             "socket, or a stream one (its restore needs --inherit-fd)."),
    Opt(("--network-lock",), "network_lock", "choice", None, choices=NETWORK_LOCK_METHODS,
        metavar="METHOD",
        help="How established TCP connections are kept quiet between dump and restore: "
             "nftables (default), iptables or skip."),
]
SOCKETS_RESTORE = [
    Opt(("--tcp-established",), "tcp_established", "flag",
        help="Restore established TCP connections (needed when the images hold any)."),
    Opt(("--tcp-close",), "tcp_close", "flag",
        help="Restore established TCP connections closed."),
    Opt(("--ext-unix-sk", "-x"), "ext_unix_sk", "flag",
        help="Allow unix sockets to connect again to sockets outside the tree."),
    Opt(("--network-lock",), "network_lock", "choice", None, choices=NETWORK_LOCK_METHODS,
        metavar="METHOD",
        help="Accepted for CRIU's sake: the restore lifts the lock the dump took, by the "
             "dump's method."),
]

SCRIPTS = [
    Opt(("--action-script",), "action_script", multiple=True, metavar="SCRIPT",
        help="Run SCRIPT at CRIU's action points ($CRTOOLS_SCRIPT_ACTION: pre-dump, "
             "post-dump, pre-restore, post-restore, pre-resume, post-resume); a failing "
             "post-dump script keeps the tree running. Repeatable."),
]

STATS = [
    Opt(("--display-stats",), "display_stats", "flag",
        help="Print what the command measured (times, pages) on stdout at the end, as "
             "CRIU does; the same is in the stats-dump or stats-restore image."),
]

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

INCREMENTAL = [
    Opt(("--track-mem",), "track_mem", "flag",
        help="Track memory changes (soft-dirty, or userfaultfd write-protect where the kernel "
             "lacks it), so a later dump with --prev-images-dir writes only what changed."),
    Opt(("--prev-images-dir",), "prev_images_dir", metavar="DIR",
        help="Images of the previous (pre-)dump, relative to -D: pages unchanged since then "
             "stay there (a 'parent' link is made in -D)."),
]
IRMAP = [
    Opt(("--irmap-scan-path",), "irmap_scan_path", multiple=True, metavar="DIR",
        help="Where to look first for the files inotify/fanotify watches name (repeatable)."),
    Opt(("--force-irmap",), "force_irmap", "flag",
        help="Find the paths of watched files by scanning even when their file handles "
             "would open."),
]
DUMP_TREE = [
    Opt(("-t", "--tree"), "pid", "int", required=True, help="PID of the tree's root task."),
    Opt(("--shell-job", "-j"), "shell_job", "flag",
        help="Allow a task that shares the caller's session/tty."),
    Opt(("--file-locks", "-l"), "file_locks", "flag",
        help="Dump file locks (flock, POSIX, OFD); without it a locked file is refused."),
    Opt(("--timeout",), "timeout", "int", 10, metavar="SECONDS",
        help="Give up when a task of the tree has not stopped within this time (default "
             "10, as CRIU; 0: wait for ever); the tree is left as it was."),
    Opt(("--ghost-limit",), "ghost_limit", metavar="SIZE",
        help="Largest deleted file to dump as a ghost file (default 1M; K, M, G suffixes)."),
    Opt(("--link-remap",), "link_remap", "flag",
        help="Accepted for CRIU's sake: a deleted file is always dumped as a ghost file "
             "(its contents in the images, up to --ghost-limit), never linked back into "
             "the file system."),
]

PAGE_SERVER_ADDR = [
    Opt(("--address",), "address", metavar="ADDR",
        help="Page server address (dump --page-server, lazy-pages --page-server: to connect "
             "to; page-server, dump --lazy-pages: to listen on, default 0.0.0.0)."),
    Opt(("--port",), "port", "int", metavar="PORT", help="Page server TCP port."),
    Opt(("--status-fd",), "status_fd", "int", metavar="FD",
        help="Write one zero byte to this fd (and close it) once ready: listening "
             "(page-server, lazy-pages) or serving lazy pages (dump --lazy-pages)."),
]

COMMANDS = {
    "dump": DUMP_TREE + [
        Opt(("-R", "--leave-running"), "leave_running", "flag",
            help="Let the tasks run on after the dump."),
        Opt(("-s", "--leave-stopped"), "leave_stopped", "flag",
            help="Leave the tasks stopped (SIGSTOP) after the dump instead of killing them; "
                 "SIGCONT lets them go on."),
        Opt(("--page-server",), "page_server", "flag",
            help="Send the memory pages to the page server at --address/--port instead "
                 "of writing them into -D."),
        Opt(("--lazy-pages",), "lazy_pages", "flag",
            help="Leave the lazy pages out of the images; the dump keeps them and serves "
                 "them to a `lazy-pages --page-server` on --address/--port until all are "
                 "taken, then exits."),
    ] + PAGE_SERVER_ADDR + SOCKETS_DUMP + INCREMENTAL + IRMAP + CGROUP_BOTH + CGROUP_DUMP + STATS
      + SCRIPTS + COMMON,
    "pre-dump": DUMP_TREE + [
        Opt(("-R", "--leave-running"), "leave_running", "flag",
            help="Accepted for CRIU's sake: the tasks always run on after a pre-dump."),
    ] + INCREMENTAL + IRMAP + STATS + COMMON,
    "restore": [
        Opt(("-d", "--restore-detached"), "detach", "flag",
            help="Return once the tasks run instead of waiting for the root task."),
        Opt(("-s", "--leave-stopped"), "leave_stopped", "flag",
            help="Leave every restored task stopped (SIGSTOP) before it runs any of its "
                 "code; SIGCONT lets it go on. Tasks dumped stopped come back stopped "
                 "anyway."),
        Opt(("--pidfile",), "pidfile", "file",
            help="Write the restored root task's PID to this file."),
        Opt(("--shell-job", "-j"), "shell_job", "flag",
            help="Restore into the caller's session/tty."),
        Opt(("--file-locks", "-l"), "file_locks", "flag",
            help="Accepted for CRIU compatibility: dumped file locks are always restored."),
        Opt(("--inherit-fd",), "inherit_fd", multiple=True, metavar="fd[N]:RESOURCE",
            help="Give the tasks our fd N where the dump had the file CRIU calls RESOURCE: "
                 "pipe:[INODE], socket:[INODE] (a unix socket connected outside the tree) "
                 "or a regular file's path without its first '/' (a pipe, connection or "
                 "file outside the tree, such as the tasks' stdout). Repeatable."),
        Opt(("--no-verify",), "no_verify", "flag",
            help="Do not check the images against the checksums the dump wrote "
                 "(criu-py-checksums.img)."),
        Opt(("--lazy-pages",), "lazy_pages", "flag",
            help="Let the tasks run at once; their lazy memory comes from the "
                 "`criu-py lazy-pages` daemon of the work dir as they touch it."),
    ] + SOCKETS_RESTORE + CGROUP_BOTH + STATS + SCRIPTS + COMMON,
    "lazy-pages": [
        Opt(("--page-server",), "page_server", "flag",
            help="Fetch the lazy pages from the page server of `dump --lazy-pages` at "
                 "--address/--port instead of the images' lazy source."),
    ] + PAGE_SERVER_ADDR + COMMON,
    "page-server": PAGE_SERVER_ADDR + COMMON,
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


def _convert(opt: Opt, value: str):
    """The value as click would give it, or _BAD where click would complain."""
    kind = opt.kind
    if kind == "choice":
        return value if value in opt.choices else _BAD
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
        if value is None and opt.flag_value is not None:
            value = opt.flag_value
        if value is None:
            if i == len(words):
                return None
            value = words[i]
            i += 1
        converted = _convert(opt, value)
        if converted is _BAD:
            return None
        opts[opt.dest] = opts[opt.dest] + (converted,) if opt.multiple else converted
    if any(opt.required and opts[opt.dest] is None for opt in table):
        return None
    return argv[0], opts
