# Images both ways with upstream CRIU 4.2 (../shared/reference/criu-4.2, built for these
# machines): criu-py restores what upstream dumped, and upstream restores what criu-py
# dumped, for a single process, a multi-threaded one and a whole tree with groups,
# sessions and a zombie. Each restored tree is checked as in criu-py's own tests. The
# reference is not part of a clone: without it these tests skip, saying why.
import os
import signal
import subprocess

import pytest

from conftest import REPO, Task, dumped_pids, reap_gone, wait_for
from servers import no_lock_left
from test_e2e_tree import last_ticks, tree_of

assert no_lock_left            # an autouse fixture: the socket tests clean up their locks
UPSTREAM = REPO.parent / "shared" / "reference" / "criu-4.2" / "criu"


def upstream_works() -> str | None:
    if not os.access(UPSTREAM, os.X_OK):
        return f"upstream CRIU 4.2 is not at {UPSTREAM}"
    try:
        res = subprocess.run([UPSTREAM, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"upstream CRIU 4.2 does not run here: {exc}"
    if res.returncode != 0 or "4.2" not in res.stdout:
        return f"upstream CRIU 4.2 does not run here (run its setup.sh): {res.stderr.strip()[:200]}"
    return None


pytestmark = [pytest.mark.needs_tool,
              pytest.mark.skipif(upstream_works() is not None, reason=str(upstream_works()))]


def upstream(h, *args) -> None:
    res = subprocess.run([UPSTREAM, *map(str, args)], capture_output=True, text=True, timeout=120,
                         cwd=h.dir, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"upstream criu {args[0]} failed: {res.stderr[-2000:]}"


def upstream_dump(h, task):
    images = h.images_dir("upstream")
    upstream(h, "dump", "-t", task.pid, "-D", images, "-o", "dump.log", "-v4")
    task.reap(timeout=10)
    reap_gone(dumped_pids(images))
    return images


def upstream_restore(h, images, task):
    from conftest import Task
    restored = Task(task.pid, task.marker, task.log)
    h.tasks.append(restored)
    upstream(h, "restore", "-D", images, "-d", "-o", "restore.log", "-v4")
    assert restored.running()
    return restored


def cross(h, task, direction):
    """Dump with one tool, restore with the other."""
    if direction == "upstream-to-criu-py":
        return h.restore(upstream_dump(h, task), task=task)
    return upstream_restore(h, h.dump(task), task)


DIRECTIONS = ["upstream-to-criu-py", "criu-py-to-upstream"]


def vdso_maps(pid: int) -> list[str]:
    """The vdso and vvar areas of a process, as /proc/PID/maps shows them."""
    with open(f"/proc/{pid}/maps") as f:
        return [" ".join(line.split()[::5]) for line in f
                if line.rstrip().endswith(("[vdso]", "[vvar]", "[vvar_vclock]"))]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_counter(h, direction):
    """The count goes on, and the vdso and vvar are back where they were (a restore that
    takes the dumped vdso for another kernel's moves the live one elsewhere and leaves
    a patched copy at the old address, upstream's "vdso proxy")."""
    task = h.start("counter", ready=r"\d+ 5")
    before = vdso_maps(task.pid)
    assert any("[vdso]" in m for m in before)
    restored = cross(h, task, direction)
    assert vdso_maps(task.pid) == before
    dumped = int(task.log.lines()[-1].split()[1])
    task.log.wait(rf"{task.pid} {dumped + 3}")
    rows = [int(line.split()[1]) for line in task.log.lines()]
    assert rows == list(range(1, len(rows) + 1))
    assert restored.running()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_stopped_counter(h, direction):
    """A task dumped in a group stop (task_state 3, stop_signo) comes back stopped and
    counts on after a SIGCONT."""
    from test_e2e_stopped import assert_goes_on, assert_stays_stopped, count, stop
    task = h.start("counter", ready=r"\d+ 5")
    stop(task.pid)
    last = count(task)
    cross(h, task, direction)
    assert_stays_stopped(task.pid, task.log)
    assert_goes_on(task, last)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_threads(h, direction):
    task = h.start("threads", ready=r"tids .*")
    tids = [int(x) for x in task.log.lines()[0].split()[2:]]
    task.log.wait(rf"tick {task.pid} .*", count=3)
    restored = cross(h, task, direction)
    assert sorted(int(t) for t in os.listdir(f"/proc/{task.pid}/task")) == sorted([task.pid] + tids)
    n = len(task.log.matches(rf"tick {task.pid} .*"))
    task.log.wait(rf"tick {task.pid} .*", count=n + 3)
    restored.signal(signal.SIGUSR1)
    assert task.log.wait(rf"(OK|BAD) {task.pid}.*", timeout=10).group(0) == f"OK {task.pid}"


def stat_of(pid: int) -> tuple:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2]), int(fields[3]), fields[0].replace("S", "R")


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_forest(h, direction):
    task = h.start("forest", ready=r"ready \d+")
    before = tree_of(task.pid)
    # every member is cleaned up by PID: upstream's restore may give some to another parent
    h.tasks += [Task(p, task.marker, None) for p in before if p != task.pid]
    cross(h, task, direction)
    at_dump = last_ticks(task.log)
    after = {pid: stat_of(pid) for pid in before}
    before[task.pid] = (after[task.pid][0],) + before[task.pid][1:]
    if direction == "criu-py-to-upstream":
        # Upstream 4.2 gives the members of a session whose leader had exited back to
        # the wrong parent (to whatever reaps orphans, not to their dumped parent, a
        # child subreaper): it does the same with its own images. Everything else holds.
        orphans = {p for p, v in before.items() if v[2] not in before}
        assert orphans
        for p in orphans:
            before[p] = (after[p][0],) + before[p][1:]
    assert after == before
    live = [p for p, v in before.items() if v[3] != "Z"]
    wait_for(lambda: all(last_ticks(task.log).get(p, 0) > at_dump[p] + 1 for p in live),
             timeout=10, what="every process to tick twice more")


def test_upstream_restores_an_incremental_chain(h):
    # criu-py's pre-dump and incremental dump (PE_PARENT entries, the parent link):
    # upstream follows the chain and the task finds every page as it wrote it
    task = h.start("dirtier", 32, 20, ready=r"ready \d+")
    pre = h.images_dir("pre")
    res = h.cli("pre-dump", "-t", task.pid, "-D", pre, "-o", "pre.log")
    assert res.returncode == 0, res.stderr
    before = len(task.log.matches(r"marked \d+"))
    task.signal(signal.SIGUSR2)
    marked = int(task.log.wait(r"marked (\d+)", count=before + 1).group(1))
    images = h.dump(task, h.images_dir("dump"), "--track-mem", "--prev-images-dir", "../pre")
    restored = upstream_restore(h, images, task)
    restored.signal(signal.SIGUSR1)
    line = task.log.wait(rf"(OK|BAD) {task.pid} .*", timeout=30).group(0)
    assert line.startswith(f"OK {task.pid} ") and line.endswith(f"p7={marked}"), line


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_inotify_watcher(h, direction):
    d = h.path("watched")
    d.mkdir()
    task = h.start("notifier", d, "-", ready=r"ready \d+")
    import re
    m = re.fullmatch(r"wds a=(\d+) b=(\d+) c=(\d+) dir=(\d+) extra=", task.log.lines()[0])
    wa, wdir = int(m.group(1)), int(m.group(4))
    restored = cross(h, task, direction)
    with open(d / "a", "a") as f:
        f.write("x")
    (d / "new").touch()
    task.log.wait(rf"inotify wd={wa} mask=0x8 name=")
    task.log.wait(rf"inotify wd={wdir} mask=0x100 name=new")
    assert restored.running()
# ---- fd kinds, timers, terminals (issue 11)
def fd_kinds_cross(h, name, direction, *args, extra=()):
    task = h.start(name, *args, ready=r"ready .*")
    if direction == "upstream-to-criu-py":
        images = h.images_dir("upstream")
        upstream(h, "dump", "-t", task.pid, "-D", images, "-o", "dump.log", "-v4", *extra)
        task.reap(timeout=10)
        reap_gone(dumped_pids(images))
        return task, h.restore(images, *extra, task=task)
    images = h.dump(task, None, *extra)
    from conftest import Task
    restored = Task(task.pid, task.marker, task.log)
    h.tasks.append(restored)
    upstream(h, "restore", "-D", images, "-d", "-o", "restore.log", "-v4", *extra)
    return task, restored


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_posix_timers_and_itimers(h, direction):
    task, restored = fd_kinds_cross(h, "timers", direction)
    wtid = int(task.log.matches(r"ready \d+ (\d+)")[0].group(1))
    for pattern in (rf"rt {task.pid} \d+ abc", rf"thread {wtid} \d+", rf"alrm {task.pid} \d+"):
        n = len(task.log.matches(pattern))
        task.log.wait(pattern, count=n + 2)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_program_in_a_pty(h, direction):
    task, restored = fd_kinds_cross(h, "pty", direction)
    child = int(task.log.matches(r"ready \d+ (\d+) \d+")[0].group(1))
    pattern = rf"got {child} ping \d+ rows=33 cols=111 echo=0 fg=1"
    n = len(task.log.matches(pattern))
    task.log.wait(pattern, count=n + 3)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fifo_ghost_and_locks(h, direction):
    workdir = h.path("fs")
    workdir.mkdir()
    task, restored = fd_kinds_cross(h, "filestate", direction, workdir, extra=("--file-locks",))
    restored.signal(signal.SIGUSR1)
    m = task.log.wait(rf"check {task.pid} .*")
    assert "fifo=queued-before-dump ghost=ghost@7 nlink=0 map=ok" in m.group(0), m.group(0)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_deleted_cwd(h, direction):
    """A working directory removed after the task went there: a ghost directory either
    tool makes again for the other's restore, and removes again."""
    cwd = h.path("gone")
    cwd.mkdir()
    task = h.start("counter", ready=r"\d+ 3", cwd=cwd)
    cwd.rmdir()
    restored = cross(h, task, direction)
    assert os.readlink(f"/proc/{task.pid}/cwd") == f"{cwd} (deleted)"
    assert not cwd.exists()
    task.log.wait(rf"{task.pid} \d+", count=len(task.log) + 2)
    assert restored.running()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_asyncio_epoll_loop(h, direction, tmp_path):
    # epoll watching the self-pipe and signal delivery through it; upstream's images
    # name epoll targets by fd number only, criu-py's also by files.img id
    import subprocess
    import sys
    from conftest import Log, Task
    from test_e2e_events import ASYNCIO_SRC
    script = tmp_path / "aloop.py"
    script.write_text(ASYNCIO_SRC)
    log = Log(h.path("aloop.log"))
    p = subprocess.Popen([sys.executable, str(script), str(log.path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, cwd=h.dir)
    task = Task(p.pid, str(log.path), log, p)
    h.tasks.append(task)
    log.wait(rf"beat {p.pid} .*", count=2, timeout=30)
    if direction == "upstream-to-criu-py":
        images = upstream_dump(h, task)
        restored = h.restore(images, task=task)
    else:
        restored = upstream_restore(h, h.dump(task), task)
    n = len(log.matches(rf"beat {p.pid} .*"))
    log.wait(rf"beat {p.pid} .*", count=n + 2)
    restored.signal(signal.SIGUSR1)
    log.wait(rf"ping {p.pid}")


# ---- sockets (issue 12)
TCP = ("--tcp-established", "--network-lock", "nftables")


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_unix_pair_with_queued_data(h, direction):
    from test_e2e_sockets import check_pair
    task, _ = fd_kinds_cross(h, "sockpair", direction, h.path("pair.sock"), h.path("go"))
    check_pair(h, task)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_unix_socket_shapes(h, direction):
    from test_e2e_sockets import check_unix_shapes
    h.path("socks").mkdir()
    task, _ = fd_kinds_cross(h, "unixsk", direction, h.path("socks"), h.path("go"))
    check_unix_shapes(h, task)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_inet_sockets_and_established_tcp(h, direction):
    from servers import need_nftables
    from test_e2e_sockets import check_inet
    need_nftables()
    task, _ = fd_kinds_cross(h, "inetsk", direction, h.path("go"), extra=TCP)
    check_inet(h, task)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_redis_with_connected_client(h, direction):
    from servers import Redis, free_port, need_nftables, start_redis
    need_nftables()
    port = free_port()
    task = start_redis(h, port)
    r = Redis(port)
    try:
        for i in range(50):
            r("SET", f"k{i}", f"v{i}")
        assert r("INCR", "n") == 1
        cid = r("CLIENT", "ID")
        if direction == "upstream-to-criu-py":
            images = h.images_dir("upstream")
            upstream(h, "dump", "-t", task.pid, "-D", images, "-o", "dump.log", "-v4", *TCP)
            task.reap(timeout=10)
            reap_gone(dumped_pids(images))
            h.restore(images, *TCP, task=task)
        else:
            images = h.dump(task, None, *TCP)
            restored = Task(task.pid, task.marker, None)
            h.tasks.append(restored)
            upstream(h, "restore", "-D", images, "-d", "-o", "restore.log", "-v4", *TCP)
        assert (r("GET", "k42"), r("INCR", "n"), r("CLIENT", "ID")) == (b"v42", 2, cid)
    finally:
        r.close()
    assert "CRIU-" not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                         text=True).stdout


def test_nginx_criu_py_to_upstream(h):
    """Upstream 4.2 cannot dump nginx's unprivileged workers here (it fails reading
    their rlimits without CAP_SYS_RESOURCE), so only this direction: upstream restores
    criu-py's dump and every worker serves."""
    from servers import children, need_debian, track, wait_port
    from test_e2e_servers import NGINX_CONF, _read_int, _workers_serving
    nginx = need_debian("nginx", "nginx")
    from servers import free_port
    port = free_port()
    os.chmod(h.dir, 0o755)
    www = h.path("www")
    www.mkdir(mode=0o755)
    page = b"upstream restores nginx\n"
    (www / "index.html").write_bytes(page)
    conf = h.path("nginx.conf")
    conf.write_text(NGINX_CONF.format(dir=h.dir, port=port))
    subprocess.run([nginx, "-c", str(conf), "-p", str(h.dir)], check=True, timeout=60,
                   stdin=subprocess.DEVNULL, capture_output=True)
    master_pid = wait_for(lambda: _read_int(h.path("nginx.pid")), what="nginx's pid file")
    master = track(h, master_pid, str(conf))
    workers = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(children(master_pid)),
                       what="nginx's two workers")
    for w in workers:
        track(h, w, "nginx: worker process")
    wait_port(port)
    images = h.dump(master)
    restored = Task(master.pid, master.marker, None)
    h.tasks.append(restored)
    upstream(h, "restore", "-D", images, "-d", "-o", "restore.log", "-v4")
    assert _workers_serving(port, page) == set(workers)
