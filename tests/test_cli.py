# The command line itself: start-up stays light (no protobuf, no native module, no psutil
# for --help; no click for a plain dump or restore), CRIU's spellings of the options work,
# the plain parser agrees with click, and usage errors are one line.
import subprocess
import sys

import pytest

from criu_py.options import COMMANDS, normalize_verbosity, parse_plain

HEAVY = "('google.protobuf', 'criu_py._native', 'psutil', 'cffi')"


def run_main(args: list[str], check_modules: str) -> subprocess.CompletedProcess:
    """Run criu_py.main.main(args) in a fresh interpreter; then assert check_modules
    (an expression over `mods`, the loaded module names) before it exits."""
    code = ("import os, sys, atexit\n"
            "def check():\n"
            "    mods = list(sys.modules)\n"
            f"    assert {check_modules}, sorted(m for m in mods if m.startswith(('click', 'google')))\n"
            "    print('modules ok', flush=True)\n"
            "atexit.register(check)\n"                       # click's way out: sys.exit
            "real_exit = os._exit\n"
            "os._exit = lambda code: (check(), real_exit(code))\n"   # criu-py's own way out
            "from criu_py.main import main\n"
            f"main({args!r})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_help_loads_no_heavy_module():
    res = run_main(["--help"], f"not [m for m in mods if m.startswith({HEAVY})]")
    assert res.returncode == 0, res.stderr
    assert "dump" in res.stdout and "restore" in res.stdout and "crit" in res.stdout
    assert "modules ok" in res.stdout


def test_plain_dump_does_not_load_click(tmp_path):
    # a PID that cannot exist: the dump fails at once, through the plain path
    res = run_main(["dump", "-t", "4194304", "-D", str(tmp_path / "img"), "-v0"],
                   "'click' not in mods")
    assert res.returncode == 1 and "modules ok" in res.stdout, res.stderr
    assert res.stderr.strip().splitlines() == ["Error: no such process 4194304"]


def test_plain_parser_reads_crius_spellings():
    cmd, o = parse_plain(normalize_verbosity(
        ["dump", "-t123", "-D", "/tmp/x", "-vv", "--leave-running", "-o", "d.log",
         "--kdat-path=none", "-j", "--link-remap"]))
    assert cmd == "dump"
    assert (o["pid"], o["images_dir"], o["verbosity"], o["leave_running"], o["log_file"],
            o["kdat_path"], o["shell_job"], o["work_dir"], o["link_remap"]) == \
        (123, "/tmp/x", 4, True, "d.log", "none", True, None, True)
    o = parse_plain(["dump", "-t", "1", "-s", "--timeout", "0"])[1]
    assert (o["leave_stopped"], o["timeout"]) == (True, 0)
    assert parse_plain(["dump", "-t", "1"])[1]["timeout"] == 10            # CRIU's default
    cmd, o = parse_plain(["restore", "-D", "d", "-d", "--pidfile", "p", "-v0", "-W", "w", "-s"])
    assert cmd == "restore"
    assert (o["images_dir"], o["detach"], o["pidfile"], o["verbosity"], o["work_dir"],
            o["shell_job"], o["leave_stopped"]) == ("d", True, "p", 0, "w", False, True)


@pytest.mark.parametrize("argv", [
    ["dump"],                                   # -t is required
    ["dump", "-t", "x"],                        # not an int
    ["dump", "-t"],                             # no value
    ["dump", "-t", "1", "-v9"],                 # out of range
    ["dump", "-t", "1", "--bogus"],             # unknown
    ["dump", "-t", "1", "extra"],               # positional
    ["dump", "-t", "1", "-h"],                  # help
    ["restore", "-dj"],                         # grouped flags: click's business
    ["restore", "--restore-detached=yes"],      # a flag with a value
    ["restore", "-D", "/etc/passwd"],           # a file where a dir is wanted
    ["restore", "--pidfile", "/tmp"],           # a dir where a file is wanted
    ["kdat"], ["check", "--all"], ["crit", "show", "x"], [],
])
def test_plain_parser_leaves_the_rest_to_click(argv):
    assert parse_plain(normalize_verbosity(argv)) is None


def test_plain_parser_and_click_agree():
    """Same options, same defaults: the click commands are built from the same tables."""
    import click

    from criu_py.cli import cli
    for name, table in COMMANDS.items():
        params = {p.name: p for p in cli.commands[name].params}
        assert set(params) == {opt.dest for opt in table}
        for opt in table:
            p = params[opt.dest]
            assert set(p.opts + p.secondary_opts) == set(opt.flags)
            assert p.required == opt.required, opt.dest
            if opt.default is not None:
                assert p.default == opt.default, opt.dest
            assert isinstance(p, click.Option)


def test_verbosity_spellings():
    assert normalize_verbosity(["dump", "-v", "-t", "1"]) == ["dump", "-v3", "-t", "1"]
    assert normalize_verbosity(["-vv"]) == ["-v4"]
    assert normalize_verbosity(["-vvvvv"]) == ["-v4"]
    assert normalize_verbosity(["-v0", "-v4", "-", "-x"]) == ["-v0", "-v4", "-", "-x"]


def test_usage_error_is_one_line():
    res = subprocess.run([sys.executable, "-m", "criu_py", "dump", "--no-such-option"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.stderr


def test_plain_parser_reads_the_incremental_options(tmp_path):
    cmd, o = parse_plain(["pre-dump", "-t", "5", "-D", "d", "--track-mem", "--prev-images-dir",
                          "../p", "--irmap-scan-path", "/a", "--irmap-scan-path", "/b",
                          "--force-irmap", "-R"])
    assert cmd == "pre-dump"
    assert (o["pid"], o["track_mem"], o["prev_images_dir"], o["irmap_scan_path"],
            o["force_irmap"], o["leave_running"]) == (5, True, "../p", ("/a", "/b"), True, True)
    # a plain pre-dump, too, runs without click
    res = run_main(["pre-dump", "-t", "4194304", "-D", str(tmp_path / "img"), "-v0"],
                   "'click' not in mods")
    assert res.returncode == 1 and "modules ok" in res.stdout, res.stderr
    assert res.stderr.strip().splitlines() == ["Error: no such process 4194304"]
# Every prefix of these command lines (each cut after a word) is run: whatever is missing,
# the answer is a normal result or one "Error:" line, never a traceback. The PID cannot
# exist and the dirs are empty, so nothing is dumped or restored.
FULL_COMMAND_LINES = [
    "dump -t 4194303 -D {d} -W {d} -o x.log -v4 --leave-running --shell-job --kdat-path none",
    "dump --tree=4194303 --images-dir={d} -v2 -R -j",
    "pre-dump -t 4194303 -D {d} --track-mem --prev-images-dir ../p --irmap-scan-path {d} --force-irmap -v0",
    "dump -t 4194303 -D {d} --track-mem --prev-images-dir {d} --leave-running",
    "restore -D {d} -d --pidfile {d}/pid -o r.log -v0 -j -W {d} --kdat-path none",
    "restore --images-dir {d} --restore-detached --no-verify",
    "kdat --json --kdat-path none -v0 -o -",
    "check --all --feature list --kdat-path none",
    "crit decode -i {d}/core-1.img -o {d}/out.json --pretty",
    "crit show {d}/core-1.img",
    "crit encode -i {d}/in.json -o {d}/out.img",
    "crit info {d}/pages-1.img",
    "crit x {d} fds",
    "crit make-lazy {d} {d}/lazy",
]

_RUN_MANY = r"""
import json, os, sys
from criu_py.main import main
cases = json.loads(sys.argv[1])
for argv in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stderr.flush()
            os._exit(code)
        os._exit(0)
    os.close(w)
    err = b""
    while chunk := os.read(r, 65536):
        err += chunk
    os.close(r)
    _, st = os.waitpid(pid, 0)
    print(json.dumps([argv, os.waitstatus_to_exitcode(st), err.decode(errors="replace")]))
"""


def test_every_incomplete_command_line_is_one_line(tmp_path):
    import json
    (tmp_path / "in.json").write_text("{")
    cases = []
    for line in FULL_COMMAND_LINES:
        words = line.format(d=tmp_path).split()
        cases += [words[:n] for n in range(0, len(words) + 1)]
    res = subprocess.run([sys.executable, "-c", _RUN_MANY, json.dumps(cases)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**__import__("os").environ, "CRIU_PY_KDAT": "none"})
    assert res.returncode == 0, res.stderr[-2000:]
    results = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(results) == len(cases)
    for argv, code, err in results:
        lines = [x for x in err.splitlines() if x.strip()]
        assert "Traceback" not in err, (argv, err)
        if argv[:1] == ["check"] and code in (1, 2) and not lines:
            continue                      # check's verdicts: missing features, on stdout
        if code != 0:
            assert len(lines) == 1 and lines[0].startswith("Error:"), (argv, code, lines)
