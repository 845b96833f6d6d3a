# End-to-end: cgroups. The counter is put into test cgroups (cgsandbox: children of where
# this test runs, on v1 memory, cpu, cpuset, pids and on cgroup2) with limits, dumped and
# restored through the real CLI; checked from outside: /proc/PID/cgroup and every
# property read the same, the restore made the cgroups the dump saw and removes them
# again when it fails, and no yard mount stays behind.
import json
import subprocess
from pathlib import Path

import pytest

from cgsandbox import Sandbox, yard_mounts
from conftest import CRIT, assert_one_line_error, assert_running_untraced, proc_is_running

pytestmark = pytest.mark.needs_tool

# hierarchy -> {property: value} given to the test cgroup "wl"
LIMITS = {
    "memory": {"memory.limit_in_bytes": str(64 << 20), "memory.soft_limit_in_bytes": str(32 << 20),
               "memory.swappiness": "30"},
    "cpu": {"cpu.shares": "512", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"},
    "cpuset": {"cpuset.cpus": "0", "cpuset.mems": "0"},       # set before a task may enter
    "pids": {"pids.max": "17"},
    "": {"cgroup.max.descendants": "5", "cgroup.max.depth": "3"},
}


@pytest.fixture
def cg(h):
    box = Sandbox()
    missing = [n or "cgroup2" for n in LIMITS if not box.has(n)]
    if missing:
        pytest.skip(f"no {', '.join(missing)} hierarchy here")
    try:
        yield box
    finally:
        h.cleanup()                        # tasks out first: a cgroup with tasks stays
        left = box.cleanup()
        assert not left, f"test cgroups left behind: {left}"
        assert not yard_mounts(), f"yard mounts left: {yard_mounts()}"


def cgroup_file(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def place(box, task, names, sub="wl", limits=LIMITS):
    for name in names:
        props = limits.get(name, {})
        box.make(name, sub)
        if name == "cpuset":               # a v1 cpuset child gets only what its parent has
            for prop, value in props.items():
                (box.dir(name) / prop).write_text(value)
        for prop, value in props.items():
            (box.dir(name, sub) / prop).write_text(value)
        box.put(name, sub, task.pid)


def read_limits(box, names, sub="wl", limits=LIMITS):
    return {(n, p): box.read(n, sub, p) for n in names for p in limits.get(n, {})}


def remove(box, names, sub="wl"):
    for name in names:
        box.dir(name, sub).rmdir()


def cgroup_image(images: Path) -> dict:
    res = subprocess.run([CRIT, "decode", "-i", str(images / "cgroup.img")], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout)["entries"][0]


def edit_cgroup_image(images: Path, fn) -> None:
    from criu_py.images import ImageDir
    d = ImageDir(str(images))
    entries = d.read_entries("cgroup.img")
    fn(entries[0])
    d.write_entries("cgroup.img", entries)


def find_dir(entry, cname: str, path: str):
    """The cgroup_dir_entry of `path` in controller `cname` of a cgroup_entry message."""
    for c in entry.controllers:
        if cname in c.cnames:
            stack = [("/" + d.dir_name.strip("/"), d) for d in c.dirs]
            while stack:
                p, d = stack.pop()
                if p.rstrip("/") == path.rstrip("/") or (p == "/" and path == "/"):
                    return d
                stack += [(p.rstrip("/") + "/" + ch.dir_name, ch) for ch in d.children]
    raise AssertionError(f"{cname}:{path} not in cgroup.img")


def assert_clean_failure(res, task, box, names, *words):
    assert_one_line_error(res, *words)
    assert not proc_is_running(task.pid), "the failed restore left the task behind"
    assert not yard_mounts(), f"yard still mounted: {yard_mounts()}"
    for name in names:
        assert not box.dir(name, "wl").exists(), f"{name}: the restore left its cgroup behind"


# ------------------------------------------------------------------ single process
def test_v1_and_v2_cgroups_and_limits_come_back(h, cg):
    names = list(LIMITS)
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, names)
    before, limits = cgroup_file(task.pid), read_limits(cg, names)
    images = h.dump(task)
    entry = cgroup_image(images)
    assert len(entry["sets"]) == 1 and {c["name"] for c in entry["sets"][0]["ctls"]} >= set(names)
    remove(cg, names)                     # the restore must make them, with their limits
    restored = h.restore(images, task=task)
    assert cgroup_file(task.pid) == before
    assert read_limits(cg, names) == limits
    n = int(task.log.lines()[-1].split()[1])
    task.log.wait(rf"{task.pid} {n + 5}")
    assert restored.running()


def test_existing_cgroups_soft_keeps_them_full_rewrites_them(h, cg):
    names = ["memory", "pids"]
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, names)
    images = h.dump(task)
    (cg.dir("memory", "wl") / "memory.limit_in_bytes").write_text(str(48 << 20))
    h.restore(images, task=task)                       # soft (default): existing left alone
    assert cg.read("memory", "wl", "memory.limit_in_bytes") == str(48 << 20)
    assert f"memory:{cg.path('memory', 'wl')}\n" in cgroup_file(task.pid)
    images2 = h.dump(task, h.images_dir("again"))
    (cg.dir("memory", "wl") / "memory.limit_in_bytes").write_text(str(40 << 20))
    (cg.dir("pids", "wl") / "pids.max").write_text("5")
    h.restore(images2, "--manage-cgroups=full", task=task)
    assert cg.read("memory", "wl", "memory.limit_in_bytes") == str(48 << 20)
    assert cg.read("pids", "wl", "pids.max") == "17"


def test_cgroup_root_moves_the_cgroups(h, cg):
    names = ["memory", ""]
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, names)
    limits = read_limits(cg, names)
    images = h.dump(task)
    remove(cg, names)
    h.restore(images, "--cgroup-root", f"memory:{cg.path('memory', 'moved')}",
              "--cgroup-root", f":{cg.path('', 'moved')}", task=task)
    lines = cgroup_file(task.pid).splitlines()
    assert f"4:memory:{cg.path('memory', 'moved')}" in [l for l in lines if ":memory:" in l][0] \
        or any(l.endswith(f":memory:{cg.path('memory', 'moved')}") for l in lines)
    assert f"0::{cg.path('', 'moved')}" in lines
    assert read_limits(cg, names, sub="moved") == limits
    assert not cg.dir("memory", "wl").exists() and not cg.dir("", "wl").exists()


def test_ignore_leaves_the_task_in_the_restores_cgroups(h, cg):
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, ["memory"])
    images = h.dump(task)
    remove(cg, ["memory"])
    h.restore(images, "--manage-cgroups=ignore", task=task)
    assert cgroup_file(task.pid) == Path("/proc/self/cgroup").read_text()
    assert not cg.dir("memory", "wl").exists()


def test_same_cgroups_as_criu_py_write_no_cgroup_image(h):
    task = h.start("counter", ready=r"\d+ 5")
    images = h.dump(task)
    assert not (images / "cgroup.img").exists()
    inv = json.loads(subprocess.run([CRIT, "decode", "-i", str(images / "inventory.img")],
                                    capture_output=True, text=True, check=True).stdout)
    assert inv["entries"][0]["root_cg_set"] == 1


# ------------------------------------------------------------------ bad input
def test_property_the_kernel_refuses_fails_cleanly(h, cg):
    names = ["memory", "pids", ""]
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, names)
    images = h.dump(task)
    path = cg.path("memory", "wl")

    def spoil(entry):
        for p in find_dir(entry, "memory", path).properties:
            if p.name == "memory.limit_in_bytes":
                p.value = "lots"
    edit_cgroup_image(images, spoil)
    remove(cg, names)
    res = h.cli("restore", "-D", images, "-d", "--no-verify")   # the edit would be caught first
    assert_clean_failure(res, task, cg, names, f"memory:{path}", "memory.limit_in_bytes")


def test_strict_refuses_an_existing_cgroup_with_other_limits(h, cg):
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, ["pids"])
    images = h.dump(task)
    (cg.dir("pids", "wl") / "pids.max").write_text("9")
    res = h.cli("restore", "-D", images, "-d", "--manage-cgroups=strict")
    assert_one_line_error(res, f"pids:{cg.path('pids', 'wl')}", "pids.max", "strict")
    assert not proc_is_running(task.pid) and not yard_mounts()
    assert cg.read("pids", "wl", "pids.max") == "9"


def test_controller_the_host_lacks_fails_cleanly(h, cg):
    names = ["memory", "pids"]
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, names)
    images = h.dump(task)

    def rename(entry):
        for c in entry.controllers:
            if list(c.cnames) == ["pids"]:
                c.cnames[0] = "nosuchctl"
        for s in entry.sets:
            for m in s.ctls:
                if m.name == "pids":
                    m.name = "nosuchctl"
    edit_cgroup_image(images, rename)
    remove(cg, names)
    res = h.cli("restore", "-D", images, "-d", "--no-verify")   # the edit would be caught first
    assert_clean_failure(res, task, cg, names, "nosuchctl")


def test_none_mode_needs_the_cgroups(h, cg):
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, ["memory"])
    images = h.dump(task)
    remove(cg, ["memory"])
    res = h.cli("restore", "-D", images, "-d", "--manage-cgroups=none")
    assert_clean_failure(res, task, cg, ["memory"], "does not exist", "memory:")


@pytest.mark.parametrize("args, words", [
    (["--cgroup-props", '"cpu": - "strategy": "maybe"'], ["--cgroup-props", "maybe"]),
    (["--cgroup-props", '"cpu" oops'], ["--cgroup-props"]),
    (["--cgroup-root", "memory:relative/path"], ["--cgroup-root", "absolute"]),
    (["--cgroup-props-file", "/nonexistent/props"], ["--cgroup-props-file"]),
])
def test_bad_cgroup_options_fail_the_dump_and_keep_the_task(h, cg, args, words):
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, ["memory"])
    res = h.cli("dump", "-t", task.pid, "-D", h.images_dir(), *args)
    assert_one_line_error(res, *words)
    assert_running_untraced(task)


# ------------------------------------------------------------------ a pure cgroup2 view
def fake_v2(root: Path, path: str, files: dict) -> Path:
    d = root / "unified" / path.strip("/")
    d.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (d / name).write_text(value + "\n" if value else "")
    return d


def test_v2_memory_max_and_pids_max_through_a_yard(h, cg):
    # This host binds memory and pids to v1, so cgroup2 cannot hold memory.max here: the
    # hierarchy is played by plain directories handed over as --cgroup-yard (what a pure
    # v2 host's yard looks like), and --cgroup-dump-controller keeps only cgroup2.
    task = h.start("counter", ready=r"\d+ 5")
    place(cg, task, [""])
    wl, base = cg.path("", "wl"), cg.path("")
    dump_yard, rst_yard = h.path("dump-yard"), h.path("restore-yard")
    iface = {"cgroup.procs": "", "cgroup.subtree_control": "", "cgroup.type": "domain",
             "cgroup.max.depth": "max", "cgroup.max.descendants": "max", "cgroup.freeze": "0"}
    fake_v2(dump_yard, base, {"cgroup.controllers": "memory pids",
                              "cgroup.subtree_control": "memory pids"})
    fake_v2(dump_yard, wl, dict(iface, **{"cgroup.controllers": "memory pids",
                                          "memory.max": str(96 << 20), "memory.high": "max",
                                          "pids.max": "20"}))
    images = h.dump(task, None, "--cgroup-yard", dump_yard, "--cgroup-dump-controller", "unified")
    entry = cgroup_image(images)
    assert [c["cnames"] for c in entry["controllers"]] == [[""]]
    assert entry["sets"][0]["ctls"] == [{"name": "", "path": wl}]
    props = {p["name"]: p["value"] for p in entry["controllers"][0]["dirs"][0]["properties"]}
    assert props["memory.max"] == str(96 << 20) and props["pids.max"] == "20"
    # restore into "existing" cgroups whose files a kernel would have made (empty here:
    # a plain file is not truncated by a write, a cgroup file has no length)
    target = fake_v2(rst_yard, wl, dict(iface, **{"cgroup.controllers": "memory pids",
                                                  "memory.max": "", "memory.high": "",
                                                  "pids.max": ""}))
    h.restore(images, "--cgroup-yard", rst_yard, "--manage-cgroups=full", task=task)
    assert (target / "memory.max").read_text() == str(96 << 20)
    assert (target / "pids.max").read_text() == "20"
    assert (target / "cgroup.procs").read_text() == "0"     # the task wrote itself in
    assert (target / "cgroup.type").read_text() == "domain\n"   # only "threaded" is written
    assert not yard_mounts()


# ------------------------------------------------------------------ trees
TREE = Path(__file__).resolve().parent / "workloads" / "cgtree.py"


def start_tree(h):
    return h.start("cgtree", 2, python=True, ready=r"children \d+ \d+")


def test_tree_parent_and_children_in_different_cgroups(h, cg):
    task = start_tree(h)
    kids = [int(x) for x in task.log.lines()[-1].split()[1:]]
    place(cg, task, ["memory", "pids"], sub="parent")
    for i, kid in enumerate(kids):
        cg.make("memory", f"parent/kid{i}")
        cg.put("memory", f"parent/kid{i}", kid)
    before = {pid: cgroup_file(pid) for pid in [task.pid] + kids}
    images = h.dump(task)
    h.restore(images, task=task)
    assert {pid: cgroup_file(pid) for pid in before} == before
    task.signal(10)                                   # SIGUSR1: fork one more child
    new = int(task.log.wait(r"forked \d+").group(0).split()[1])
    assert cgroup_file(new) == before[task.pid]


def test_tree_cgroup_root_moves_the_whole_tree(h, cg):
    task = start_tree(h)
    kids = [int(x) for x in task.log.lines()[-1].split()[1:]]
    place(cg, task, ["memory"], sub="parent")
    cg.make("memory", "parent/kid")
    cg.put("memory", "parent/kid", kids[0])
    where_we_are = cgroup_file(kids[1])      # kids[1] stayed in the dumping tool's cgroups
    images = h.dump(task)
    h.restore(images, "--cgroup-root", f"memory:{cg.path('memory', 'new')}", task=task)
    assert f":memory:{cg.path('memory', 'new')}\n" in cgroup_file(task.pid)
    assert f":memory:{cg.path('memory', 'new/kid')}\n" in cgroup_file(kids[0])
    # a task in the dumping tool's own cgroups comes back in the restoring tool's, as
    # with upstream (--cgroup-root moves only the tree's own cgroups)
    assert cgroup_file(kids[1]) == where_we_are


def test_a_child_forked_after_restore_is_born_in_its_parents_cgroups(h, cg):
    # The restored task, moved in before it could fork, has its later children born in
    # its cgroups.
    task = h.start("cgtree", 0, python=True, ready=r"children.*")
    place(cg, task, ["memory", "pids"])
    before = cgroup_file(task.pid)
    images = h.dump(task)
    remove(cg, ["memory", "pids"])
    h.restore(images, task=task)
    assert cgroup_file(task.pid) == before
    task.signal(10)
    new = int(task.log.wait(r"forked \d+").group(0).split()[1])
    assert cgroup_file(new) == before
