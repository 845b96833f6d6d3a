# A dumper killed at any instant never hurts its target (issue 8). The regwatch workload
# checks its own general registers, signal mask and restarted sleeps all the time; the
# dumper (`dump -R`) kills itself with SIGKILL at the N-th point between two ptrace
# operations of the seize and the injection (test hook CRIU_PY_TEST_KILL_AT=N), for every
# N up to 40 and then every 7th to the end, and is also killed from outside at random
# instants (fixed seed). After each kill, checked from outside: the task runs, untraced
# and unstopped, logs new ticks and no BAD line; every executable mapping has the same
# bytes; SigBlk is the same; the maps are the same but for at most a scratch page (the
# documented worst case). SIGINT and SIGTERM of the dumper abort it cleanly. Both ways
# of running injected code are covered: free-running blobs ended by a signal the task
# ignores (regwatch as is), and blobs stepped from syscall to syscall (regwatch catch,
# which handles every signal the first way could use).
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import proc_status, wait_for

pytestmark = pytest.mark.needs_tool

SCRATCH = "rwxp"


def code_bytes(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end, perms, path in maps(pid):
            if perms[2] == "x" and path not in ("[vsyscall]", ""):   # not a scratch page
                mem.seek(start)
                out[(start, path)] = mem.read(end - start)
    return out


def maps(pid: int) -> list:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


class Watch:
    """What must not change in the target, and the checks after each kill."""

    def __init__(self, task):
        self.task = task
        self.code = code_bytes(task.pid)
        self.maps = maps(task.pid)
        self.sigblk = proc_status(task.pid)["SigBlk"]
        self.scratch_left = 0

    def check(self, what: str) -> None:
        task = self.task

        def settled():
            st = task.status()
            return st and st["TracerPid"] == "0" and st["State"][0] in "RS"
        wait_for(settled, 5, f"task {task.pid} running untraced after {what} ({task.status()})")
        n = len(task.log)
        task.log.wait(r"tick \d+ \d+ ok", count=len(task.log.matches(r"tick .*")) + 2, timeout=10)
        bad = task.log.matches(r"BAD .*")
        assert not bad, f"after {what}: {bad}"
        assert len(task.log) > n
        assert proc_status(task.pid)["SigBlk"] == self.sigblk, what
        assert code_bytes(task.pid) == self.code, f"code changed after {what}"
        now = maps(task.pid)
        extra = [m for m in now if m not in self.maps]
        # leaked scratch pages may merge with each other into one mapping
        assert all(m[2] == SCRATCH and m[3] == "" for m in extra), \
            f"after {what}: unexpected mappings {extra}"
        assert all(m in now for m in self.maps if m[2] != "rw-p" or m[3] != "[stack]"), what
        self.scratch_left = sum(m[1] - m[0] for m in extra) // 4096


def dump_argv(h, task, images):
    return h.cli_argv("dump", "-t", task.pid, "-D", images, "-R", "-v0")


# free: blobs run free and end with a signal the task ignores; stepped: the task handles
# every such signal, so its blobs are stepped from syscall to syscall (many more points)
@pytest.mark.parametrize("mode, points", [("free", 15), ("stepped", 60)])
def test_killed_at_every_point_of_the_injection(h, mode, points):
    task = h.start("regwatch", *(["catch"] if mode == "stepped" else []), ready=r"ready \d+")
    watch = Watch(task)
    images = h.images_dir()
    n, killed, done_at = 1, 0, None
    while done_at is None:
        res = subprocess.run(dump_argv(h, task, images), capture_output=True, text=True,
                             timeout=60, env={**os.environ, "CRIU_PY_TEST_KILL_AT": str(n)})
        if res.returncode == 0:
            done_at = n
        else:
            assert res.returncode == -signal.SIGKILL, (n, res.returncode, res.stderr)
            killed += 1
        watch.check(f"a dumper killed at point {n}")
        n += 1 if n < 40 else 7
    assert done_at > points, "the injection should pass many kill points"
    print(f"kill points: {killed} kills, dump completes after point {done_at - 1}; "
          f"scratch pages left: {watch.scratch_left}")


def test_killed_at_every_point_of_a_page_server_dump(h):
    """dump --page-server: the task hands its pages over with vmsplice in a free-running
    blob. A dumper killed at any point, while that blob runs included (its pipe then has
    no reader: the task's vmsplice fails with EPIPE and the blob takes back the SIGPIPE
    it raised), never hurts the task."""
    import socket
    task = h.start("regwatch", ready=r"ready \d+")
    watch = Watch(task)
    images = h.images_dir()
    n, done_at = 1, None
    while n < 200:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r, w = os.pipe()
        server = subprocess.Popen(h.cli_argv("page-server", "-D", h.images_dir("ps"),
                                             "--address", "127.0.0.1", "--port", port,
                                             "--status-fd", w),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  pass_fds=[w])
        h.popens.append(server)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        # (not -R: a page-server dump kills the tree once its pages are sent)
        argv = h.cli_argv("dump", "-t", task.pid, "-D", images, "-v0", "--page-server",
                          "--address", "127.0.0.1", "--port", port)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "CRIU_PY_TEST_KILL_AT": str(n)})
        if res.returncode == 0:
            assert server.wait(30) == 0
            done_at = n                  # and the task was killed by its dump
            break
        assert res.returncode == -signal.SIGKILL, (n, res.returncode, res.stderr)
        server.kill()                    # it may still wait for a connection
        server.wait(30)
        watch.check(f"a page-server dumper killed at point {n}")
        n += 1
    assert done_at, "the dump should complete after its last kill point"
    print(f"page-server dump completes after point {done_at - 1}; scratch pages left: "
          f"{watch.scratch_left}")


@pytest.mark.parametrize("mode", ["free", "stepped"])
def test_killed_at_random_instants(h, mode):
    task = h.start("regwatch", *(["catch"] if mode == "stepped" else []), ready=r"ready \d+")
    watch = Watch(task)
    images = h.images_dir()
    t0 = time.monotonic()
    res = subprocess.run(dump_argv(h, task, images), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    whole = time.monotonic() - t0
    rng = random.Random(8)
    outcomes = {"killed": 0, "finished": 0}
    for i in range(30):
        p = subprocess.Popen(dump_argv(h, task, images), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.1) * whole)
        p.send_signal(signal.SIGKILL)
        rc = p.wait(60)
        outcomes["killed" if rc == -signal.SIGKILL else "finished"] += 1
        watch.check(f"random kill {i}")
    print(f"random kills: {outcomes}, whole dump {whole * 1e3:.0f} ms")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_abort_the_dump_cleanly(h, sig):
    task = h.start("regwatch", ready=r"ready \d+")
    watch = Watch(task)
    images = h.images_dir()
    aborted = 0
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1):
        p = subprocess.Popen(dump_argv(h, task, images), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        wait_for_handlers(p.pid)
        time.sleep(delay)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert "Traceback" not in err, err
        if p.returncode != 0:
            lines = [x for x in err.splitlines() if x.strip()]
            assert len(lines) == 1 and lines[0].startswith("Error:"), lines
            assert p.returncode == 128 + sig or "interrupted" not in err, (p.returncode, err)
            aborted += "interrupted" in err
        watch.check(f"signal {sig} after {delay} s")
    assert watch.scratch_left == 0
    print(f"signal {sig}: {aborted} of 5 dumps aborted, the others had finished")


def test_regwatch_notices_a_changed_register(h):
    """The workload's checks can fail: r12 changed under it while it is in its loop."""

    from criu_py import arch_x86
    from criu_py.ptrace import seized
    task = h.start("regwatch", ready=r"ready \d+")
    for _ in range(200):
        with seized(task.pid) as t:
            regs = arch_x86.gpregs_from_bytes(t.get_gpregs())
            if regs["r12"] == (-0x3456789) & (2**64 - 1):
                regs["r12"] ^= 1
                t.set_gpregs(arch_x86.gpregs_to_bytes(regs))
                break
        time.sleep(0.002)
    else:
        pytest.fail("never caught regwatch inside its register loop")
    task.log.wait(r"BAD \d+ registers", timeout=5)


def wait_for_handlers(pid: int) -> None:
    """Until criu-py has installed its SIGTERM handler (before that, the interpreter is
    still starting and a signal has its default effect, which no code of ours can change)."""
    def caught():
        st = proc_status(pid)
        return st is None or int(st["SigCgt"], 16) >> (signal.SIGTERM - 1) & 1
    wait_for(caught, 30, f"pid {pid} to install its signal handlers", interval=0.001)
