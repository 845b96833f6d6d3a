# The image layer: upstream 4.2 fixtures decode and re-encode byte for byte, what ImageDir writes is
# read by Debian's crit (an independent implementation), and every kind of damage is one ImageError
# naming the file.
import json
import os
import re
import stat
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import criu_py.images as img
from criu_py.errors import ImageError

from conftest import FIXTURES, REPO  # noqa: E402
CRIT = "/usr/bin/crit"


def fixture_files():
    out = []
    for d in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            out.append(f)
    return out


def image_fixtures():
    return [f for f in fixture_files() if img.kind_of(f.name) != img.RAW]


def frames(data: bytes, off: int):
    """The raw protobuf bytes of each frame (payload kinds excluded)."""
    out = []
    while off < len(data):
        size, = struct.unpack_from("<I", data, off)
        out.append(data[off + 4:off + 4 + size])
        off += 4 + size
    return out


def test_fixtures_present():
    names = {f.name for f in fixture_files()}
    for n in ("inventory.img", "pstree.img", "files.img", "seccomp.img", "stats-dump", "timens-0.img"):
        assert n in names
    assert len(image_fixtures()) >= 45


@pytest.mark.parametrize("path", image_fixtures(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_decodes_and_reencodes_exactly(path):
    data = path.read_bytes()
    kind, entries = img.decode_bytes(path.name, data)
    assert kind == img.kind_of(path.name)
    assert entries, "no entries"
    # The whole file.
    assert img.encode_file(kind, entries) == data
    # Each entry on its own (kinds without payload: frames are back to back).
    if kind not in img.PAYLOAD_SIZE:
        off = 4 if kind == "inventory" else 8
        raw = frames(data, off)
        assert len(raw) == len(entries)
        for i, (msg, want) in enumerate(zip(entries, raw)):
            assert msg.SerializeToString() == want, f"entry {i}"


def test_fixture_contents_make_sense():
    d = img.ImageDir(FIXTURES / "tree")
    items = d.read_entries("pstree.img")
    assert len(items) == 3
    root = items[0]
    assert root.ppid == 0 and {i.ppid for i in items[1:]} == {root.pid}
    core = d.read_one(f"core-{root.pid}.img")
    assert core.mtype == core.X86_64
    assert core.thread_info.gpregs.ip != 0
    assert core.thread_info.fpregs.xsave.xstate_bv != 0
    assert core.thread_core.HasField("creds") and len(core.tc.sigactions) > 60
    pm = d.read_entries(f"pagemap-{root.pid}.img")
    assert pm[0].DESCRIPTOR.name == "pagemap_head" and pm[0].pages_id >= 1
    # 4.x writes the count in field 5 and 0 in the 3.x field 2.
    assert all(e.compat_nr_pages == 0 and img.pagemap_nr_pages(e) > 0 for e in pm[1:])
    present = sum(img.pagemap_nr_pages(e) for e in pm[1:] if e.flags & img.PE_PRESENT)
    assert present * 4096 == os.path.getsize(FIXTURES / "tree" / f"pages-{pm[0].pages_id}.img")
    pipes = d.read_entries_with_payload("pipes-data.img")
    # The ring has three pipes; at this dump none held unread bytes (the token was in flight).
    assert len(pipes) == 3 and all(len(p) == m.bytes and m.size == 65536 for m, p in pipes)
    stats = d.read_one("stats-dump")
    assert stats.dump.pages_written > 0
    inv = d.read_one("inventory.img")
    assert inv.img_version == 2 and inv.dump_criu_run_id
    files = img.ImageDir(FIXTURES / "watcher").read_entries("files.img")
    ify = [f for f in files if f.HasField("ify")]
    assert ify and sorted(w.wd for w in ify[0].ify.wd) == [1, 2]


@pytest.mark.parametrize("name,kind", [
    ("core-123.img", "core"), ("pagemap-shmem-5.img", "pagemap"), ("pagemap-7.img", "pagemap"),
    ("pages-1.img", img.RAW), ("stats-dump", "stats"), ("stats-restore", "stats"),
    ("inventory.img", "inventory"), ("irmap-cache.img", "irmap_cache"), ("fdinfo-2.img", "fdinfo"),
    ("pipes-data.img", "pipes_data"), ("memfd.img", "memfd_inode"), ("ids-9.img", "ids"),
    ("ghost-file-1a.img", "ghost_file"), ("tmpfs-dev-5.tar.gz.img", img.RAW), ("nonsense.txt", None),
])
def test_kind_of(name, kind):
    assert img.kind_of(name) == kind


# --- samples of every kind, written by ImageDir and read back by Debian's crit ---

def _fill(msg, depth=0):
    """Set every required field (recursively) to a plain value, so the message encodes."""
    for fd in msg.DESCRIPTOR.fields:
        if fd.message_type is not None and fd.is_repeated:
            for sub in getattr(msg, fd.name):
                _fill(sub, depth + 1)
            continue
        if fd.message_type is not None and msg.HasField(fd.name):
            _fill(getattr(msg, fd.name), depth + 1)
            continue
        if not fd.is_required or msg.HasField(fd.name):
            continue
        if fd.message_type is not None:
            _fill(getattr(msg, fd.name), depth + 1)
            getattr(msg, fd.name).SetInParent()
        elif fd.enum_type is not None:
            setattr(msg, fd.name, fd.enum_type.values[0].number)
        elif fd.type == fd.TYPE_STRING:
            setattr(msg, fd.name, "x")
        elif fd.type == fd.TYPE_BYTES:
            setattr(msg, fd.name, b"\x01")
        elif fd.type == fd.TYPE_BOOL:
            setattr(msg, fd.name, True)
        elif fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
            setattr(msg, fd.name, 1.5)
        else:
            setattr(msg, fd.name, 7)
    return msg


def realistic_samples():
    """Entries as a one-process dump writes them: name -> entries (or (msg, payload) pairs)."""
    pb = img.pb_module
    core_pb2, pagemap_pb2 = pb("core_pb2"), pb("pagemap_pb2")
    inv = img.message_class("inventory")(img_version=2, fdinfo_per_id=True, ns_per_id=True,
                                         dump_criu_run_id="criu-py-test")
    inv.root_ids.CopyFrom(core_pb2.task_kobj_ids_entry(vm_id=1, files_id=2, fs_id=3, sighand_id=4))
    pst = img.message_class("pstree")(pid=42, ppid=0, pgid=42, sid=42, threads=[42])
    core = _fill(core_pb2.core_entry())
    core.mtype = core.X86_64
    core.tc.comm = "sample"
    core.tc.task_state = 1
    core.tc.blk_sigset = 0x10000
    core.thread_info.gpregs.ip = 0x401000
    core.thread_info.fpregs.xsave.xstate_bv = 7
    core.thread_info.fpregs.xsave.ymmh_space.extend([0] * 64)
    core.thread_core.creds.cap_amb.extend([0, 0])
    core.thread_core.rseq_entry.SetInParent()
    _fill(core.thread_core.rseq_entry)
    for sig in range(1, 65):
        core.tc.sigactions.add(sigaction=0, flags=0x4000000, restorer=0, mask=0)
    _fill(core)  # the rest of the required register and creds fields
    mm = img.message_class("mm")(**{f.name: 0x1000 * (i + 1) for i, f in enumerate(
        img.message_class("mm").DESCRIPTOR.fields) if f.is_required})
    mm.vmas.add(start=0x400000, end=0x401000, pgoff=0, shmid=0, prot=5, flags=2, status=0x201, fd=-1)
    mm.vmas.add(start=0x7f0000000000, end=0x7f0000004000, pgoff=0, shmid=0, prot=3, flags=0x22,
                status=0x3, fd=-1)
    head = pagemap_pb2.pagemap_head(pages_id=1)
    pe = pagemap_pb2.pagemap_entry(vaddr=0x7f0000000000, flags=img.PE_PRESENT)
    img.set_pagemap_nr_pages(pe, 4)
    fdinfo = img.message_class("fdinfo")
    fds = [fdinfo(id=1, flags=0, type=1, fd=0), fdinfo(id=2, flags=0, type=2, fd=1)]
    files = img.message_class("files")
    f1 = files(type=1, id=1)
    _fill(f1.reg)
    f1.reg.name = "/dev/null"
    f2 = files(type=2, id=2)
    _fill(f2.pipe)
    pdata = img.message_class("pipes_data")(pipe_id=9, bytes=5)
    stats = img.message_class("stats")()
    _fill(stats.dump)
    return {
        "inventory.img": [inv], "pstree.img": [pst], "core-42.img": [core],
        "ids-42.img": [inv.root_ids], "mm-42.img": [mm], "pagemap-42.img": [head, pe],
        "fdinfo-2.img": fds, "files.img": [f1, f2], "pipes-data.img": [(pdata, b"hello")],
        "stats-dump": [stats], "fs-42.img": [_fill(img.message_class("fs")())],
        "seccomp.img": [img.message_class("seccomp")()], "timens-0.img": [_fill(img.message_class("timens")())],
        "memfd.img": [_fill(img.message_class("memfd_inode")())],
    }


def generic_samples():
    """One file of every other kind, each entry with its required fields filled."""
    names = {}
    for kind in img.MAGICS:
        name = f"kind-{kind}"
        entries = [_fill(img.message_class(kind, head=True)())]
        if kind in img.HEADS:
            entries.append(_fill(img.message_class(kind)()))
        if kind in img.PAYLOAD_SIZE:
            entries = [(m, b"\0" * img.PAYLOAD_SIZE[kind](m)) for m in entries]
        elif kind == "ipcns_msg":   # one queued message of 5 bytes, padded to 8
            entries[0].qnum = 1
            one = img.pb_module("ipc_msg_pb2").ipc_msg(mtype=1, msize=5).SerializeToString()
            entries = [(entries[0], struct.pack("<I", len(one)) + one + b"hello\0\0\0")]
        elif kind == "ghost_file":  # the file's contents follow to the end
            entries = [(entries[0], b"ghost contents")]
        names[name] = (kind, entries)
    return names


def write_all(tmp_path):
    d = img.ImageDir(tmp_path / "ckpt", create=True)
    written = {}
    for name, entries in realistic_samples().items():
        if entries and isinstance(entries[0], tuple):
            d.write_entries_with_payload(name, entries)
        else:
            d.write_entries(name, entries)
        written[name] = (img.kind_of(name), len(entries))
    for name, (kind, entries) in generic_samples().items():
        # Files of any name: encode_file by kind, stored as bytes.
        d.write_bytes(name, img.encode_file(kind, entries))
        written[name] = (kind, len(entries))
    return d, written


def test_written_images_read_back(tmp_path):
    d, written = write_all(tmp_path)
    samples = realistic_samples()
    for name, entries in samples.items():
        if isinstance(entries[0], tuple):
            got = d.read_entries_with_payload(name)
            assert [(m.SerializeToString(), p) for m, p in got] == \
                   [(m.SerializeToString(), p) for m, p in entries]
        else:
            got = d.read_entries(name)
            assert [m.SerializeToString() for m in got] == [m.SerializeToString() for m in entries]
    pe = d.read_entries("pagemap-42.img")[1]
    assert pe.compat_nr_pages == pe.nr_pages == 4
    for name, (kind, n) in written.items():
        k2, entries = img.decode_bytes(kind, d.read_bytes(name))
        assert k2 == kind and len(entries) == n


def test_permissions(tmp_path):
    d, written = write_all(tmp_path)
    assert stat.S_IMODE(os.stat(d.dirpath).st_mode) == 0o700
    for name in written:
        assert stat.S_IMODE(os.stat(d.path(name)).st_mode) == 0o600, name
    fd = d.open_raw("pages-1.img", write=True)
    os.write(fd, b"\0" * 4096)
    os.close(fd)
    assert stat.S_IMODE(os.stat(d.path("pages-1.img")).st_mode) == 0o600
    # An existing directory keeps its mode, whatever it is.
    for mode in (0o755, 0o1777, 0o750):
        loose = tmp_path / f"loose-{mode:o}"
        loose.mkdir()
        os.chmod(loose, mode)
        img.ImageDir(loose, create=True).close()
        assert stat.S_IMODE(os.stat(loose).st_mode) == mode
    # A missing one is made 0700 whatever the umask.
    old = os.umask(0)
    try:
        img.ImageDir(tmp_path / "fresh-umask0", create=True).close()
        os.umask(0o077)
        img.ImageDir(tmp_path / "fresh-umask77", create=True).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh-umask0").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "fresh-umask77").st_mode) == 0o700
    assert sorted(img.ImageDir(d.dirpath).list()) == sorted(list(written) + ["pages-1.img"])


needs_crit = pytest.mark.skipif(not os.access(CRIT, os.X_OK), reason="Debian's crit is not installed")


def crit_decode(path, pretty=False):
    cmd = [CRIT, "decode", "-i", str(path)] + (["--pretty"] if pretty else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return r


# Kinds Debian's crit 3.17 has no handler for (checksums, file_ids: criu-py's own images).
CRIT_317_UNKNOWN = {"signal", "binfmt_misc", "checksums", "file_ids"}


@needs_crit
def test_debian_crit_reads_what_imagedir_writes(tmp_path):
    d, written = write_all(tmp_path)
    todo = {n: v for n, v in written.items() if v[0] not in CRIT_317_UNKNOWN}
    with ThreadPoolExecutor(4) as ex:
        results = dict(zip(todo, ex.map(lambda n: crit_decode(d.path(n)), todo)))
    for name, r in results.items():
        kind, n = todo[name]
        assert r.returncode == 0, f"{name}: {r.stderr[-500:]}"
        doc = json.loads(r.stdout)
        assert doc["magic"] == kind.upper(), name
        assert len(doc["entries"]) == n, name
    doc = json.loads(results["core-42.img"].stdout)
    assert doc["entries"][0]["tc"]["comm"] == "sample"
    assert doc["entries"][0]["thread_info"]["gpregs"]["ip"] == 0x401000
    doc = json.loads(results["pagemap-42.img"].stdout)
    assert doc["entries"][1]["nr_pages"] == 4  # 3.17 reads field 2, which we also set
    doc = json.loads(results["pipes-data.img"].stdout)
    assert doc["entries"][0]["bytes"] == 5 and doc["entries"][0]["extra"] == "aGVsbG8=\n"


# --- damage: every kind is one ImageError naming the file ---

@pytest.fixture
def damaged(tmp_path):
    src = FIXTURES / "counter"
    d = img.ImageDir(tmp_path / "bad", create=True)
    core = (src / "core-14977.img").read_bytes()
    d.write_bytes("core-1.img", core[:-1])                                # truncated entry
    d.write_bytes("core-2.img", core[:4] + b"\x78\x56\x34\x12" + core[8:])  # flipped magic
    d.write_bytes("core-3.img", core[:8] + struct.pack("<I", 0xFFFFFF) + core[12:])  # garbage length
    d.write_bytes("core-4.img", b"")                                      # empty
    d.write_bytes("core-5.img", core[:6])                                 # short header
    d.write_bytes("core-6.img", core[:8] + struct.pack("<I", 3) + b"\xff\xff\xff")  # bad protobuf
    d.write_bytes("core-7.img", core + core[8:])                          # two entries
    d.write_bytes("mm-8.img", core)                                       # wrong kind
    d.write_bytes("stats-dump", struct.pack("<II", img.COMMON_MAGIC, img.MAGICS["stats"][0]))
    pipe = img.message_class("pipes_data")(pipe_id=1, bytes=8)
    d.write_bytes("pipes-data.img", img.encode_file("pipes_data", [(pipe, b"12345678")])[:-2])
    return d


@pytest.mark.parametrize("name,words", [
    ("core-1.img", ["truncated entry 0"]),
    ("core-2.img", ["bad magic 0x12345678", "expected core 0x55053847"]),
    ("core-3.img", ["truncated entry 0", "size 16777215"]),
    ("core-4.img", ["empty file"]),
    ("core-5.img", ["short read"]),
    ("core-6.img", ["does not decode as core_entry"]),
    ("core-7.img", ["expected exactly one entry, found 2"]),
    ("mm-8.img", ["bad magic 0x55053847", "expected mm 0x57492820"]),
    ("stats-dump", ["bad first magic"]),
    ("pipes-data.img", ["truncated payload of entry 0", "8 bytes, only 6 left"]),
    ("core-999.img", ["missing"]),
])
def test_damage_is_one_line_naming_the_file(damaged, name, words):
    with pytest.raises(ImageError) as ei:
        damaged.read_one(name) if name.startswith("core") or name.startswith("mm") \
            else damaged.read_entries(name)
    text = str(ei.value)
    assert text.startswith(name + ": ") and "\n" not in text
    for w in words:
        assert w in text, text


def test_decode_bytes_errors_name_the_file():
    with pytest.raises(ImageError, match=r"^x/core-1\.img|^core-1\.img: bad magic"):
        img.decode_bytes("core-1.img", struct.pack("<II", img.COMMON_MAGIC, 1))
    with pytest.raises(ImageError, match=r"^weird\.bin: unknown magic 0x00000001"):
        img.decode_bytes("weird.bin", struct.pack("<II", img.COMMON_MAGIC, 1))
    with pytest.raises(ImageError, match="raw image"):
        img.decode_bytes("pages-1.img", b"\0" * 4096)
    with pytest.raises(ImageError, match="cannot be encoded"):
        img.encode_file("core", [img.message_class("core")()])
    with pytest.raises(ImageError, match=r"^/nonexistent/dir: cannot open the images dir"):
        img.ImageDir("/nonexistent/dir")


def test_import_is_light():
    code = ("import sys, criu_py.images as i; "
            "assert not any(m.startswith('google.protobuf') for m in sys.modules), 'protobuf loaded'; "
            "i.message_class('core'); assert 'criu_py.images.pb.core_pb2' in sys.modules; "
            "assert 'criu_py.images.pb.sk_inet_pb2' not in sys.modules")
    subprocess.run([os.sys.executable, "-c", code], check=True)


def test_protobuf_python_message_loaded_on_use():
    """With upb, protobuf's pure-Python message implementation (and text_format) is not
    loaded by the image modules, and still works when used (crit's text output)."""
    code = ("import sys; from google.protobuf.internal import api_implementation as a; "
            "upb = a.Type() == 'upb'; "
            "from criu_py.images.pb import core_pb2, pagemap_pb2; "
            "assert not upb or 'google.protobuf.text_format' not in sys.modules, 'loaded'; "
            "e = core_pb2.core_entry(mtype=1); "
            "assert core_pb2.core_entry.FromString(e.SerializeToString()).mtype == 1; "
            "from google.protobuf import text_format; "
            "assert text_format.MessageToString(e).strip() == 'mtype: X86_64'; "
            "from google.protobuf.internal import python_message; "
            "assert callable(python_message._AttachFieldHelpers)")
    subprocess.run([os.sys.executable, "-c", code], check=True)


def test_protobuf_descriptor_pb2_and_well_known_types_not_loaded():
    """With upb, loading the image modules builds none of descriptor_pb2's classes and
    imports no well_known_types (nor its datetime and calendar); the (criu) field
    options crit reads still work, and so does descriptor_pb2 once imported."""
    code = ("import sys; from google.protobuf.internal import api_implementation as a; "
            "upb = a.Type() == 'upb'; "
            "from criu_py.images.pb import mm_pb2, opts_pb2, core_pb2; "
            "e = mm_pb2.mm_entry(mm_brk=0x1000); "
            "assert mm_pb2.mm_entry.FromString(e.SerializePartialToString()).mm_brk == 0x1000; "
            "assert not upb or not any(m in sys.modules for m in ('calendar', 'datetime')); "
            "d = sys.modules.get('google.protobuf.descriptor_pb2'); "
            "assert not upb or type(d).__name__ == '_LoadedOnUse', type(d); "
            "f = mm_pb2.mm_entry.DESCRIPTOR.fields_by_name['mm_brk']; "
            "assert f.GetOptions().Extensions[opts_pb2.criu].hex; "
            "f = core_pb2.task_core_entry.DESCRIPTOR.fields_by_name['comm']; "
            "assert not f.GetOptions().Extensions[opts_pb2.criu].hex; "
            "from google.protobuf import descriptor_pb2; "
            "o = descriptor_pb2.FieldOptions(deprecated=True); "
            "assert descriptor_pb2.FieldOptions.FromString(o.SerializeToString()).deprecated; "
            "assert type(sys.modules['google.protobuf.descriptor_pb2']).__name__ == 'module'")
    subprocess.run([os.sys.executable, "-c", code], check=True)


def test_image_protos_use_no_well_known_type():
    """criu_py/images/pb gives upb no well-known-type mixins: that holds while no image
    proto imports a google/protobuf file but descriptor.proto (for opts.proto)."""
    imports = {m for path in (REPO / "proto").glob("*.proto")
               for m in re.findall(r'^import\s+"(google/protobuf/[^"]+)"', path.read_text(), re.M)}
    assert imports <= {"google/protobuf/descriptor.proto"}, imports


@pytest.mark.parametrize("name, kind", [
    ("core-123.img", "core"), ("pagemap-7.img", "pagemap"), ("pagemap-shmem-9.img", "pagemap"),
    ("pages-1.img", img.RAW), ("pages-shmem-2.img", img.RAW), ("route6-1.img", img.RAW),
    ("ip6tables-3.img", img.RAW), ("tmpfs-dev-4.tar.gz.img", img.RAW),
    ("signal-p-5.img", "signal"), ("binfmt-misc.img", "binfmt_misc"),
    ("binfmt-misc-2.img", "binfmt_misc"), ("ghost-file-1a2b.img", "ghost_file"),
    ("tcp-stream-ff.img", "tcp_stream"), ("stats-dump", "stats"), ("/x/y/inventory.img", "inventory"),
    ("route7-1.img", None), ("core-12a.img", None), ("ghost-file-xyz.img", None),
    ("ghost-file-.img", None), ("core-1.img.bak", None), ("dump.log", None),
])
def test_kind_of_names(name, kind):
    assert img.kind_of(name) == kind


def test_background_writes_and_the_seal_from_their_crcs(tmp_path):
    """A dump's ImageDir (background writer, CRCs noted while writing): the files are as
    written (0600, a later write of the same name wins), reads wait for the writer, and
    the seal it makes from the noted CRCs equals one made by reading every file back."""
    from criu_py.images import integrity
    from criu_py.images.pb import pstree_pb2
    d = img.ImageDir(tmp_path / "imgs", create=True, crc_on_write=True, background=True)
    for pid in range(1, 120):
        e = pstree_pb2.pstree_entry(pid=pid, ppid=0, pgid=pid, sid=pid, threads=[pid] * pid)
        d.write_entries("pstree.img", [e])
        d.write_bytes(f"pages-{pid}.img", bytes([pid]) * (pid * 999))
    d.write_bytes("pages-7.img", b"again")
    assert d.read_bytes("pages-7.img") == b"again"          # waits for the writer
    assert d.read_bytes("pages-8.img") == bytes([8]) * 7992
    assert stat.S_IMODE(os.stat(tmp_path / "imgs" / "pages-9.img").st_mode) == 0o600
    assert d.read_one("pstree.img").pid == 119
    d.finish_writes()
    integrity.seal(d)
    sealed = d.read_entries(integrity.CHECKSUM_IMAGE)
    assert len(d.block_crcs) >= 120
    d.close()
    with img.ImageDir(tmp_path / "imgs") as again:          # no CRCs known: files read
        integrity.seal(again)
        assert again.read_entries(integrity.CHECKSUM_IMAGE) == sealed


def test_background_write_failure_is_raised_before_the_next_read(tmp_path):
    d = img.ImageDir(tmp_path / "imgs", create=True, background=True)
    d.write_bytes("no-such-dir/pages-1.img", b"x")
    with pytest.raises(ImageError, match="no-such-dir/pages-1.img: write failed"):
        d.list()
    with pytest.raises(ImageError):
        d.write_bytes("pages-2.img", b"y")                   # nothing more is written
    d.close()


def _pages_with_damaged_piece(tmp_path, pieces: int, damaged: int):
    """An images dir with one pagemap over `pieces` MiB of pages (PIECE-sized pieces of
    its seal), piece `damaged` damaged after the seal: (ImageDir, its pages entry)."""
    from criu_py.images import PE_PRESENT, integrity, set_pagemap_nr_pages
    from criu_py.images.pb import pagemap_pb2
    mib = 1 << 20
    d = img.ImageDir(tmp_path / "imgs", create=True)
    d.write_bytes("pages-1.img", b"".join(bytes([i]) * mib for i in range(pieces)))
    pe = pagemap_pb2.pagemap_entry(vaddr=0x10000000, flags=PE_PRESENT)
    set_pagemap_nr_pages(pe, pieces * mib // 4096)
    d.write_entries("pagemap-7.img", [pagemap_pb2.pagemap_head(pages_id=1), pe])
    integrity.seal(d)
    entry = integrity.listed_files(d)["pages-1.img"]
    assert len(entry.runs) == pieces
    with open(tmp_path / "imgs" / "pages-1.img", "r+b") as f:
        f.seek(damaged * mib + 12345)
        f.write(b"\xff")
    return d, entry


def test_page_digests_piece_by_piece(tmp_path):
    """PageDigests (what the lazy-pages daemon serves from): every piece is checked before
    a byte of it is handed out, a damaged one is an ImageError naming it each time it is
    asked for, the others pass."""
    from criu_py.images import integrity
    mib = 1 << 20
    d, entry = _pages_with_damaged_piece(tmp_path, 6, 4)
    pages = integrity.PageDigests(d, "pages-1.img", entry)
    try:
        pages.check(0, 4096)
        pages.check(mib, 3 * mib)
        pages.check(5 * mib, mib)
        for _ in range(2):
            with pytest.raises(ImageError, match=r"pages-1.img: damaged page run at offset "
                                                 r"0x400000, 256 pages \(pagemap-7.img"):
                pages.check(3 * mib, 2 * mib)
        assert pages.ok == {0, 1, 2, 3, 5}
    finally:
        pages.close()
    assert pages.map is None
    d.close()
