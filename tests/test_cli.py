# The command line itself: start-up stays light (no protobuf, no native module, no psutil
# for --help), CRIU's spellings of the verbosity option work, and usage errors are one line.
import subprocess
import sys

from criu_py.cli import _normalize_verbosity


def test_help_loads_no_heavy_module():
    code = ("import sys; from criu_py.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = [m for m in sys.modules if m.startswith(('google.protobuf', 'criu_py._native',"
            " 'psutil', 'cffi'))]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "dump" in res.stdout and "restore" in res.stdout and "crit" in res.stdout


def test_verbosity_spellings():
    assert _normalize_verbosity(["dump", "-v", "-t", "1"]) == ["dump", "-v3", "-t", "1"]
    assert _normalize_verbosity(["-vv"]) == ["-v4"]
    assert _normalize_verbosity(["-vvvvv"]) == ["-v4"]
    assert _normalize_verbosity(["-v0", "-v4"]) == ["-v0", "-v4"]


def test_usage_error_is_one_line():
    res = subprocess.run([sys.executable, "-m", "criu_py", "dump", "--no-such-option"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.stderr
