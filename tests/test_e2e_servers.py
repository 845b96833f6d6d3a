# Real servers from Debian's packages, dumped and restored through the real CLI and
# then used from outside by clients (issue 12): redis-server (keys, a counter that goes
# on, and a client connected during the dump that keeps its connection with
# --tcp-established, under each network lock; or loses it with --tcp-close), nginx
# with a master and two workers running as www-data (every worker serves the static
# file after restore), PostgreSQL (a postmaster and its background processes as the
# postgres user, its rows, a client's connection kept by its backend, new backends
# forked after restore), Node.js (a timer-driven counter and an HTTP server), a JVM
# (an HTTP server answering from a cache a timer keeps filling), and
# python3 -m http.server. Each server listens on 127.0.0.1 on a free port; the tests
# install the packages they need and stop every process.
import os
import subprocess
import time

import pytest

from conftest import assert_one_line_error, assert_running_untraced, proc_status, wait_for
from servers import (Postgres, Redis, children, free_port, http_get, need_debian,
                     need_nftables, no_lock_left, our_locks, start_postgres, start_redis,
                     start_server, stop_postgres, track, wait_port)

assert no_lock_left            # an autouse fixture: every test here cleans up its locks


def tids(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def assert_comes_back_warm(h, task, state, min_threads: int, more: int, what: str) -> None:
    """Dump and restore a server whose state() (a tuple, its counter first) is read from
    outside: the same threads (more than min_threads) come back, every number of the
    state is where it was or further (not started again), and the counter goes on by
    at least `more`."""
    threads = tids(task.pid)
    assert len(threads) > min_threads, f"{what} runs threads"
    before = state()
    images = h.dump(task)
    h.restore(images, task=task)
    assert tids(task.pid) == threads
    first = state()
    assert all(f >= b for f, b in zip(first, before)), (before, first)
    wait_for(lambda: state()[0] >= first[0] + more, what=f"{what}'s timer after restore")


# ---------------------------------------------------------------- redis
def _fill(r: Redis, n: int = 300) -> None:
    for i in range(n):
        assert r("SET", f"key:{i}", f"value-{i}") == "OK"
    for _ in range(5):
        r("INCR", "counter")


def _check_data(r: Redis, n: int = 300) -> None:
    assert r("DBSIZE") == n + 1
    assert [r("GET", f"key:{i}") for i in (0, 7, n - 1)] == [b"value-0", b"value-7", f"value-{n - 1}".encode()]


@pytest.mark.parametrize("lock", ["nftables", "iptables", "skip"])
def test_redis_keeps_keys_counter_and_client_connection(h, lock):
    """SET before, GET after; INCR goes on; the client connected during the dump keeps
    using the very same connection (same CLIENT ID) with --tcp-established, whatever
    the network lock; the lock is there while the tree is dumped and gone after."""
    if lock == "nftables":
        need_nftables()
    elif lock == "iptables":
        need_debian("iptables", "iptables")
    port = free_port()
    task = start_redis(h, port)
    r = Redis(port)
    try:
        _fill(r)
        client_id = r("CLIENT", "ID")
        threads = tids(task.pid)
        assert len(threads) > 1, "redis-server runs threads"
        images = h.dump(task, None, "--tcp-established", "--network-lock", lock)
        if not h.no_cr:
            if lock == "nftables":
                assert any("CRIU-" in line for line in our_locks(h))
            elif lock == "iptables":
                assert sum("DROP" in line for line in our_locks(h)) == 2
        h.restore(images, "--tcp-established", task=task)
        assert not our_locks(h)
        assert tids(task.pid) == threads
        _check_data(r)
        assert r("INCR", "counter") == 6
        assert r("CLIENT", "ID") == client_id, "not the same connection"
        other = Redis(port)
        try:
            assert other("INCR", "counter") == 7
            assert other("GET", "key:299") == b"value-299"
            assert r("CLIENT", "ID") != other("CLIENT", "ID")
        finally:
            other.close()
    finally:
        r.close()


@pytest.mark.needs_tool
def test_redis_connected_client_refused_without_option_then_tcp_close(h):
    port = free_port()
    task = start_redis(h, port)
    r = Redis(port)
    try:
        _fill(r)
        res = h.cli("dump", "-t", task.pid, "-D", h.images_dir("refused"))
        assert_one_line_error(res, f"pid {task.pid}", f"127.0.0.1:{port}", "--tcp-established")
        assert_running_untraced(task)
        assert r("INCR", "counter") == 6          # the refused dump changed nothing
        images = h.dump(task, None, "--tcp-close")
        res = h.cli("restore", "-D", images, "-d")
        assert_one_line_error(res, "--tcp-close")
        assert not os.path.exists(f"/proc/{task.pid}")
        h.restore(images, "--tcp-close", task=task)
        with pytest.raises((ConnectionError, OSError)):
            r("PING")                              # the old connection is gone
    finally:
        r.close()
    other = Redis(port)
    try:
        _check_data(other)
        assert other("INCR", "counter") == 7
    finally:
        other.close()


def test_redis_leave_running_with_connected_client(h):
    need_nftables()
    port = free_port()
    task = start_redis(h, port)
    r = Redis(port)
    try:
        _fill(r, 20)
        h.dump(task, None, "--tcp-established", leave_running=True)
        assert not our_locks(h)
        assert_running_untraced(task)
        assert r("INCR", "counter") == 6
        _check_data(r, 20)
    finally:
        r.close()


# ---------------------------------------------------------------- nginx
NGINX_CONF = """user www-data;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{
	worker_connections 768;
}}
http {{
	sendfile on;
	tcp_nopush on;
	types_hash_max_size 2048;
	include /etc/nginx/mime.types;
	default_type application/octet-stream;
	access_log {dir}/access.log;
	gzip on;
	server {{
		listen 127.0.0.1:{port};
		root {dir}/www;
		add_header X-Worker $pid always;
	}}
}}
"""


def test_nginx_master_and_two_unprivileged_workers(h):
    """nginx as Debian ships it (daemon, master as root, two workers as www-data; the
    listening socket shared by all three, a socketpair per worker, epoll, shared
    memory): after restore each worker serves the static file."""
    nginx = need_debian("nginx", "nginx")
    port = free_port()
    os.chmod(h.dir, 0o755)
    www = h.path("www")
    www.mkdir(mode=0o755)
    page = f"static page {os.getpid()}\n".encode()
    (www / "index.html").write_bytes(page)
    conf = h.path("nginx.conf")
    conf.write_text(NGINX_CONF.format(dir=h.dir, port=port))
    res = subprocess.run([nginx, "-c", str(conf), "-p", str(h.dir)], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 0, res.stderr
    master_pid = wait_for(lambda: _read_int(h.path("nginx.pid")), what="nginx's pid file")
    master = track(h, master_pid, str(conf))
    workers = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(children(master_pid)),
                       what="nginx's two workers")
    for w in workers:
        track(h, w, "nginx: worker process")
    wait_port(port)
    www_uid = int(subprocess.run(["id", "-u", "www-data"], capture_output=True, text=True).stdout)
    # a worker drops its privileges a moment after its fork
    wait_for(lambda: [int(proc_status(w)["Uid"].split()[0]) for w in workers] == [www_uid] * 2,
             what="nginx's workers to run as www-data")
    assert _workers_serving(port, page) == set(workers)
    images = h.dump(master)
    h.restore(images, task=master)
    assert sorted(children(master_pid)) == sorted(workers)
    assert [int(proc_status(w)["Uid"].split()[0]) for w in workers] == [www_uid] * 2
    assert _workers_serving(port, page) == set(workers), "a worker does not serve"


def _read_int(path):
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _workers_serving(port: int, page: bytes) -> set:
    """The pids of the workers that answered, trying until both did (or 200 requests)."""
    import concurrent.futures
    seen = set()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(25):
            for body, headers in pool.map(lambda _: http_get(port, "/index.html"), range(8)):
                assert body == page
                seen.add(int(headers["X-Worker"]))
            if len(seen) >= 2:
                break
    return seen


# ---------------------------------------------------------------- PostgreSQL
def test_postgres_keeps_rows_a_connected_client_and_forks_new_backends(h):
    """PostgreSQL as the postgres user: the postmaster and its background processes
    (checkpointer, background and WAL writers, logical replication launcher) sharing
    System V and anonymous shared memory, and the backend of a client connected over TCP
    during the dump. After restore with --tcp-established that same
    backend answers on that same connection; a new connection gets a backend the restored
    postmaster forks, whose write both see."""
    port = free_port()
    master = start_postgres(h, port)
    try:
        db = Postgres(port)
        try:
            db("create table t (k int primary key, v text)")
            db("insert into t select g, 'v' || g from generate_series(1, 1000) g")
            procs = wait_for(lambda: (lambda c: c if len(c) >= 5 else None)(children(master.pid)),
                             what="postgres's background processes and backend")
            assert db.backend_pid in procs
            for pid in procs:
                track(h, pid, "postgres")
            images = h.dump(master, None, "--tcp-established")
            h.restore(images, "--tcp-established", task=master)
            assert sorted(children(master.pid)) == sorted(procs)
            assert db("select count(*), sum(k), pg_backend_pid() from t") == \
                [("1000", "500500", str(db.backend_pid))], "not the same backend and rows"
            other = Postgres(port)
            try:
                assert other.backend_pid not in procs
                other("insert into t values (1001, 'after the restore')")
                assert other("select count(*) from t") == [("1001",)]
            finally:
                other.close()
            assert db("select v from t where k = 1001") == [("after the restore",)]
        finally:
            db.close()
    finally:
        stop_postgres(h, master)


# ---------------------------------------------------------------- Node.js
NODE_SERVER = """
const http = require('http');
let ticks = 0;
setInterval(() => {{ ticks++; }}, 20);
http.createServer((req, res) => {{ res.end(`${{ticks}} ${{process.pid}}\\n`); }})
    .listen({port}, '127.0.0.1');
"""


def test_node_timer_and_http_server(h):
    """Node.js (V8 and libuv: worker threads, epoll, eventfds): the counter a setInterval
    drives goes on after restore from where it was (not from 0), in the same process with
    the same threads, and the same server answers with it."""
    node = need_debian("node", "nodejs")
    port = free_port()
    script = h.path("server.js")
    script.write_text(NODE_SERVER.format(port=port))
    task = start_server(h, [node, str(script)], str(script), "node.out")
    wait_port(port)

    def ticks() -> tuple[int]:
        body = http_get(port)[0].split()
        assert int(body[1]) == task.pid
        return (int(body[0]),)

    wait_for(lambda: ticks()[0] >= 50, what="node's timer")
    assert_comes_back_warm(h, task, ticks, 1, 5, "node")


# ---------------------------------------------------------------- Java
JAVA_SERVER = """
import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicLong;

public class Warm {
    public static void main(String[] args) throws Exception {
        AtomicLong ticks = new AtomicLong();
        ConcurrentHashMap<Long, Long> cache = new ConcurrentHashMap<>();
        ScheduledExecutorService timer = Executors.newScheduledThreadPool(2);
        timer.scheduleAtFixedRate(() -> {
            long n = ticks.incrementAndGet();
            cache.put(n % 1000, n * n);
        }, 0, 10, TimeUnit.MILLISECONDS);
        HttpServer http = HttpServer.create(
            new InetSocketAddress("127.0.0.1", Integer.parseInt(args[0])), 0);
        http.setExecutor(Executors.newFixedThreadPool(4));
        http.createContext("/", x -> {
            long n = ticks.get();
            byte[] body = (n + " " + ProcessHandle.current().pid() + " " + cache.size() + " "
                           + cache.get(n % 1000) + "\\n").getBytes();
            x.sendResponseHeaders(200, body.length);
            x.getResponseBody().write(body);
            x.close();
        });
        http.start();
    }
}
"""


def test_java_http_server_with_a_warm_cache(h):
    """A JVM (HotSpot: ~20 threads, its JIT and GC, the perf-data file it maps): a timer
    fills a cache while an HTTP server answers with it. After the restore the same JVM
    answers, its cache and counter where they were (not empty, not from 0), and both go
    on: the warm state is the point of restoring a JVM instead of starting one."""
    javac = need_debian("javac", "default-jdk-headless")
    java = os.path.join(os.path.dirname(os.path.realpath(javac)), "java")
    src = h.path("java")
    src.mkdir()
    (src / "Warm.java").write_text(JAVA_SERVER)
    res = subprocess.run([javac, "-d", str(src), str(src / "Warm.java")], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    port = free_port()
    task = start_server(h, [java, "-Xmx64m", "-cp", str(src), "Warm", str(port)], str(src),
                        "java.out")
    wait_port(port, timeout=30)

    def state() -> tuple[int, int]:
        ticks, pid, size, square = http_get(port)[0].split()
        assert int(pid) == task.pid and int(square) == int(ticks) ** 2
        return int(ticks), int(size)

    wait_for(lambda: state()[0] >= 300, timeout=30, what="the JVM's cache to warm up")
    assert_comes_back_warm(h, task, state, 10, 20, "the JVM")


# ---------------------------------------------------------------- http.server
def test_python_http_server(h):
    port = free_port()
    www = h.path("www")
    www.mkdir()
    (www / "hello.txt").write_bytes(b"hello from http.server\n")
    task = start_server(h, ["/usr/bin/python3", "-m", "http.server", str(port), "--bind",
                            "127.0.0.1", "--directory", str(www)], str(www), "http.log")
    wait_port(port)
    assert http_get(port, "/hello.txt")[0] == b"hello from http.server\n"
    images = h.dump(task)
    time.sleep(0.2)
    h.restore(images, task=task)
    for _ in range(3):
        assert http_get(port, "/hello.txt")[0] == b"hello from http.server\n"
