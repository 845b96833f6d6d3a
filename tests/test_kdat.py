# The kdat cache and the kernel probes, in-process: staleness by every part of the key,
# damaged files, symlinks, leftover temporaries, unsafe owners, concurrent savers, and the
# probed facts against what the machine shows when asked another way.
import ctypes
import errno
import mmap
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from criu_py import kerndat
from criu_py.kerndat import cache
from criu_py.log import log

REPO = Path(__file__).resolve().parent.parent
PAGE = mmap.PAGESIZE


@pytest.fixture(scope="module")
def probed():
    """One probe for the whole module (a probe is ~10 ms, and the facts do not change)."""
    return kerndat.probe()


@pytest.fixture
def messages():
    """Everything criu-py logs during the test, as text lines."""
    lines = []

    def collect(level, text):
        lines.append(text)

    log.sinks.append(collect)
    yield lines
    log.sinks.remove(collect)


@pytest.fixture
def kdat_path(tmp_path):
    return str(tmp_path / "criu.kdat")


def key(**changes):
    return cache.current_key()._replace(**changes)


def write(path, data: bytes, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.write(fd, data)
    os.close(fd)
    os.chmod(path, mode)


def assert_valid(path, k=None):
    with open(path, "rb") as f:
        facts = cache.from_bytes(f.read(), k or cache.current_key())
    assert facts.page_size == PAGE
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    return facts


def tmp_leftovers(path):
    directory, base = os.path.split(path)
    return [n for n in os.listdir(directory) if n.startswith(base + ".")]


# ------------------------------------------------------------------ round trip

def test_probe_then_cache_round_trip(kdat_path, messages):
    first = kerndat.load(kdat_path)
    assert first.source == "probe" and first.cache_path == kdat_path
    assert_valid(kdat_path)
    second = kerndat.load(kdat_path)
    assert second.source == "cache"
    assert second.as_dict() == first.as_dict()
    assert not any("Stale" in m for m in messages)
    # the caller facts are read afresh, not cached
    assert second.caller is not first.caller and second.caller.euid == os.geteuid()


def test_every_fact_survives_the_file(probed):
    data = cache.to_bytes(probed, cache.current_key())
    back = cache.from_bytes(data, cache.current_key())
    assert back.as_dict() == probed.as_dict()


def test_reader_schema_matches_the_proto():
    """The cache reader decodes the wire format itself; its table must be kdat.proto's."""
    from google.protobuf.descriptor import FieldDescriptor as FD
    from criu_py.images.pb import kdat_pb2
    from criu_py.kerndat.facts import FACT_NAMES
    kinds = {FD.TYPE_UINT32: "uint", FD.TYPE_UINT64: "uint", FD.TYPE_SINT64: "sint",
             FD.TYPE_BOOL: "bool", FD.TYPE_DOUBLE: "double", FD.TYPE_STRING: "string"}

    def compare(schema, descriptor):
        assert set(schema) == {f.number for f in descriptor.fields}, descriptor.name
        for f in descriptor.fields:
            name, kind = schema[f.number]
            assert name == f.name
            if f.type == FD.TYPE_MESSAGE:
                assert isinstance(kind, dict)
                compare(kind, f.message_type)
            else:
                assert kind == kinds[f.type], f.name

    compare(cache.ENTRY_SCHEMA, kdat_pb2.kdat_entry.DESCRIPTOR)
    names = {name for name, _ in cache.ENTRY_SCHEMA.values()}
    assert set(FACT_NAMES) <= names


def test_file_is_a_kdat_entry_for_protobuf_too(probed):
    """What the reader accepts is what protobuf itself decodes, field by field."""
    from criu_py.images.pb import kdat_pb2
    data = cache.to_bytes(probed, cache.current_key())
    entry = kdat_pb2.kdat_entry.FromString(data[cache.HEADER.size:])
    mine = cache.decode_message(data[cache.HEADER.size:], cache.ENTRY_SCHEMA)
    assert entry.boot_id == mine["boot_id"] == cache.current_key().boot_id
    assert [(a.name, a.size, a.offset) for a in entry.vdso_areas] == \
        [(a["name"], a["size"], a["offset"]) for a in mine["vdso_areas"]]
    assert entry.uffd_features == mine["uffd_features"] == probed.uffd_features
    # a field a newer writer adds is skipped, not fatal
    extra = data[cache.HEADER.size:] + bytes([0xF8, 0x3E, 0x07])      # field 1007, varint 7
    assert cache.decode_message(extra, cache.ENTRY_SCHEMA)["page_size"] == probed.page_size


# ------------------------------------------------------------------ staleness

def _header_patch(data: bytes, word: int, value: int) -> bytes:
    return data[:4 * word] + struct.pack("<I", value) + data[4 * word + 4:]


STALE_FILES = {
    "format": lambda d: _header_patch(d, 1, cache.FORMAT + 1),
    "short_header": lambda d: d[:10],
    "header_only": lambda d: d[:cache.HEADER.size],
    "truncated": lambda d: d[:len(d) // 2],
    "one_byte_short": lambda d: d[:-1],
    "longer": lambda d: d + b"\0",
    "flipped_byte": lambda d: d[:40] + bytes([d[40] ^ 0xFF]) + d[41:],
    "garbage_with_good_header": lambda d: (lambda p: cache.HEADER.pack(
        cache.MAGIC, cache.FORMAT, len(p), __import__("zlib").crc32(p)) + p)(os.urandom(200)),
}


@pytest.mark.parametrize("damage", sorted(STALE_FILES))
def test_damaged_file_is_stale_and_replaced(probed, kdat_path, messages, damage):
    write(kdat_path, STALE_FILES[damage](cache.to_bytes(probed, cache.current_key())))
    facts = kerndat.load(kdat_path)
    assert facts.source == "probe"
    assert f"Stale {kdat_path} file" in messages
    assert_valid(kdat_path)
    assert kerndat.load(kdat_path).source == "cache"


# Files criu-py did not write: never removed, never replaced, the run goes on uncached.
UPSTREAM_KDAT = struct.pack("<II", cache.UPSTREAM_MAGIC, 0x6554A1B2) + bytes(904)   # 912 bytes
FOREIGN_FILES = {
    "upstream_criu": UPSTREAM_KDAT,
    "empty": b"",
    "text": b"# notes an admin keeps here\n",
    "garbage": b"\x01\x02\x03\x04" + os.urandom(300),
}


@pytest.mark.parametrize("what", sorted(FOREIGN_FILES))
def test_foreign_file_is_never_removed_or_replaced(kdat_path, messages, what):
    write(kdat_path, FOREIGN_FILES[what], mode=0o644)
    before = os.stat(kdat_path)
    for _ in range(2):
        assert kerndat.load(kdat_path).source == "probe"
    after = os.stat(kdat_path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == \
        (before.st_ino, before.st_mtime_ns, before.st_size)
    assert open(kdat_path, "rb").read() == FOREIGN_FILES[what]
    assert not any(m.startswith("Stale") for m in messages), messages
    said = [m for m in messages if "left as it is" in m]
    assert len(said) == 1, messages                  # one warning per path, not per load
    if what == "upstream_criu":
        assert "upstream CRIU" in said[0]
    assert not tmp_leftovers(kdat_path)
    with pytest.raises(Exception, match="removes only its own"):
        kerndat.drop(kdat_path)
    with pytest.raises(Exception, match="replaces only its own"):
        kerndat.save(kerndat.probe(), kdat_path)
    assert open(kdat_path, "rb").read() == FOREIGN_FILES[what]


def test_non_regular_file_is_left_alone(tmp_path, messages):
    fifo = str(tmp_path / "kdat-fifo")
    os.mkfifo(fifo)
    assert kerndat.load(fifo).source == "probe"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("part", ["boot_id", "kernel_release", "criu_py_version", "euid"])
def test_other_system_is_stale(probed, kdat_path, messages, part, tmp_path):
    other = {"boot_id": "00000000-1111-2222-3333-444444444444", "kernel_release": "5.10.0-old",
             "criu_py_version": "0.0.1", "euid": 4242}[part]
    write(kdat_path, cache.to_bytes(probed, key(**{part: other})))
    facts = kerndat.load(kdat_path)
    assert facts.source == "probe"
    assert f"Stale {kdat_path} file" in messages
    assert any(part in m for m in messages)       # the -v3 line says which part differs
    assert_valid(kdat_path)


def test_boot_id_path_is_injectable(probed, kdat_path, tmp_path, messages):
    fake = tmp_path / "boot_id"
    fake.write_text("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee\n")
    other_boot = cache.current_key(boot_id_path=str(fake))
    assert other_boot.boot_id == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    write(kdat_path, cache.to_bytes(probed, other_boot))
    assert kerndat.load(kdat_path, key=other_boot).source == "cache"
    # after a "reboot" (the real boot id) the same file is stale
    assert kerndat.load(kdat_path).source == "probe"
    assert f"Stale {kdat_path} file" in messages


@pytest.mark.parametrize("unsafe", ["other_owner", "group_writable", "world_writable"])
def test_unsafe_file_is_ignored_and_replaced(probed, kdat_path, messages, unsafe):
    write(kdat_path, cache.to_bytes(probed, cache.current_key()))
    if unsafe == "other_owner":
        os.chown(kdat_path, 65534, 65534)
    else:
        os.chmod(kdat_path, 0o620 if unsafe == "group_writable" else 0o602)
    assert kerndat.load(kdat_path).source == "probe"
    assert f"Stale {kdat_path} file" in messages
    assert os.stat(kdat_path).st_uid == os.geteuid()
    assert_valid(kdat_path)


def test_oversized_file_is_stale(probed, kdat_path, messages):
    write(kdat_path, cache.to_bytes(probed, cache.current_key()) + b"\0" * (cache.MAX_SIZE + 1))
    assert kerndat.load(kdat_path).source == "probe"
    assert f"Stale {kdat_path} file" in messages


def test_cgroup_layout_is_reread_in_another_mount_namespace(probed, kdat_path):
    from criu_py.kerndat.facts import CgroupMount, KerndatFacts
    values = {name: getattr(probed, name) for name in probed.as_dict() if name in KerndatFacts.__slots__}
    values.update(cgroup_v1=(CgroupMount("bogus", "/nowhere"),), cgroup2_mount="/nowhere",
                  cgroup_mnt_ns=1)
    elsewhere = KerndatFacts(**values)
    write(kdat_path, cache.to_bytes(elsewhere, cache.current_key()))
    facts = kerndat.load(kdat_path)
    assert facts.source == "cache"
    assert facts.cgroup2_mount == probed.cgroup2_mount
    assert facts.cgroup_v1 == probed.cgroup_v1


# ------------------------------------------------------------------ symlinks, temporaries

def test_symlink_at_cache_path_is_not_followed(tmp_path, kdat_path, messages):
    target = tmp_path / "precious"
    target.write_bytes(b"do not touch\n")
    before = os.stat(target)
    os.symlink(target, kdat_path)
    facts = kerndat.load(kdat_path)
    assert facts.source == "probe"
    assert f"Stale {kdat_path} file" in messages
    assert target.read_bytes() == b"do not touch\n"
    assert os.stat(target).st_mtime_ns == before.st_mtime_ns
    assert_valid(kdat_path)                      # a regular file replaced the link


def test_dangling_symlink_target_is_never_created(tmp_path, kdat_path):
    target = tmp_path / "elsewhere" / "made-by-attacker"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(target, kdat_path)
    kerndat.load(kdat_path)
    assert not target.exists()
    assert_valid(kdat_path)


def test_drop_removes_a_symlink_not_its_target(tmp_path, kdat_path):
    target = tmp_path / "precious"
    target.write_bytes(b"x")
    os.symlink(target, kdat_path)
    assert kerndat.drop(kdat_path) == (kdat_path, True)
    assert target.read_bytes() == b"x" and not os.path.lexists(kdat_path)
    assert kerndat.drop(kdat_path) == (kdat_path, False)


def test_leftover_temporary_files_do_not_block_saving(kdat_path):
    upstream_style = kdat_path + ".tmp"           # what upstream leaves behind, empty
    open(upstream_style, "w").close()
    dead_saver = f"{kdat_path}.99999999.0badc0de.tmp"   # pid above any pid_max: dead
    open(dead_saver, "w").close()
    facts = kerndat.load(kdat_path)
    assert facts.source == "probe"
    assert_valid(kdat_path)
    assert kerndat.load(kdat_path).source == "cache"
    assert not os.path.exists(dead_saver)         # orphans of dead savers are cleaned up
    assert os.path.exists(upstream_style)         # not ours: left alone


def test_failed_save_leaves_no_temporary(probed, tmp_path):
    path = tmp_path / "criu.kdat"
    path.mkdir()                                   # rename of a file over a dir fails
    assert not cache.save_cache(str(path), cache.to_bytes(probed, cache.current_key()))
    assert tmp_leftovers(str(path)) == []


def test_unwritable_explicit_location_runs_without_cache(tmp_path, messages):
    path = str(tmp_path / "missing-dir" / "criu.kdat")
    facts = kerndat.load(path)
    assert facts.source == "probe" and facts.cache_path is None
    assert not os.path.exists(path)


def test_none_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    facts = kerndat.load("none")
    assert facts.cache_path is None and os.listdir(tmp_path) == []


def test_environment_variable_names_the_path(tmp_path, monkeypatch):
    path = str(tmp_path / "from-env.kdat")
    monkeypatch.setenv(cache.ENV_PATH, path)
    assert kerndat.load().cache_path == path
    assert kerndat.load().source == "cache"
    explicit = str(tmp_path / "explicit.kdat")
    assert kerndat.load(explicit).cache_path == explicit    # the option wins over the env


def test_location_fallbacks(tmp_path):
    resolve = cache.resolve_location
    assert resolve(None, {}).path == cache.DEFAULT_PATH      # root: /run is writable
    # the fallback order itself, with /run made unwritable by pointing the default elsewhere
    saved = cache.DEFAULT_PATH
    try:
        cache.DEFAULT_PATH = str(tmp_path / "no-such-run" / "criu.kdat")
        assert resolve(None, {"XDG_RUNTIME_DIR": str(tmp_path)}).path == str(tmp_path / "criu-py.kdat")
        nowhere = resolve(None, {})
        assert nowhere.path is None and "XDG_RUNTIME_DIR is unset" in nowhere.reason
        nowhere = resolve(None, {"XDG_RUNTIME_DIR": str(tmp_path / "gone")})
        assert nowhere.path is None and "not writable" in nowhere.reason
    finally:
        cache.DEFAULT_PATH = saved


# ------------------------------------------------------------------ concurrency

SAVER = """
import sys, time
from criu_py import kerndat
start = float(sys.argv[2])
while time.time() < start:
    pass
facts = kerndat.probe()
kerndat.save(facts, sys.argv[1])
"""


def test_twenty_concurrent_savers(kdat_path):
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, kdat_path, str(start)], cwd=REPO)
             for _ in range(20)]
    seen = bad = 0
    try:
        while any(p.poll() is None for p in procs):
            try:
                with open(kdat_path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            seen += 1
            try:
                cache.from_bytes(data, cache.current_key())
            except cache.Stale:
                bad += 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0] * 20
    assert bad == 0, f"{bad} of {seen} reads saw a partial file"
    assert_valid(kdat_path)
    assert tmp_leftovers(kdat_path) == []


# ------------------------------------------------------------------ imports

def test_cached_load_imports_nothing_heavy(kdat_path):
    kerndat.load(kdat_path)
    code = ("import sys; from criu_py import kerndat; f = kerndat.load(sys.argv[1]); "
            "assert f.source == 'cache', f.source; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('cffi', '_cffi_backend', 'psutil', 'click', 'dataclasses', 'google') "
            "or m in ('criu_py._native', 'criu_py.kerndat.probes', 'criu_py.native'))))")
    out = subprocess.run([sys.executable, "-c", code, kdat_path], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == ""


# ------------------------------------------------------------------ facts vs the machine

def _maps_of(pid):
    out = {}
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if parts[-1].startswith("["):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out[parts[-1]] = (start, end)
    return out


def test_vdso_layout_matches_maps(probed):
    maps = _maps_of(os.getpid())
    vdso_start = maps["[vdso]"][0]
    for name in ("[vvar]", "[vvar_vclock]", "[vdso]"):
        if name in maps:
            area = probed.vdso_area(name)
            assert area is not None, name
            assert area.size == maps[name][1] - maps[name][0]
            assert area.offset == maps[name][0] - vdso_start
    # another process has the same layout (only the base is randomised)
    child = subprocess.Popen(["sleep", "30"])
    try:
        # comm changes early in exec, before the vdso is mapped: wait for the areas
        deadline = time.monotonic() + 10
        wanted = {area.name for area in probed.vdso_areas}
        while True:
            other = _maps_of(child.pid)
            if Path(f"/proc/{child.pid}/comm").read_text().strip() == "sleep" and wanted <= other.keys():
                break
            assert time.monotonic() < deadline, f"no {wanted} in the maps of sleep"
            time.sleep(0.005)
    finally:
        child.kill()
        child.wait()
    for area in probed.vdso_areas:
        start, end = other[area.name]
        assert (end - start, start - other["[vdso]"][0]) == (area.size, area.offset)


def test_vdso_symbol_offsets_are_callable(probed):
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    base = libc.getauxval(33)                      # AT_SYSINFO_EHDR
    assert base == _maps_of(os.getpid())["[vdso]"][0]

    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    offset = probed.vdso_symbol("__vdso_clock_gettime")
    assert offset is not None
    clock_gettime = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Timespec))(base + offset)
    ts = Timespec()
    before = time.clock_gettime(time.CLOCK_MONOTONIC)
    assert clock_gettime(time.CLOCK_MONOTONIC, ctypes.byref(ts)) == 0
    after = time.clock_gettime(time.CLOCK_MONOTONIC)
    assert before <= ts.sec + ts.nsec / 1e9 <= after


def _soft_dirty_of_another_process() -> bool:
    """Independent soft-dirty measurement on a child: clear its bits, let it write a
    page, read that page's bit 55 from outside."""
    code = ("import mmap, sys, ctypes\n"
            "m = mmap.mmap(-1, 4096); m[0] = 1\n"
            "addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
            "print(addr, flush=True); sys.stdin.readline(); m[0] = 2\n"
            "print('written', flush=True); sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        addr = int(child.stdout.readline())
        with open(f"/proc/{child.pid}/clear_refs", "w") as f:
            f.write("4")
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "written"
        with open(f"/proc/{child.pid}/pagemap", "rb") as f:
            f.seek(addr // PAGE * 8)
            entry = struct.unpack("<Q", f.read(8))[0]
        return bool(entry >> 55 & 1)
    finally:
        child.kill()
        child.wait()


def test_soft_dirty_agrees_with_an_outside_measurement(probed):
    assert probed.soft_dirty == _soft_dirty_of_another_process()


def _kernel_at_least(major, minor):
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    return release >= (major, minor)


def test_uffd_and_pagemap_scan(probed):
    if _kernel_at_least(6, 7):          # UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN are in 6.7
        assert probed.uffd_wp_async and probed.uffd_wp_unpopulated
        assert probed.pagemap_scan and probed.uffd_dirty_tracking
    assert probed.uffd_dirty_tracking <= (probed.pagemap_scan and probed.uffd_wp_async)
    assert probed.dev_userfaultfd == os.path.exists("/dev/userfaultfd")     # we are root
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        assert probed.unprivileged_uffd == (f.read().strip() == "1")
    assert probed.mem_tracking == ("soft-dirty" if probed.soft_dirty else
                                   "uffd-wp" if probed.uffd_dirty_tracking else "")


def test_zero_page_and_shmem_device(probed):
    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    _ = m[0]
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    assert entry >> 63 and probed.zero_pfn == entry & ((1 << 55) - 1) != 0
    shared = mmap.mmap(-1, PAGE, flags=mmap.MAP_SHARED)
    saddr = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    st = os.stat(f"/proc/self/map_files/{saddr:x}-{saddr + PAGE:x}")
    assert probed.shmem_dev == st.st_dev


def test_plain_numbers(probed):
    assert probed.page_size == PAGE
    with open("/proc/sys/kernel/pid_max") as f:
        assert probed.pid_max == int(f.read())
    with open("/proc/sys/vm/mmap_min_addr") as f:
        assert probed.mmap_min_addr == int(f.read())
    with open("/proc/sys/kernel/cap_last_cap") as f:
        assert probed.last_cap == int(f.read())
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    if "la57" not in flags:
        assert probed.task_size == (1 << 47) - PAGE
    # the stack lies below TASK_SIZE
    assert _maps_of(os.getpid())["[stack]"][1] <= probed.task_size
    assert probed.xfeatures_mask & 0b11 == 0b11                      # x87 + SSE
    assert bool(probed.xfeatures_mask & 4) == ("avx" in flags)
    assert bool(probed.xfeatures_mask & 0xE0) == ("avx512f" in flags)
    assert probed.xsave_size >= 576 and probed.ptrace_xstate_size >= 576
    assert sum(1 for x in probed.xfeatures) == bin(probed.xfeatures_mask >> 2).count("1")
    if _kernel_at_least(5, 5):
        assert probed.clone3_set_tid
    assert probed.pidfd_open and probed.pidfd_getfd and probed.prctl_mm_map
    assert probed.time_ns == os.path.exists("/proc/self/ns/time")
    assert probed.probe_errors == {}


def test_cgroup_layout_and_caller(probed):
    with open("/proc/self/mountinfo") as f:
        v2 = [line.split()[4] for line in f if " - cgroup2 " in line]
    assert probed.cgroup2_mount == (v2[0] if v2 else "")
    caller = kerndat.load("none").caller
    assert caller.euid == os.geteuid()
    for name, ino in caller.namespaces.items():
        assert os.readlink(f"/proc/self/ns/{name}") == f"{name.split('_for_')[0]}:[{ino}]"
    with open("/proc/self/cgroup") as f:
        assert len(caller.cgroups) == len(f.read().splitlines())
    with open("/proc/self/status") as f:
        capeff = next(line for line in f if line.startswith("CapEff")).split()[1]
    assert caller.cap_eff == int(capeff, 16)
