# Seize/interrupt/detach and syscall injection on a real child: the child is left
# exactly as it was (code bytes, registers, signal mask), running and untraced.
import os
import subprocess

import pytest

from criu_py import arch_x86, proc
from criu_py.errors import NoSuchProcess
from criu_py.ptrace import Injection, seized
from criu_py.dump import parasite


@pytest.fixture
def child(sleeping_child):
    return sleeping_child


def untraced_running(pid):
    st = proc.read_status(pid)
    return st.tracer_pid == 0 and st.state in "SR"


def test_seize_stops_without_signals_and_detach_resumes(child):
    with seized(child.pid) as t:
        st = proc.read_status(child.pid)
        assert st.tracer_pid == os.getpid() and st.state == "t"
        regs = arch_x86.gpregs_from_bytes(t.get_gpregs())
        assert regs["cs"] == 0x33
        # sleep is in clock_nanosleep: -ERESTART_RESTARTBLOCK or -ERESTARTNOHAND
        assert regs["orig_ax"] in (35, 230)
        assert t.get_rseq()["signature"] == 0x53053053
    assert untraced_running(child.pid)
    assert child.poll() is None


def code_bytes(pid):
    """Every executable mapping's bytes, read through /proc/PID/mem."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        out = {}
        for v in proc.read_maps(pid):
            if v.perms[2] == "x" and v.path != "[vsyscall]":
                mem.seek(v.start)
                out[v.start] = mem.read(v.end - v.start)
        return out


def test_injection_restores_everything(child):
    code = code_bytes(child.pid)
    maps = [(v.start, v.end, v.perms, v.path) for v in proc.read_maps(child.pid)]
    with seized(child.pid) as t:
        raw = t.get_gpregs()
        mask = t.get_sigmask()
        with Injection(t, raw) as inj:
            assert inj.site.safe
            assert inj.syscall(39) == child.pid            # getpid
            assert inj.syscall(110) == os.getpid()         # getppid
            # everything blocked but SIGKILL/SIGSTOP (never blockable)
            assert t.get_sigmask() == ((1 << 64) - 1) & ~(1 << 8 | 1 << 18)
            with inj.scratch_page() as page:
                assert any(v.start == page and v.perms == "rwxp" for v in proc.read_maps(child.pid))
        assert t.get_gpregs() == raw
        assert t.get_sigmask() == mask
    assert code_bytes(child.pid) == code                   # not one byte of code changed
    assert [(v.start, v.end, v.perms, v.path) for v in proc.read_maps(child.pid)] == maps
    assert untraced_running(child.pid)


def test_parasite_reads_sigactions(child):
    with seized(child.pid) as t:
        raw = t.get_gpregs()
        info = parasite.collect(t, raw)
        assert t.get_gpregs() == raw
    assert len(info.sigactions) == 64
    assert info.clear_tid_addr != 0 and info.brk > 0
    assert info.injected_calls == 3               # mmap, the blob, munmap
    assert (info.dumpable, info.secbits, info.pdeath_sig) == (1, 0, 0)
    assert info.child_subreaper is False and info.thp_disabled is False
    st = proc.read_status(child.pid)
    for sig in range(1, 65):
        handler = info.sigactions[sig - 1].handler
        assert (handler == 1) == bool(st.sig_ign >> (sig - 1) & 1), sig
    assert untraced_running(child.pid)


def test_seize_of_a_dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(NoSuchProcess):
        with seized(p.pid):
            pass


def test_kill_ends_the_task(child):
    with seized(child.pid) as t:
        t.kill()
        assert t.dead and not t.attached
    # we are also the parent here, so kill() has reaped it: the pid is gone
    assert not os.path.exists(f"/proc/{child.pid}")
