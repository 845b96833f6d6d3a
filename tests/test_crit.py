# The crit tool: JSON like Debian's crit field by field, byte-exact round trips, the explorers, and
# make-lazy checked page by page on the fixtures, on synthesized checkpoints and on a real dump.
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import criu_py.images as img
from criu_py.crit import lazy as lazymod
from criu_py.crit.cli import crit
from criu_py.crit.explore import (MAP_ANONYMOUS, MAP_GROWSDOWN, MAP_HUGETLB, MAP_LOCKED,
                                  MAP_PRIVATE, VMA_ANON_PRIVATE, VMA_AREA_HEAP, VMA_AREA_REGULAR,
                                  VMA_AREA_VDSO, VMA_AREA_VVAR, VMA_FILE_PRIVATE)
from criu_py.errors import ImageError

from test_images import CRIT, FIXTURES, image_fixtures, needs_crit, realistic_samples

PAGE = os.sysconf("SC_PAGE_SIZE")
CRIT_PY = str(Path(sys.executable).parent / "crit-py")


def run(*args, input=None):
    return CliRunner().invoke(crit, [str(a) for a in args], input=input, catch_exceptions=False)


def debian(*args):
    r = subprocess.run([CRIT, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-400:]
    return r.stdout


# --- JSON shape against Debian's crit ---

# Fields 4.2 images carry that crit 3.17's schema does not know (it drops them), by message path.
DRIFT = {("thread_core", "creds", "cap_amb"), ("thread_core", "cg_set"),
         ("plugins_entry",), ("dump_criu_run_id",)}


def strip_drift(doc):
    """Our JSON as crit 3.17 would print it: drop the 4.x-only fields; pagemap field 2 is 3.17's
    nr_pages, field 5 is unknown to it."""
    def walk(d, path):
        if isinstance(d, dict):
            out = {}
            for k, v in d.items():
                if path + (k,) in DRIFT:
                    continue
                out[k] = walk(v, path + (k,))
            return out
        if isinstance(d, list):
            return [walk(x, path) for x in d]
        return d
    entries = []
    for e in doc["entries"]:
        e = walk(e, ())
        if doc["magic"] == "PAGEMAP" and "compat_nr_pages" in e:
            e = {("nr_pages" if k == "compat_nr_pages" else k): v for k, v in e.items()
                 if k != "nr_pages"}
        entries.append(e)
    return {"magic": doc["magic"], "entries": entries}


@needs_crit
@pytest.mark.parametrize("pretty", [False, True], ids=["plain", "pretty"])
def test_json_matches_debian_crit_field_by_field(pretty):
    opt = ["--pretty"] if pretty else []
    identical = 0
    for path in image_fixtures():
        r = run("decode", "-i", path, *opt)
        assert r.exit_code == 0, r.output
        theirs_text = debian("decode", "-i", path, *opt)
        mine, theirs = json.loads(r.stdout), json.loads(theirs_text)
        assert strip_drift(mine) == theirs, path
        # Field order and formatting too: where no drift field occurs the text is the same.
        if mine == theirs:
            assert r.stdout == theirs_text, path
            identical += 1
    assert identical >= 25   # all but core, pagemap and inventory images


def test_pretty_renderings():
    core = json.loads(run("show", FIXTURES / "counter" / "core-14977.img").stdout)["entries"][0]
    assert core["tc"]["task_state"] == "Alive"                   # (criu).dict
    assert core["tc"]["blk_sigset"].startswith("0x")             # (criu).hex
    assert all(v.startswith("0x") for v in core["thread_info"]["gpregs"].values()
               if isinstance(v, str) and v != "NATIVE")          # hex inherited by gpregs fields
    assert core["mtype"] == "X86_64"                             # enums by name
    pm = json.loads(run("show", FIXTURES / "counter" / "pagemap-14977.img").stdout)["entries"]
    assert pm[1]["vaddr"].startswith("0x") and pm[1]["flags"] in ("PE_PRESENT", "PE_LAZY | PE_PRESENT")
    mm = json.loads(run("show", FIXTURES / "counter" / "mm-14977.img").stdout)["entries"][0]
    assert {v["prot"] for v in mm["vmas"]} >= {"PROT_READ", "PROT_READ | PROT_WRITE"}
    assert "MAP_PRIVATE | MAP_ANON" in {v["flags"] for v in mm["vmas"]}
    files = json.loads(run("show", FIXTURES / "counter" / "files.img").stdout)["entries"]
    assert any(f.get("reg", {}).get("flags", "").startswith("O_WRONLY | O_APPEND") for f in files)
    plain = json.loads(run("decode", "-i", FIXTURES / "counter" / "core-14977.img").stdout)
    assert isinstance(plain["entries"][0]["tc"]["blk_sigset"], int)


# --- round trips ---

@pytest.mark.parametrize("pretty", [False, True], ids=["plain", "pretty"])
def test_round_trip_every_fixture(tmp_path, pretty):
    for path in image_fixtures():
        j = tmp_path / "x.json"
        out = tmp_path / "x.img"
        assert run("decode", "-i", path, "-o", j, *(["--pretty"] if pretty else [])).exit_code == 0
        r = run("encode", "-i", j, "-o", out)
        assert r.exit_code == 0, r.output
        assert out.read_bytes() == path.read_bytes(), path


def test_round_trip_images_criu_py_writes(tmp_path):
    d = img.ImageDir(tmp_path / "ck", create=True)
    for name, entries in realistic_samples().items():
        if isinstance(entries[0], tuple):
            d.write_entries_with_payload(name, entries)
        else:
            d.write_entries(name, entries)
        for pretty in ([], ["--pretty"]):
            r = run("decode", "-i", d.path(name), *pretty)
            assert r.exit_code == 0, r.output
            back = run("encode", input=r.stdout)
            assert back.exit_code == 0, back.output
            assert back.stdout_bytes == Path(d.path(name)).read_bytes(), name


def test_round_trip_keeps_unknown_fields(tmp_path):
    # A core entry with a field number this schema lacks (as an image of a newer CRIU would).
    core = img.ImageDir(FIXTURES / "counter").read_one("core-14977.img")
    core.tc.MergeFromString(b"\xb8\x01\x05")          # field 23 (varint) = 5
    data = img.encode_file("core", [core])
    (tmp_path / "core-1.img").write_bytes(data)
    doc = json.loads(run("decode", "-i", tmp_path / "core-1.img").stdout)
    assert "_unknown" in doc["entries"][0]["tc"]
    back = run("encode", input=json.dumps(doc))
    assert back.stdout_bytes == data


@needs_crit
def test_encode_reads_debian_crit_json(tmp_path):
    # JSON written by Debian's crit encodes back to the same image (files without schema drift).
    for path in image_fixtures():
        for pretty in ([], ["--pretty"]):
            ours = json.loads(run("decode", "-i", path, *pretty).stdout)
            if strip_drift(ours) != ours:
                continue
            text = debian("decode", "-i", path, *pretty)
            r = run("encode", input=text)
            assert r.exit_code == 0, r.output
            assert r.stdout_bytes == path.read_bytes(), path


def test_console_script_and_main_group():
    r = subprocess.run([CRIT_PY, "info", FIXTURES / "tree" / "pstree.img"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == {"magic": "PSTREE", "count": 3}
    r = subprocess.run([str(Path(sys.executable).parent / "criu-py"), "crit", "info",
                        FIXTURES / "tree" / "pagemap-14994.img"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout) == {"magic": "PAGEMAP", "count": 12}


# --- info, raw images and errors ---

def test_info_and_raw_images():
    r = run("info", FIXTURES / "counter" / "pages-1.img")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"magic": "RAW", "size": 110592,
                                                         "pages": 110592 // PAGE}
    r = run("decode", "-i", FIXTURES / "counter" / "pages-1.img")
    assert r.exit_code == 1
    assert r.stderr.strip() == (f"Error: {FIXTURES / 'counter' / 'pages-1.img'}: raw image of 110592 bytes ({110592 // PAGE} pages of"
                                f" {PAGE}); raw images are not decoded to JSON")
    assert r.stdout == ""
    r = run("info", FIXTURES / "counter" / "stats-dump")
    assert json.loads(r.stdout) == {"magic": "STATS", "count": 1}


@pytest.mark.parametrize("content,words", [
    (b"", "empty file"),
    (b"\x19\x43\x56\x54\x99\x99\x99\x99", "unknown magic 0x99999999"),
    (b"\x19\x43\x56\x54\x47\x38\x05\x55\xff\x00\x00\x00", "truncated entry 0"),
    (b"just some text\n", "unknown magic"),
])
def test_decode_corrupt_gives_one_line(tmp_path, content, words):
    p = tmp_path / "thing.bin"
    p.write_bytes(content)
    for cmd in (["decode", "-i", p], ["info", p], ["show", p]):
        r = run(*cmd)
        assert r.exit_code == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and str(p) in lines[0] and words in lines[0], lines


def test_decode_missing_file():
    r = run("decode", "-i", "/nonexistent/core-1.img")
    assert r.exit_code == 1 and r.stderr.strip() == "Error: /nonexistent/core-1.img: missing (no such file)"


@pytest.mark.parametrize("doc,words", [
    ("{not json", "not JSON (Expecting property name"),
    ('{"magic": "NOPE", "entries": []}', "unknown magic 'NOPE'"),
    ('{"entries": []}', 'needs "magic" and "entries"'),
    ('{"magic": "PSTREE", "entries": [{"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "bogus": 2}]}',
     "entries[0].bogus: no such field in pstree_entry"),
    ('{"magic": "PSTREE", "entries": [{"pid": "x1", "ppid": 0, "pgid": 1, "sid": 1}]}', "entries[0].pid"),
    ('{"magic": "PSTREE", "entries": [{"pid": 1}]}', "cannot be encoded"),
    ('{"magic": "PIPES_DATA", "entries": [{"pipe_id": 1, "bytes": 2}]}', 'missing "extra"'),
])
def test_encode_errors_are_one_line(tmp_path, doc, words):
    p = tmp_path / "in.json"
    p.write_text(doc)
    r = run("encode", "-i", p, "-o", tmp_path / "out.img")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and words in lines[0], lines
    assert not (tmp_path / "out.img").exists()


# --- explorers ---

def test_x_ps_tree():
    out = run("x", FIXTURES / "tree", "ps").stdout.splitlines()
    assert out[0].split() == ["PID", "PPID", "PGID", "SID", "COMM"]
    rows = [line.split() for line in out[1:]]
    assert [r[:4] for r in rows] == [["14994", "0", "14994", "14994"],
                                     ["14996", "14994", "14994", "14994"],
                                     ["14997", "14994", "14994", "14994"]]
    assert all(r[4] == "tree" for r in rows)
    assert out[2].index("tree") > out[1].index("tree")    # children indented


def test_x_fds():
    out = run("x", FIXTURES / "counter", "fds").stdout
    assert "14977" in out and "/tmp/fx/counter.log" in out and "cwd:" in out and "root:" in out
    tree = run("x", FIXTURES / "tree", "fds").stdout
    assert tree.count("PIPE") == 9   # each of the three has two ring ends and one shared pipe
    watcher = run("x", FIXTURES / "watcher", "fds").stdout
    assert "INOTIFY" in watcher and "wd 1" in watcher and "wd 2" in watcher


def test_x_mems_counts_dumped_pages_per_vma():
    out = run("x", FIXTURES / "counter", "mems").stdout.splitlines()
    vma_lines = [l for l in out if "-" in l.split()[0] and len(l.split()[0]) == 33]
    mm = img.ImageDir(FIXTURES / "counter").read_one("mm-14977.img")
    assert len(vma_lines) == len(mm.vmas)
    dumped = sum(int(l.split()[3].split("/")[0]) for l in vma_lines)
    pm = img.ImageDir(FIXTURES / "counter").read_entries("pagemap-14977.img")[1:]
    assert dumped == sum(img.pagemap_nr_pages(e) for e in pm if e.flags & img.PE_PRESENT)
    assert any("[vdso]" in l for l in vma_lines) and any("[stack]" in l for l in vma_lines)
    assert any("libc.so.6 + 0x" in l for l in vma_lines)
    assert "[heap]" in run("x", FIXTURES / "tree", "mems").stdout   # counter never called malloc


def test_x_rss():
    out = run("x", FIXTURES / "tree", "rss").stdout
    for pid in (14994, 14996, 14997):
        pm = img.ImageDir(FIXTURES / "tree").read_entries(f"pagemap-{pid}.img")[1:]
        total = sum(img.pagemap_nr_pages(e) for e in pm)
        assert f"{pid}: {total} resident pages" in out


def test_x_errors():
    r = run("x", "/nonexistent", "ps")
    assert r.exit_code == 1 and "/nonexistent" in r.stderr
    r = run("x", FIXTURES / "tree", "bogus")
    assert r.exit_code == 2


# --- make-lazy ---

def page_table(d: img.ImageDir, pid: int):
    """vaddr -> (flags, offset in the pages file or None) for every page of a pagemap."""
    pm = d.read_entries(f"pagemap-{pid}.img")
    table, off = {}, 0
    for pe in pm[1:]:
        n = img.pagemap_nr_pages(pe)
        for i in range(n):
            table[pe.vaddr + i * PAGE] = (pe.flags, off + i * PAGE if pe.flags & img.PE_PRESENT else None)
        if pe.flags & img.PE_PRESENT:
            off += n * PAGE
    return pm[0].pages_id, table


def tree_hash(path):
    h = {}
    for n in sorted(os.listdir(path)):
        h[n] = hashlib.sha256(Path(path, n).read_bytes()).hexdigest()
    return h


def check_make_lazy(src_dir, out_dir, stack_addrs_of=None):
    """The make-lazy invariants, page by page. Returns (kept, lazy) pages."""
    src, out = img.ImageDir(src_dir), img.ImageDir(out_dir)
    kept_all = lazy_all = 0
    rewritten = set()
    for t in src.read_entries("pstree.img"):
        sid, before = page_table(src, t.pid)
        oid, after = page_table(out, t.pid)
        assert sid == oid
        rewritten |= {f"pagemap-{t.pid}.img", f"pages-{sid}.img"}
        assert set(before) == set(after), "the pagemap must still cover every page"
        mm = src.read_one(f"mm-{t.pid}.img")
        ranges = lazymod.lazy_ranges(mm.vmas, lazymod.stack_addrs(src, t, mm))
        starts = [a for a, _ in ranges]
        import bisect

        def eligible(addr):
            i = bisect.bisect_right(starts, addr) - 1
            return i >= 0 and addr < ranges[i][1]

        sfd = src.open_raw(f"pages-{sid}.img")
        ofd = out.open_raw(f"pages-{oid}.img")
        kept = lazy = present_before = from_parent = 0
        try:
            for addr, (flags, soff) in before.items():
                oflags, ooff = after[addr]
                if flags & img.PE_PARENT and eligible(addr):
                    # in the parent images and lazy-eligible: served lazily (from DIR's chain)
                    assert (oflags, ooff) == ((flags & ~img.PE_PARENT) | img.PE_LAZY, None)
                    from_parent += 1
                    continue
                if not flags & img.PE_PRESENT:
                    assert (oflags, ooff) == (flags, None)
                    continue
                present_before += 1
                if eligible(addr):
                    assert oflags == (flags & ~img.PE_PRESENT) | img.PE_LAZY and ooff is None
                    lazy += 1
                else:
                    # Non-lazy VMAs keep all their pages, byte for byte, at their place.
                    assert oflags == flags and ooff is not None
                    assert os.pread(ofd, PAGE, ooff) == os.pread(sfd, PAGE, soff), hex(addr)
                    kept += 1
            assert os.fstat(ofd).st_size == kept * PAGE
        finally:
            os.close(sfd)
            os.close(ofd)
        assert kept + lazy == present_before
        kept_all += kept
        lazy_all += lazy + from_parent
    # Every other file is copied unchanged; a checksum image is made anew for the copy.
    if src.exists("criu-py-checksums.img"):
        rewritten.add("criu-py-checksums.img")
        from criu_py.images import integrity
        integrity.verify(str(out_dir), {})
    for name in src.list():
        if name not in rewritten:
            assert Path(src.path(name)).read_bytes() == Path(out.path(name)).read_bytes(), name
    # ... and the copy names the dir its lazy pages are in (lazy-pages follows the link)
    listed = sorted(out.list())
    if lazy_all:
        assert os.path.realpath(out.path("lazy-source")) == os.path.realpath(src_dir)
        listed.remove("lazy-source")
    assert sorted(src.list()) == listed
    return kept_all, lazy_all


def make_lazy_ok(src, out):
    before = tree_hash(src)
    r = run("make-lazy", src, out)
    assert r.exit_code == 0, r.output
    assert tree_hash(src) == before, "DIR must never be modified"
    return r


@pytest.mark.parametrize("name", ["counter", "tree", "watcher"])
def test_make_lazy_fixtures(tmp_path, name):
    out = tmp_path / "lazy"
    r = make_lazy_ok(FIXTURES / name, out)
    kept, lazy = check_make_lazy(FIXTURES / name, out)
    assert lazy > 0 and kept > 0
    assert f"total: {kept} pages kept" in r.stdout and f"{lazy} lazy" in r.stdout
    # Upstream marked lazy-eligible pages PE_LAZY at dump time: ours are the same pages, except
    # that we keep the whole stack VMA where upstream keeps only the page under the stack pointer.
    src = img.ImageDir(FIXTURES / name)
    for t in src.read_entries("pstree.img"):
        _, before = page_table(src, t.pid)
        _, after = page_table(img.ImageDir(out), t.pid)
        ours = {a for a, (f, o) in after.items() if f & img.PE_LAZY}
        theirs = {a for a, (f, o) in before.items() if f & img.PE_LAZY}
        assert ours <= theirs
        stack = [v for v in src.read_one(f"mm-{t.pid}.img").vmas if v.flags & MAP_GROWSDOWN]
        assert all(any(v.start <= a < v.end for v in stack) for a in theirs - ours)
    if os.access(CRIT, os.X_OK):
        for f in os.listdir(out):
            if img.kind_of(f) != img.RAW and f != "lazy-source":
                debian("decode", "-i", out / f)


def test_make_lazy_refusals(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    r = run("make-lazy", FIXTURES / "counter", out)
    assert r.exit_code == 1 and "exists and is not empty" in r.stderr
    assert os.listdir(out) == ["something"]
    # An empty existing dir is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    make_lazy_ok(FIXTURES / "counter", empty)
    # Not a checkpoint.
    r = run("make-lazy", tmp_path / "busy", tmp_path / "o2")
    assert r.exit_code == 1 and "no pstree.img" in r.stderr and not (tmp_path / "o2").exists()
    # A pages file that disagrees with its pagemap: refused before anything is written.
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "counter", bad)
    os.chmod(bad / "pages-1.img", 0o600)
    with open(bad / "pages-1.img", "ab") as f:
        f.write(b"\0" * PAGE)
    r = run("make-lazy", bad, tmp_path / "o3")
    assert r.exit_code == 1 and "pages-1.img: holds" in r.stderr and not (tmp_path / "o3").exists()
    r = run("make-lazy", bad, bad)
    assert r.exit_code == 1


# Synthesized checkpoints: every kind of VMA, each page filled with its own address.

def vma(start, npages, prot=3, flags=MAP_PRIVATE | MAP_ANONYMOUS, status=VMA_AREA_REGULAR | VMA_ANON_PRIVATE):
    m = img.message_class("mm")().vmas.add()
    m.start, m.end, m.pgoff, m.shmid, m.prot, m.flags, m.status, m.fd = \
        start, start + npages * PAGE, 0, 0, prot, flags, status, -1
    return m


def synth_checkpoint(path, layout, pid=100, sp=None, present_filter=None, tail=None):
    """Write a one-process checkpoint. layout: list of (vma, pagemap runs as (first page index,
    count, flags)). Page contents: the page's address repeated, so every page is unique."""
    d = img.ImageDir(path, create=True)
    mm = img.message_class("mm")()
    for f in mm.DESCRIPTOR.fields:
        if f.is_required and f.type != f.TYPE_MESSAGE:
            setattr(mm, f.name, 0)
    entries = []
    fd = d.open_raw("pages-1.img", write=True)
    try:
        for v, runs in layout:
            mm.vmas.add().CopyFrom(v)
            for first, count, flags in runs:
                pe = img.pb_module("pagemap_pb2").pagemap_entry(vaddr=v.start + first * PAGE, flags=flags)
                img.set_pagemap_nr_pages(pe, count)
                entries.append(pe)
                if flags & img.PE_PRESENT:
                    for i in range(count):
                        a = pe.vaddr + i * PAGE
                        os.write(fd, struct.pack("<Q", a) * (PAGE // 8))
    finally:
        os.close(fd)
    head = img.pb_module("pagemap_pb2").pagemap_head(pages_id=1)
    d.write_entries(f"pagemap-{pid}.img", [head] + entries)
    d.write_entries(f"mm-{pid}.img", [mm])
    d.write_entries("pstree.img", [img.message_class("pstree")(pid=pid, ppid=0, pgid=pid, sid=pid,
                                                               threads=[pid])])
    if sp is not None:
        from test_images import _fill
        core = _fill(img.pb_module("core_pb2").core_entry())
        core.mtype = core.X86_64
        core.thread_info.SetInParent()
        _fill(core.thread_info)
        core.thread_info.gpregs.sp = sp
        d.write_entries(f"core-{pid}.img", [core])
    d.write_entries("inventory.img", [img.message_class("inventory")(img_version=2)])
    return d


P = img.PE_PRESENT
B = 0x7f0000000000


def varied_layout():
    return [
        (vma(B, 16), [(0, 4, P), (4, 1, P | img.PE_LAZY), (8, 8, P)]),      # anon: lazy
        (vma(B + 16 * PAGE, 8), [(0, 8, P)]),                                 # adjacent anon: merged range
        (vma(B + 0x100000, 4, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED), [(0, 4, P)]),
        (vma(B + 0x200000, 4, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB), [(0, 4, P)]),
        (vma(B + 0x300000, 4, status=VMA_AREA_REGULAR | VMA_ANON_PRIVATE | VMA_AREA_VDSO), [(0, 2, P)]),
        (vma(B + 0x400000, 4, status=VMA_AREA_REGULAR | VMA_ANON_PRIVATE | VMA_AREA_VVAR), [(0, 4, 0)]),
        (vma(B + 0x500000, 6, flags=MAP_PRIVATE, status=VMA_AREA_REGULAR | VMA_FILE_PRIVATE), [(1, 3, P)]),
        (vma(B + 0x600000, 8, status=VMA_AREA_REGULAR | VMA_ANON_PRIVATE | VMA_AREA_HEAP), [(0, 3, P), (5, 2, img.PE_PARENT)]),
        (vma(B + 0x700000, 8), [(0, 8, P)]),                                  # thread stack (sp inside)
        (vma(B + 0x800000, 8, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN), [(2, 6, P)]),
        (vma(B + 0x900000, 2, flags=0x1 | MAP_ANONYMOUS, status=VMA_AREA_REGULAR | (1 << 8)), [(0, 2, P)]),
    ]


@pytest.mark.parametrize("buffer_pages", [1, 3, 1024])
def test_make_lazy_synthesized(tmp_path, monkeypatch, buffer_pages):
    monkeypatch.setattr(lazymod, "BUFFER_SIZE", buffer_pages * PAGE)
    src = tmp_path / "src"
    synth_checkpoint(src, varied_layout(), sp=B + 0x700000 + 5 * PAGE + 100)
    out = tmp_path / "out"
    make_lazy_ok(src, out)
    kept, lazy = check_make_lazy(src, out)
    # anon 4+1+8 + 8 adjacent + heap 3 (+ its 2 pages in the parent images) are lazy;
    # everything else is kept.
    assert lazy == 4 + 1 + 8 + 8 + 3 + 2
    assert kept == 4 + 4 + 2 + 3 + 8 + 6 + 2
    _, after = page_table(img.ImageDir(out), 100)
    assert after[B + 0x600000 + 5 * PAGE][0] == img.PE_LAZY            # a lazy server's
    assert after[B + 0x700000][0] == P and after[B + 0x800000 + 2 * PAGE][0] == P   # stacks
    if os.access(CRIT, os.X_OK):
        doc = json.loads(debian("decode", "-i", out / "pagemap-100.img", "--pretty"))
        assert doc["entries"][1]["flags"] == "PE_LAZY" and doc["entries"][1]["nr_pages"] == 4


def test_make_lazy_splits_entries_across_vmas(tmp_path):
    # One pagemap entry spanning a file-backed VMA and an anon VMA: cut in two, in place.
    f = vma(B, 4, flags=MAP_PRIVATE, status=VMA_AREA_REGULAR | VMA_FILE_PRIVATE)
    a = vma(B + 4 * PAGE, 4)
    g = vma(B + 8 * PAGE, 4, flags=MAP_PRIVATE, status=VMA_AREA_REGULAR | VMA_FILE_PRIVATE)
    src = tmp_path / "src"
    d = synth_checkpoint(src, [(f, [(0, 12, P)]), (a, []), (g, [])])
    out = tmp_path / "out"
    make_lazy_ok(src, out)
    kept, lazy = check_make_lazy(src, out)
    assert (kept, lazy) == (8, 4)
    pm = img.ImageDir(out).read_entries("pagemap-100.img")[1:]
    assert [(e.vaddr, img.pagemap_nr_pages(e), e.flags) for e in pm] == [
        (B, 4, P), (B + 4 * PAGE, 4, img.PE_LAZY), (B + 8 * PAGE, 4, P)]
    assert all(e.compat_nr_pages == e.nr_pages for e in pm)


def test_make_lazy_is_linear_in_entries(tmp_path):
    # 20k one-page entries in 2k VMAs: a quadratic cut would take minutes.
    layout = []
    for k in range(2000):
        status = VMA_AREA_REGULAR | (VMA_ANON_PRIVATE if k % 2 else VMA_FILE_PRIVATE)
        flags = MAP_PRIVATE | (MAP_ANONYMOUS if k % 2 else 0)
        layout.append((vma(B + k * 32 * PAGE, 20, flags=flags, status=status),
                       [(2 * i, 1, P) for i in range(10)]))
    src = tmp_path / "src"
    synth_checkpoint(src, layout)
    t = time.perf_counter()
    rep = lazymod.make_lazy(str(src), str(tmp_path / "out"))
    assert time.perf_counter() - t < 10
    assert rep.processes == [(100, 10000, 10000)]


# --- on real processes dumped by criu-py itself ---

WORKLOAD = r"""
import mmap, os, sys, time
anon = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 8 << 20, 4096):
    anon[i:i + 16] = b"%016x" % i
blob = bytearray(os.urandom(1 << 20))
sys.stdout.write("ready\n"); sys.stdout.flush()
while True:
    time.sleep(0.05)
"""


def dump_real(tmp_path):
    import criu_py.dump
    if not hasattr(criu_py.dump, "dump_tasks"):   # the dump half lands separately
        pytest.skip("criu-py dump is not in this tree yet")
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert p.stdout.readline() == b"ready\n"
        ck = tmp_path / "ck"
        r = subprocess.run([str(Path(sys.executable).parent / "criu-py"), "dump", "-t", str(p.pid),
                            "-D", str(ck), "-R"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0 and not (ck / "pstree.img").exists():
            pytest.fail(f"criu-py dump failed: {r.stderr[-500:]}")
        return p.pid, ck
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def real_dump(tmp_path_factory):
    return dump_real(tmp_path_factory.mktemp("real"))


def test_real_dump_explore(real_dump):
    pid, ck = real_dump
    ps = run("x", ck, "ps").stdout
    assert str(pid) in ps and "python" in ps
    mems = run("x", ck, "mems").stdout
    assert "[heap]" in mems or "[anon]" in mems
    # The 8 MiB mapping (possibly merged with a neighbour): 2048 pages, all touched, all dumped.
    counts = [tuple(map(int, l.split()[3].split("/"))) for l in mems.splitlines()
              if l.startswith("\t") and "/" in l and l.split()[0].count("-") == 1 and "[" in l]
    assert any(total >= 2048 and dumped >= 2048 for dumped, total in counts), mems
    rss = run("x", ck, "rss").stdout
    assert f"{pid}: " in rss
    fds = run("x", ck, "fds").stdout
    assert "cwd:" in fds


def test_real_dump_round_trips_and_debian_reads_it(real_dump):
    _, ck = real_dump
    for name in os.listdir(ck):
        if img.kind_of(name) in (img.RAW, None):
            continue
        data = (ck / name).read_bytes()
        for pretty in ([], ["--pretty"]):
            j = run("decode", "-i", ck / name, *pretty)
            assert j.exit_code == 0, (name, j.output)
            assert run("encode", input=j.stdout).stdout_bytes == data, name
        if os.access(CRIT, os.X_OK) and name not in img.CRIU_PY_IMAGES:   # criu-py's own
            debian("decode", "-i", ck / name)


def test_real_dump_make_lazy(real_dump, tmp_path):
    _, ck = real_dump
    out = tmp_path / "lazy"
    make_lazy_ok(ck, out)
    kept, lazy = check_make_lazy(ck, out)
    assert lazy >= 2048 + 256        # the 8 MiB mapping and the 1 MiB bytearray at least
    assert kept > 0
    if os.access(CRIT, os.X_OK):
        for f in os.listdir(out):
            if img.kind_of(f) not in (img.RAW, None) and f not in img.CRIU_PY_IMAGES:
                debian("decode", "-i", out / f)


# --- names that are not UTF-8, terminals (issue 8) ---

def _raw_name_images(tmp_path):
    """The counter fixture with fd 3's file renamed to bytes that are not UTF-8 (a
    string field carries raw bytes on the wire) and fd 0 turned into a terminal."""
    import shutil
    d = tmp_path / "odd"
    shutil.copytree(FIXTURES / "counter", d)
    images = img.ImageDir(d)
    fdinfo_pb2 = img.pb_module("fdinfo_pb2")
    tty_pb2 = img.pb_module("tty_pb2")
    files = images.read_entries("files.img")
    target = next(f for f in files if f.reg.name == "/tmp/fx/counter.log")
    placeholder = "/tmp/fx/PLACEH.log"
    target.reg.name = placeholder
    tty = fdinfo_pb2.file_entry(type=fdinfo_pb2.TTY, id=99)
    tty.tty.id, tty.tty.tty_info_id, tty.tty.flags = 99, 7, 2
    tty.tty.fown.uid = tty.tty.fown.euid = tty.tty.fown.signum = 0
    tty.tty.fown.pid_type = tty.tty.fown.pid = 0
    files.append(tty)
    raw = img.encode_file("files", files)
    odd = b"/tmp/fx/caf\xe7-\xff.log"
    assert len(odd) == len(placeholder.encode())       # same length: no frame to resize
    raw = raw.replace(placeholder.encode(), odd)
    (d / "files.img").write_bytes(raw)
    fds = images.read_entries("fdinfo-2.img")
    fds[0].id, fds[0].type = 99, fdinfo_pb2.TTY
    images.write_entries("fdinfo-2.img", fds)
    info = tty_pb2.tty_info_entry(id=7, type=tty_pb2.PTY, locked=False, exclusive=False,
                                  packet_mode=False, sid=0, pgrp=0, rdev=os.makedev(136, 3))
    images.write_entries("tty-info.img", [info])
    images.close()
    return d, raw, odd


def test_non_utf8_path_decodes_and_round_trips(tmp_path):
    d, raw, odd = _raw_name_images(tmp_path)
    for pretty in ([], ["--pretty"]):
        r = run("decode", "-i", d / "files.img", *pretty)
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        names = [e["reg"]["name"] for e in doc["entries"] if "reg" in e]
        assert odd.decode("utf-8", "surrogateescape") in names
        src = tmp_path / "files.json"
        src.write_text(r.stdout)
        r = run("encode", "-i", src, "-o", tmp_path / "back.img")
        assert r.exit_code == 0, r.output
        assert (tmp_path / "back.img").read_bytes() == raw
    assert run("show", d / "files.img").exit_code == 0
    assert run("info", d / "files.img").exit_code == 0


def test_x_fds_with_a_terminal_and_odd_names(tmp_path):
    d, _, odd = _raw_name_images(tmp_path)
    r = run("x", d, "fds")
    assert r.exit_code == 0, r.output
    assert "TTY" in r.stdout and "tty[PTY 136:3]" in r.stdout
    assert odd.decode("utf-8", "backslashreplace") in r.stdout
    for what in ("ps", "mems", "rss"):
        r = run("x", d, what)
        assert r.exit_code == 0, (what, r.output)
    # without tty-info.img the terminal is still described, not a crash
    os.unlink(d / "tty-info.img")
    r = run("x", d, "fds")
    assert r.exit_code == 0 and "tty[info 7]" in r.stdout, r.output
