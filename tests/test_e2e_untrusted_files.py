# Issue 8 point 6: an image must never make the restore (root) write a file the task
# did not have open for writing, or open a file other than the one dumped. A Python
# program maps a copy of an ELF program privately and writable (with a dirtied page the
# dump saves), maps another file read-only and holds a third open read-only. Its images
# are then damaged the way an attacker would, step by step, and restored with
# --no-verify (the checksums would catch every one of these; the point is that the
# restore itself refuses): each restore fails in one line, leaves no process, and the
# files keep their bytes and mtime. Files replaced or changed since the dump are refused
# too, within one boot (device/inode) and as if on another host (size, mtime, build-id),
# and the untouched images still restore a program that continues.
import hashlib
import os
import shutil
import sys

import pytest

from conftest import assert_one_line_error, proc_is_running

from criu_py.images import ImageDir
from criu_py import mem as M

O_RDWR = os.O_RDWR


def _fingerprint(path):
    st = os.stat(path)
    return hashlib.sha256(open(path, "rb").read()).hexdigest(), st.st_mtime_ns, st.st_ino


@pytest.fixture
def dumped(h, workload_bins):
    """(task, images, files dir, fingerprints): the mapper dumped, its files in place."""
    d = h.path("files")
    d.mkdir()
    shutil.copy(workload_bins["counter"], d / "lib.bin")
    (d / "ro.bin").write_bytes(b"RO!!" + b"\0" * 8188)
    (d / "data.txt").write_text("data that must not change\n")
    task = h.start("mapper", d, python=True)
    task.log.wait(rf"{task.pid} 3 .*")
    images = h.dump(task)
    prints = {name: _fingerprint(d / name) for name in ("lib.bin", "ro.bin", "data.txt")}
    return task, images, d, prints


def _entry_id(images, name):
    for fe in ImageDir(str(images)).read_entries("files.img"):
        if fe.HasField("reg") and fe.reg.name.endswith("/" + name):
            return fe.id
    raise AssertionError(f"{name} not in files.img")


def _edit(images, image, change):
    im = ImageDir(str(images))
    entries = im.read_entries(image)
    change(entries)
    im.write_entries(image, entries)


def _lib_vma(entries, fid):
    mm = entries[0]
    return next(v for v in mm.vmas if v.shmid == fid and v.prot & M.PROT_WRITE)


def _restore_refused(h, images, task, prints, d, *words):
    res = h.cli("restore", "-D", images, "-d", "--no-verify", "-v0")
    assert_one_line_error(res, *words)
    assert not proc_is_running(task.pid), "a refused restore left the task behind"
    for name, before in prints.items():
        assert _fingerprint(d / name) == before, f"{name} was changed by a refused restore"


def _restores(h, images, task, *extra):
    dumped = int(task.log.lines()[-1].split()[1])
    page = task.log.lines()[-1].split()[2]
    h.restore(images, *extra, task=task)
    line = task.log.wait(rf"{task.pid} {dumped + 3} .*")
    assert line.string.split()[2] == page, "the private page of lib.bin came back different"


def _flip_to_shared(fdflags, files_flags=False, ident_flags=False):
    def steps(images, pid, fid):
        def mm(entries):
            v = _lib_vma(entries, fid)
            v.status = (v.status & ~M.VMA_FILE_PRIVATE) | M.VMA_FILE_SHARED
            v.flags = (v.flags & ~M.MAP_PRIVATE) | M.MAP_SHARED
            if fdflags:
                v.fdflags = O_RDWR
        _edit(images, f"mm-{pid}.img", mm)
        if files_flags:
            def files(entries):
                next(fe for fe in entries if fe.id == fid).reg.flags = O_RDWR
            _edit(images, "files.img", files)
        if ident_flags:
            def idents(entries):
                next(e for e in entries[1:] if e.id == fid).flags = O_RDWR
            _edit(images, "criu-py-file-ids.img", idents)
    return steps


@pytest.mark.parametrize("damage, words", [
    (_flip_to_shared(False), ("shared and writable", "read-only")),
    (_flip_to_shared(True), ("for writing", "files.img has it open read-only")),
    (_flip_to_shared(True, files_flags=True), ("disagree", "lib.bin")),
    (_flip_to_shared(True, files_flags=True, ident_flags=True), ("private", "pages")),
], ids=["vma-flags", "vma-and-fdflags", "and-files-img", "every-record"])
def test_private_mapping_made_shared_writes_nothing(h, dumped, damage, words):
    task, images, d, prints = dumped
    damage(images, task.pid, _entry_id(images, "lib.bin"))
    _restore_refused(h, images, task, prints, d, *words)


def test_read_only_fd_made_writable_is_refused(h, dumped):
    task, images, d, prints = dumped
    fid = _entry_id(images, "data.txt")

    def files(entries):
        next(fe for fe in entries if fe.id == fid).reg.flags = O_RDWR
    _edit(images, "files.img", files)
    _restore_refused(h, images, task, prints, d, "disagree", "data.txt")


def test_file_replaced_since_the_dump_is_refused_then_restores(h, dumped):
    task, images, d, prints = dumped
    os.rename(d / "lib.bin", d / "lib.orig")
    shutil.copy2(d / "lib.orig", d / "lib.bin")       # same bytes, mode and mtime: another inode
    prints["lib.bin"] = _fingerprint(d / "lib.bin")
    _restore_refused(h, images, task, prints, d, "lib.bin", "another file than the one dumped")
    os.replace(d / "lib.orig", d / "lib.bin")
    _restores(h, images, task)


def _as_if_another_boot(images):
    def head(entries):
        entries[0].boot_id = "00000000-0000-0000-0000-000000000000"
    _edit(images, "criu-py-file-ids.img", head)


def test_on_another_boot_size_mtime_and_build_id_are_checked(h, dumped):
    task, images, d, prints = dumped
    _as_if_another_boot(images)
    # mtime: the read-only file touched
    st = os.stat(d / "data.txt")
    os.utime(d / "data.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    prints["data.txt"] = _fingerprint(d / "data.txt")
    _restore_refused(h, images, task, prints, d, "data.txt", "modified since the dump")
    os.utime(d / "data.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    prints["data.txt"] = _fingerprint(d / "data.txt")
    # size (the mtime kept, as a copy with its times would)
    st = os.stat(d / "ro.bin")
    with open(d / "ro.bin", "ab") as f:
        f.write(b"x")
    os.utime(d / "ro.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    prints["ro.bin"] = _fingerprint(d / "ro.bin")
    _restore_refused(h, images, task, prints, d, "ro.bin", "size")
    os.truncate(d / "ro.bin", 8192)
    os.utime(d / "ro.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    prints["ro.bin"] = _fingerprint(d / "ro.bin")
    # build-id: same size and mtime, one byte of the id changed in place
    lib = d / "lib.bin"
    from criu_py.files.identity import elf_build_id
    fd = os.open(lib, os.O_RDWR)
    try:
        raw = bytearray(open(lib, "rb").read())
        bid = elf_build_id(fd, len(raw))
        at = raw.find(bid)
        original_st = os.fstat(fd)
        os.pwrite(fd, bytes([bid[0] ^ 0xFF]), at)
        os.utime(fd, ns=(original_st.st_atime_ns, original_st.st_mtime_ns))
        prints["lib.bin"] = _fingerprint(lib)
        _restore_refused(h, images, task, prints, d, "lib.bin", "build-id")
        os.pwrite(fd, bid[:1], at)
        os.utime(fd, ns=(original_st.st_atime_ns, original_st.st_mtime_ns))
    finally:
        os.close(fd)
    # the other boot's checks pass on the files as dumped
    _restores(h, images, task, "--no-verify")


def test_build_id_matches_upstream():
    # upstream CRIU records the same words for the libc this machine has (fixture)
    from criu_py.files.identity import build_id_words, elf_build_id
    from conftest import FIXTURES
    for fe in ImageDir(str(FIXTURES / "tree")).read_entries("files.img"):
        if fe.HasField("reg") and fe.reg.name.endswith("/libc.so.6") and len(fe.reg.build_id):
            path = fe.reg.name
            if not os.path.exists(path) or os.path.getsize(path) != fe.reg.size:
                pytest.skip(f"{path} here is not the libc the fixture was dumped with")
            fd = os.open(path, os.O_RDONLY)
            try:
                assert build_id_words(elf_build_id(fd, os.fstat(fd).st_size)) == list(fe.reg.build_id)
            finally:
                os.close(fd)
            return
    pytest.fail("no libc entry with a build-id in the tree fixture")


def test_build_id_of_programs():
    import subprocess
    from criu_py.files.identity import elf_build_id
    fd = os.open(sys.executable, os.O_RDONLY)
    try:
        ours = elf_build_id(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    out = subprocess.run(["readelf", "-n", os.path.realpath(sys.executable)],
                         capture_output=True, text=True).stdout
    want = [line.split()[-1] for line in out.splitlines() if "Build ID" in line]
    assert ours is not None and ours.hex() == want[0]
