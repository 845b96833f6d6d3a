# The restore's image reading and planning on upstream CRIU 4.2 images (the fixtures):
# they cannot be restored here (their PIDs, binaries and log paths belong to another
# machine), but everything up to the fork must understand them: merged vvar entries,
# vdso pages in the pagemap, pagemap entries spanning two VMAs, 62 sigactions, a tree
# of three processes sharing pipes.
import signal

import pytest

from criu_py import mem as M
from criu_py.errors import CriuError
from criu_py.images import ImageDir
from criu_py.restore import images as restore_images

from conftest import FIXTURES


def load_without_path_checks(name, monkeypatch):
    monkeypatch.setattr(restore_images, "_check_path", lambda *args: None)
    return restore_images._load(ImageDir(str(FIXTURES / name)))


@pytest.mark.parametrize("name", ["counter"])
def test_upstream_images_plan(name, monkeypatch):
    from criu_py.mem.restore import check_vdso, pie_vmas
    from criu_py.restore.task import mm_map, sigactions, task_registers
    t = load_without_path_checks(name, monkeypatch).root
    mem = t.memory
    assert mem.vdso_vvar and len(mem.special) == 2          # upstream: one vvar + one vdso entry
    check_vdso(mem, t.mm, t.pid)                             # same kernel layout as here
    assert all(not v.status & (M.VMA_AREA_VDSO | M.VMA_AREA_VVAR | M.VMA_AREA_VSYSCALL)
               for v in mem.vmas)
    skipped = sum(n for a, n in mem.iovs if a is None)
    assert skipped == 2 * M.PAGE_SIZE                        # the dumped vdso pages are dropped
    assert sum(n for _, n in mem.iovs) == mem.pages_bytes
    acts = sigactions(t.core)
    assert len(acts) == 62 and signal.SIGKILL not in acts and signal.SIGSTOP not in acts
    regs = task_registers(t.core)
    assert regs.gp["cs"] == 0x33 and len(regs.xsave) >= 576
    mm = mm_map(t.mm)
    assert mm["auxv"][-2:] == [0, 0] and mm["start_code"] < mm["end_code"]
    for mf in mem.files.values():
        mf.fd = 100
    vmas = pie_vmas(mem)
    assert len(vmas) == len(mem.vmas)


def test_upstream_images_refused_here_with_one_line():
    # the binaries and log files of the fixtures do not exist here
    with pytest.raises(CriuError, match=r"does not exist on this system"):
        restore_images.load(str(FIXTURES / "counter"))
    with pytest.raises(CriuError, match=r"does not exist on this system"):
        restore_images.load(str(FIXTURES / "tree"))


def test_upstream_tree_plans_shared_pipes(monkeypatch):
    from criu_py.restore.tree import plan_tree
    tree = load_without_path_checks("tree", monkeypatch)
    assert [t.pid for t in tree.tasks] == [14994, 14996, 14997]
    assert all(len(t.threads) == 1 for t in tree.tasks)
    plan = plan_tree(tree, root_sid=14994, root_pgid=14994)
    assert [c.pid for c in plan.root.children] == [14996, 14997]
    # the three pipes of the ring (and one all three hold): each made once, by the root,
    # before it forks; the files they all inherited (log, /dev/null) too
    pipes = [r for r in plan.resources.values() if r.kind == "pipe"]
    assert len(pipes) == 4 and all(len(r.users) >= 2 and r.opener is plan.root for r in pipes)
    shared = [r for r in plan.resources.values() if r.kind == "file"]
    assert shared and all(r.opener is plan.root for r in shared if len(r.users) == 3)
    assert not any(c.clone_flags for c in plan.root.children)


def test_upstream_inotify_images_need_their_watched_paths(monkeypatch):
    # upstream 4.2's watcher: its inotify fd is read, and its watches name paths that
    # this machine lacks: refused before the fork, naming the watch
    with pytest.raises(CriuError, match=r"fd 4: inotify wd 2 watches "
                                        r"/tmp/peer/watched/file, which does not exist"):
        load_without_path_checks("watcher", monkeypatch)


def test_upstream_inotify_images_plan(monkeypatch):
    from criu_py.files import inotify
    monkeypatch.setattr(inotify.InotifyOps, "check_image", lambda self, tree, entry, what: None)
    tree = load_without_path_checks("watcher", monkeypatch)
    [fi] = [fi for fi in tree.root.fdinfos if fi.type == inotify.FD_TYPE_INOTIFY]
    fe = tree.files[fi.id]
    assert sorted(w.wd for w in fe.ify.wd) == [1, 2]
    assert {w.f_handle.path for w in fe.ify.wd} == {"/tmp/peer/watched", "/tmp/peer/watched/file"}
