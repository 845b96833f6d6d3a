# Unit tests of the cgroup package: the /proc/PID/cgroup parser, the --cgroup-props
# language, value normalisation, --cgroup-root, and the yard's logic on a pure cgroup2
# host (a yard of plain directories standing for a v2-only hierarchy: what is created,
# what is written early and late, which files a move writes, what a failure removes).
import os

import pytest

from criu_py import cgroup as cg
from criu_py.cgroup import dump as cgdump
from criu_py.cgroup import props as cgprops
from criu_py.cgroup.restore import Yard, _common, _reroot
from criu_py.errors import CriuError, ImageError, RestoreError
from criu_py.proc import parse_cgroup


def test_parse_proc_cgroup():
    lines = parse_cgroup("9:name=systemd:/user.slice\n4:cpu,cpuacct:/a/b\n0::/c:d\n")
    assert [(l.hierarchy, l.controllers, l.path) for l in lines] == [
        (9, "name=systemd", "/user.slice"), (4, "cpu,cpuacct", "/a/b"), (0, "", "/c:d")]


def test_contains_and_yard_dirs():
    assert cg.contains(["cpu", "cpuacct"], "cpu,cpuacct")
    assert not cg.contains(["cpu", "cpuacct"], "cpu")
    assert cg.contains([""], "") and not cg.contains([""], "memory")
    assert cg.yard_dir([""]) == "unified" and cg.yard_dir(["name=systemd"]) == "systemd"
    assert cg.yard_dir(["cpu", "cpuacct"]) == "cpu,cpuacct"


def test_props_language_merge_and_replace():
    text = ('"memory":\n - "strategy": "merge"\n - "properties": ["memory.high", "memory.max"]\n'
            '"cpu":\n - "strategy": "replace"\n - "properties": ["cpu.weight"]\n'
            '"newctl":\n - "strategy": "merge"\n - "properties": []\n')
    config = cgprops.PropsConfig(text)
    assert config.props_of("cpu") == ["cpu.weight"]
    memory = config.props_of("memory")
    assert memory[0] == "memory.limit_in_bytes" and memory.count("memory.max") == 1
    assert "memory.high" in memory and config.props_of("newctl") == []


@pytest.mark.parametrize("text, words", [
    ('"cpu":\n - "strategy": "sometimes"\n - "properties": []', ["sometimes"]),
    ('"cpu":\n - "properties": []', ["strategy"]),
    ('"cpu":\n - "strategy": "merge"\n - "properties": ["a", "b"', ["']'"]),
    ('"cpu":\n - "strategy": "merge"\n - "properties": ["../../etc"]', ["bad property"]),
    ('"cpu', ["unterminated"]),
    ('cpu: x', ["unexpected"]),
])
def test_props_language_errors_are_one_line(text, words):
    with pytest.raises(CriuError) as exc:
        cgprops.PropsConfig(text)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("--cgroup-props")
    for w in words:
        assert w in msg


def test_dump_controller_filter():
    config = cgprops.PropsConfig(controllers=["memory", "unified"])
    assert not config.skip("memory") and not config.skip("") and config.skip("cpu")
    assert not cgprops.PropsConfig().skip("cpu")


@pytest.mark.parametrize("prop, raw, saved", [
    ("memory.limit_in_bytes", "9223372036854771712\n", "9223372036854771712"),
    ("cpu.cfs_quota_us", "-1\n", "-1"),
    ("x", "9223372036854775807\n", "-1"),
    ("x", "18446744073709551615\n", "-1"),
    ("memory.oom_control", "oom_kill_disable 1\nunder_oom 0\noom_kill 0\n", "1"),
    ("memory.max", "max\n", "max"),
    ("cpu.max", "max 100000\n", "max 100000"),
])
def test_normalize(prop, raw, saved):
    assert cgdump.normalize(prop, raw) == saved


def test_cgroup_root_options():
    roots = cgdump.parse_roots(["/global", "memory:/m/", ":/v2", "unified:/u2"])
    assert roots == [(None, "/global"), ("memory", "/m"), ("", "/v2"), ("", "/u2")]
    assert cgdump.root_for(roots, ["memory"]) == "/m"
    assert cgdump.root_for(roots, [""]) == "/u2"
    assert cgdump.root_for(roots, ["cpu", "cpuacct"]) == "/global"
    assert cgdump.root_for([], ["cpu"]) is None
    for bad in ("relative", "memory:rel", "memory:/a/../b"):
        with pytest.raises(CriuError, match="--cgroup-root"):
            cgdump.parse_roots([bad])


def test_reroot_paths():
    assert _common(["/a/b/c", "/a/b/d", "/a/b"]) == "/a/b"
    assert _common(["/x", "/y"]) == "/"
    assert _reroot("/a/b/c", "/a/b", "/new") == "/new/c"
    assert _reroot("/a", "/", "/new") == "/new/a"
    assert _reroot("/", "/", "/new") == "/new"


# ------------------------------------------------------------------ the yard, v2 only
class Images:
    """Just what the yard reads of an images dir."""

    def __init__(self, entry, root_cg_set=1):
        from criu_py.images.pb import inventory_pb2
        self.entry = entry
        self.inv = inventory_pb2.inventory_entry(img_version=2, root_cg_set=root_cg_set)

    def exists(self, name):
        return name in ("cgroup.img", "inventory.img")

    def read_entries(self, name):
        return [self.entry]

    def read_one(self, name):
        return self.inv


def v2_image(member_path="/svc/app", head="svc/app"):
    from criu_py.images.pb import cgroup_pb2
    e = cgroup_pb2.cgroup_entry()
    s = e.sets.add(id=2)
    s.ctls.add(name="", path=member_path)
    c = e.controllers.add(cnames=[""], is_threaded=False)
    d = c.dirs.add(dir_name=head)
    for name, value in (("memory.max", "67108864"), ("pids.max", "20"),
                        ("cgroup.subtree_control", ""), ("cgroup.type", "domain"),
                        ("cgroup.procs", "")):
        d.properties.add(name=name, value=value)
    d.children.add(dir_name="worker").properties.add(name="pids.max", value="5")
    return e


def kernel_like_mkdir(root):
    """What a cgroup2 kernel does on mkdir, for a plain-directory yard: the interface
    files appear. Returns a patch for os.mkdir."""
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        for name in ("memory.max", "pids.max", "cgroup.procs", "cgroup.threads",
                     "cgroup.subtree_control", "cgroup.type"):
            fd = os.open(f"{path}/{name}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd)
            os.close(fd)
    return mkdir


def kernel_like_rmdir():
    """rmdir of a cgroup takes its interface files along."""
    real_rmdir = os.rmdir

    def rmdir(path, *, dir_fd=None):
        for name in os.listdir(os.path.join(f"/proc/self/fd/{dir_fd}", path) if dir_fd else path):
            full = os.path.join(path, name)
            if os.path.isfile(os.path.join(f"/proc/self/fd/{dir_fd}", full) if dir_fd else full):
                os.unlink(full, dir_fd=dir_fd)
        real_rmdir(path, dir_fd=dir_fd)
    return rmdir


@pytest.fixture
def v2_yard(tmp_path, monkeypatch):
    (tmp_path / "unified").mkdir()
    monkeypatch.setattr(os, "mkdir", kernel_like_mkdir(tmp_path))
    monkeypatch.setattr(os, "rmdir", kernel_like_rmdir())
    monkeypatch.setattr(Yard, "_own_cgroups", lambda self: {"": "/"})
    return tmp_path


def opts(yard, **kw):
    return dict({"cgroup_yard": str(yard), "manage_cgroups": "soft"}, **kw)


def test_v2_yard_creates_writes_moves_and_keeps_on_success(v2_yard):
    y = Yard(opts(v2_yard), Images(v2_image()))
    with y:
        app = v2_yard / "unified/svc/app"
        assert app.is_dir() and (app / "worker").is_dir()
        # the parent the restore made enables what app uses; limits wait for apply
        assert (v2_yard / "unified/svc/cgroup.subtree_control").read_text() == "memory pids"
        assert (app / "memory.max").read_text() == ""
        y.move(0, 2)
        assert (app / "cgroup.procs").read_text() == "0"
        y.apply_properties()
        assert (app / "memory.max").read_text() == "67108864"
        assert (app / "worker/pids.max").read_text() == "5"
        assert (app / "cgroup.type").read_text() == ""        # "domain" is not written
    assert app.is_dir()                                         # kept after success
    assert [p for _, p in y.created] == ["/svc", "/svc/app", "/svc/app/worker"]


def test_v2_yard_removes_what_it_made_on_failure(v2_yard):
    y = Yard(opts(v2_yard), Images(v2_image()))
    with pytest.raises(RuntimeError):
        with y:
            raise RuntimeError("a later restore step failed")
    assert os.listdir(v2_yard / "unified") == []


def test_v2_yard_cgroup_root_and_move_of_threads(v2_yard):
    y = Yard(opts(v2_yard, cgroup_root=(":/other/place",)), Images(v2_image()))
    with y:
        assert (v2_yard / "unified/other/place/worker").is_dir()
        assert not (v2_yard / "unified/svc").exists()
        y.move(1234, 2)
        assert (v2_yard / "unified/other/place/cgroup.procs").read_text() == "1234"
        y.move_thread(1235, 2, 2)                # same set as its process: nothing to do
        assert (v2_yard / "unified/other/place/cgroup.threads").read_text() == ""


def test_v2_yard_none_mode_and_strict_mode(v2_yard):
    with pytest.raises(RestoreError, match="does not exist"):
        with Yard(opts(v2_yard, manage_cgroups="none"), Images(v2_image())):
            pass
    with Yard(opts(v2_yard), Images(v2_image())) as y:
        y.apply_properties()
    (v2_yard / "unified/svc/app/pids.max").write_text("7\n")
    with pytest.raises(RestoreError, match=r"unified:/svc/app exists with pids.max '7'.*'20'"):
        with Yard(opts(v2_yard, manage_cgroups="strict"), Images(v2_image())):
            pass
    assert (v2_yard / "unified/svc/app").is_dir()                # strict made nothing


def test_yard_refuses_paths_that_leave_the_hierarchy(v2_yard):
    with pytest.raises(ImageError, match="bad cgroup path"):
        with Yard(opts(v2_yard), Images(v2_image(member_path="/../../etc"))):
            pass
    with pytest.raises(ImageError, match="bad cgroup path"):
        with Yard(opts(v2_yard), Images(v2_image(head="../escape"))):
            pass


def test_yard_ignore_mode_and_no_image_do_nothing(v2_yard):
    y = Yard(opts(v2_yard, manage_cgroups="ignore"), Images(v2_image()))
    with y:
        y.move(0, 2)
    assert not y.active and os.listdir(v2_yard / "unified") == []


# ------------------------------------------------------------------ kdat and check
def test_kdat_records_the_cgroup_layout_and_check_reports_it(tmp_path):
    import json
    import subprocess
    import sys
    path = str(tmp_path / "criu.kdat")
    mounts = [line.split(" - ")[1].split()[:3] + [line.split()[4]]
              for line in open("/proc/self/mountinfo") if " - cgroup" in line]
    v1 = {m[3] for m in mounts if m[0] == "cgroup"}
    v2 = [m[3] for m in mounts if m[0] == "cgroup2"]
    for run in range(2):                       # probed, then loaded from the cache
        res = subprocess.run([sys.executable, "-m", "criu_py", "kdat", "--json", "--kdat-path",
                              path], capture_output=True, text=True, check=True)
        out = json.loads(res.stdout)
        assert out["source"] == ("probe", "cache")[run]
        facts = out["facts"]
        assert {m["mountpoint"] for m in facts["cgroup_v1"]} == v1
        assert facts["cgroup2_mount"] == (v2[0] if v2 else "")
        if v2:
            with open(v2[0] + "/cgroup.controllers") as f:
                assert facts["cgroup2_controllers"] == f.read().strip()
        assert "memory" in facts["cgroup_controllers"].split()
    res = subprocess.run([sys.executable, "-m", "criu_py", "check", "--feature", "cgroups",
                          "--kdat-path", path], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith("cgroups is supported: v1 ")
    for m in facts["cgroup_v1"]:
        assert f"{m['controllers']} at {m['mountpoint']}" in line
    if v2:
        assert f"v2 at {v2[0]} (controllers: " in line
