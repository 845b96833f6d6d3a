# `criu-py kdat` and `criu-py check` through the real CLI: output, --json, --save, --drop,
# the path option and variable, the default /run/criu-py.kdat (restored afterwards; upstream
# CRIU's /run/criu.kdat is another file, never touched), a file upstream wrote, and an
# unprivileged user falling back to $XDG_RUNTIME_DIR or to no cache at all.
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from criu_py.kerndat import cache

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (cache.ENV_PATH, "XDG_RUNTIME_DIR")}
    env.update(extra)
    return env


def criu_py(*args, env=None, check=True):
    res = subprocess.run([sys.executable, "-m", "criu_py", *args], cwd=REPO, capture_output=True,
                         text=True, env=env or clean_env(), timeout=120)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def kdat_json(*args, **kw):
    res = criu_py("kdat", "--json", *args, **kw)
    return json.loads(res.stdout), res


# ------------------------------------------------------------------ kdat

def test_kdat_table_says_where_facts_came_from(tmp_path):
    path = str(tmp_path / "criu.kdat")
    first = criu_py("kdat", "--kdat-path", path).stdout
    assert first.startswith("Probed the kernel in ") and f"saved to {path}" in first
    second = criu_py("kdat", "--kdat-path", path).stdout
    assert second.startswith(f"Loaded from the cache {path} in ")
    for name in ("page_size", "soft_dirty", "uffd_features", "vdso_areas", "xsave_size",
                 "cgroup2_mount", "Caller (probed every run)"):
        assert name in second


def test_kdat_json(tmp_path):
    path = str(tmp_path / "criu.kdat")
    data, _ = kdat_json("--kdat-path", path)
    assert data["source"] == "probe" and data["cache_path"] == path
    assert data["facts"]["page_size"] == os.sysconf("SC_PAGE_SIZE")
    assert {a["name"] for a in data["facts"]["vdso_areas"]} >= {"[vdso]"}
    assert data["caller"]["euid"] == 0
    again, _ = kdat_json("--kdat-path", path)
    assert again["source"] == "cache" and again["facts"] == data["facts"]
    assert again["seconds"] > 0


def test_save_and_drop(tmp_path):
    path = str(tmp_path / "criu.kdat")
    res = criu_py("kdat", "--drop", "--kdat-path", path)
    assert "nothing to drop" in res.stdout and res.stderr == ""
    criu_py("kdat", "--save", "--kdat-path", path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    mtime = os.stat(path).st_mtime_ns
    criu_py("kdat", "--save", "--kdat-path", path)         # --save probes even when cached
    assert os.stat(path).st_mtime_ns != mtime
    assert kdat_json("--kdat-path", path)[0]["source"] == "cache"
    assert "Removed" in criu_py("kdat", "--drop", "--kdat-path", path).stdout
    assert not os.path.exists(path)
    res = criu_py("kdat", "--save", "--drop", "--kdat-path", path, check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1


def test_save_without_location_fails_in_one_line(tmp_path):
    res = criu_py("kdat", "--save", "--kdat-path", str(tmp_path / "nodir" / "criu.kdat"), check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("Error: cannot save the kdat cache")
    assert "Traceback" not in res.stderr


def test_stale_file_through_the_cli(tmp_path):
    path = tmp_path / "criu.kdat"
    path.write_bytes(struct.pack("<I", cache.MAGIC) + b"ours by the magic, damaged after it")
    os.chmod(path, 0o600)
    data, res = kdat_json("--kdat-path", str(path))
    assert f"Stale {path} file" in res.stderr
    assert data["source"] == "probe"
    assert kdat_json("--kdat-path", str(path))[0]["source"] == "cache"


def test_env_variable_and_option(tmp_path):
    env_path = str(tmp_path / "env.kdat")
    data, _ = kdat_json(env=clean_env(CRIU_PY_KDAT=env_path))
    assert data["cache_path"] == env_path and os.path.exists(env_path)
    opt_path = str(tmp_path / "opt.kdat")
    data, _ = kdat_json("--kdat-path", opt_path, env=clean_env(CRIU_PY_KDAT=env_path))
    assert data["cache_path"] == opt_path
    data, _ = kdat_json(env=clean_env(CRIU_PY_KDAT="none"))
    assert data["cache_path"] is None and data["source"] == "probe"


def test_default_path_is_run_criu_py_kdat():
    """The one test of the real /run/criu-py.kdat: whatever was there is put back."""
    default = Path(cache.DEFAULT_PATH)
    backup = None
    if os.path.lexists(default):
        backup = tempfile.mktemp(prefix="criu-py.kdat.backup.", dir=default.parent)
        os.rename(default, backup)
    assert default == Path("/run/criu-py.kdat")
    try:
        data, _ = kdat_json()
        assert data["cache_path"] == str(default) and data["source"] == "probe"
        st = os.lstat(default)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
        data, _ = kdat_json()
        assert data["source"] == "cache"
    finally:
        if backup is not None:
            os.replace(backup, default)
        elif os.path.lexists(default):
            os.unlink(default)


def test_upstream_kdat_file_is_left_alone_through_the_cli(tmp_path):
    """A file in upstream CRIU's format where criu-py is told to cache: every command
    runs (uncached, one -v2 warning), --save and --drop refuse in one line, the file
    keeps its bytes."""
    path = tmp_path / "criu.kdat"
    upstream = struct.pack("<II", cache.UPSTREAM_MAGIC, 0x6554A1B2) + bytes(904)
    path.write_bytes(upstream)
    data, res = kdat_json("--kdat-path", str(path))
    assert data["source"] == "probe"
    assert "upstream CRIU's kdat file" in res.stderr
    for extra in (["--save"], ["--drop"]):
        res = criu_py("kdat", "--kdat-path", str(path), *extra, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and "only its own" in lines[0], res.stderr
    assert path.read_bytes() == upstream
    assert sorted(os.listdir(tmp_path)) == ["criu.kdat"]


# ------------------------------------------------------------------ unprivileged user

def _unprivileged_python() -> tuple[str, dict]:
    """An interpreter the nobody user can run, with a PYTHONPATH it can read."""
    paths = [str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]
    for exe in candidates:
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                exe, "-c", "import cffi, google.protobuf, click, criu_py"],
                               env={"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin"},
                               capture_output=True, cwd="/")
        if probe.returncode == 0:
            return exe, {"PYTHONPATH": ":".join(paths)}
    pytest.fail("no Python interpreter usable by the nobody user "
                f"(tried {candidates}); the repo and venv must be readable by it")


def as_nobody(*args, xdg=None):
    exe, extra = _unprivileged_python()
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", **extra}
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = xdg
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           exe, "-m", "criu_py", *args], env=env, cwd="/", capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def nobody_dir():
    d = tempfile.mkdtemp(prefix="kdat-nobody-")
    os.chown(d, NOBODY, NOBODY)
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d)


def test_unprivileged_user_falls_back_to_xdg_runtime_dir(nobody_dir):
    run_before = os.stat(cache.DEFAULT_PATH) if os.path.exists(cache.DEFAULT_PATH) else None
    res = as_nobody("kdat", "--json", xdg=nobody_dir)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    path = os.path.join(nobody_dir, "criu-py.kdat")
    assert data["cache_path"] == path and data["source"] == "probe"
    assert data["caller"]["euid"] == NOBODY and data["facts"]["probed_euid"] == NOBODY
    st = os.stat(path)
    assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o600
    # what an unprivileged caller can see and do differs from root
    assert data["facts"]["zero_pfn"] == 0 and not data["facts"]["pagemap_pfn"]
    assert data["facts"]["page_size"] == os.sysconf("SC_PAGE_SIZE")
    res = as_nobody("kdat", "--json", xdg=nobody_dir)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["source"] == "cache"
    # root's cache was not touched by the unprivileged runs
    now = os.stat(cache.DEFAULT_PATH) if os.path.exists(cache.DEFAULT_PATH) else None
    assert (run_before and run_before.st_mtime_ns) == (now and now.st_mtime_ns)


def test_unprivileged_user_without_any_location_runs_uncached():
    res = as_nobody("kdat", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["cache_path"] is None and data["source"] == "probe"
    notes = [line for line in res.stderr.splitlines() if "no cache file" in line]
    assert len(notes) == 1 and "XDG_RUNTIME_DIR is unset" in notes[0]
    quiet = as_nobody("kdat", "--json", "-v1")
    assert quiet.returncode == 0 and "no cache file" not in quiet.stderr


def test_unprivileged_check_names_what_is_missing(nobody_dir):
    res = as_nobody("check", "--all", xdg=nobody_dir)
    assert res.returncode == 1
    assert "Error: privileges:" in res.stdout
    assert "Looks good." not in res.stdout


# ------------------------------------------------------------------ check

def test_check_verdicts_match_the_facts(tmp_path):
    from criu_py import kerndat
    from criu_py.kerndat import check
    path = str(tmp_path / "criu.kdat")
    res = criu_py("check", "--kdat-path", path, check=False)
    facts = kerndat.load(path)
    assert facts.source == "cache"                   # check saved the cache it probed
    verdicts = check.evaluate(facts)
    assert res.returncode == check.exit_status(verdicts)
    missing = [v for v in verdicts if not v.ok]
    for v in missing:
        assert f"{v.feature.severity}: {v.feature.name}: {v.text}" in res.stdout
    assert ("Looks good." in res.stdout) == (not missing) == (res.returncode == 0)


def test_check_soft_dirty_names_the_fallback(tmp_path):
    from criu_py import kerndat
    path = str(tmp_path / "criu.kdat")
    res = criu_py("check", "--feature", "soft_dirty", "--kdat-path", path, check=False)
    facts = kerndat.load(path)
    if facts.soft_dirty:
        assert res.returncode == 0 and "soft_dirty is supported" in res.stdout
    elif facts.uffd_dirty_tracking:
        assert res.returncode == 2
        assert "pre-dump tracks memory with uffd write-protect instead" in res.stdout
    else:
        assert "pre-dump is unavailable" in res.stdout


def test_check_one_feature_list_and_unknown(tmp_path):
    path = str(tmp_path / "criu.kdat")
    res = criu_py("check", "--feature", "clone3_set_tid", "--kdat-path", path)
    assert res.stdout.strip() == "clone3_set_tid is supported"
    names = criu_py("check", "--feature", "list").stdout.split()
    assert "soft_dirty" in names and "lazy_pages" in names
    res = criu_py("check", "--feature", "no_such_thing", check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == "Error: unknown feature 'no_such_thing' (criu-py check --feature list)"


def test_check_all_includes_optional_features(tmp_path):
    path = str(tmp_path / "criu.kdat")
    criu_py("check", "--kdat-path", path, check=False)
    from criu_py import kerndat
    from criu_py.kerndat import check
    facts = kerndat.load(path)
    res = criu_py("check", "--all", "--kdat-path", path, check=False)
    assert res.returncode == check.exit_status(check.evaluate(facts, include_all=True))
