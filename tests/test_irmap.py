# Unit tests of the irmap (inode -> path, criu_py/irmap), file handles of watched inodes,
# and the /proc parsers for inotify/fanotify fdinfo and mountinfo.
import ctypes
import os
import struct

import pytest

from criu_py import proc
from criu_py.errors import Unsupported
from criu_py.images import ImageDir
from criu_py.irmap import CACHE_IMAGE, Irmap, kdev
from criu_py.irmap import handles as H


def key(path):
    st = os.lstat(path)
    return kdev(st.st_dev), st.st_ino


def test_parse_fsnotify_inotify_and_fanotify():
    ino = proc.parse_fsnotify("pos:\t0\nflags:\t04000\nmnt_id:\t15\nino:\t1057\n"
                              "inotify wd:a ino:20c009 sdev:fe00000 mask:400000e ignored_mask:0 "
                              "fhandle-bytes:8 fhandle-type:1 f_handle:09c02000b29502b2\n")
    [m] = ino.marks
    assert m.kind == "inotify" and m.values["wd"] == 10 and m.values["sdev"] == 254 << 20
    assert m.values["mask"] == 0x400000e and m.handle == bytes.fromhex("09c02000b29502b2")
    fan = proc.parse_fsnotify(
        "fanotify flags:3 event-flags:8000\n"
        "fanotify ino:20c009 sdev:fe00000 mflags:0 mask:2a ignored_mask:0 fhandle-bytes:8 "
        "fhandle-type:1 f_handle:09c02000b29502b2\n"
        "fanotify mnt_id:1e mflags:1 mask:8 ignored_mask:2\n"
        "fanotify sdev:fe00000 mflags:0 mask:2 ignored_mask:0\n")
    assert (fan.flags, fan.event_flags) == (3, 0x8000)
    assert [m.kind for m in fan.marks] == ["inode", "mount", "sb"]
    assert fan.marks[1].values == {"mnt_id": 0x1e, "mflags": 1, "mask": 8, "ignored_mask": 2}


def test_parse_mountinfo_unescapes_paths():
    [m] = proc.parse_mountinfo(
        r"36 35 98:0 /mnt1 /mnt/with\040space rw,noatime master:1 - ext3 /dev/root rw" + "\n")
    assert (m.mnt_id, m.parent_id, m.major, m.minor) == (36, 35, 98, 0)
    assert (m.root, m.mount_point, m.fstype, m.source) == ("/mnt1", "/mnt/with space", "ext3",
                                                           "/dev/root")


def test_scan_finds_a_file_by_its_inode_and_counts_entries(tmp_path):
    for i in range(20):
        (tmp_path / f"d{i}").mkdir()
        for j in range(10):
            (tmp_path / f"d{i}" / f"f{j}").touch()
    target = tmp_path / "d13" / "f7"
    irmap = Irmap([tmp_path])
    assert irmap.lookup(*key(target)) == str(target)
    assert 0 < irmap.scanned <= 20 * 11 + 1
    assert irmap.lookup(*key(target)) == str(target)        # remembered
    missing = Irmap([tmp_path / "d0"])
    assert missing.lookup(*key(target)) is None


def test_cache_is_revalidated_and_stale_entries_rescanned(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "tree").mkdir()
    f = tmp_path / "tree" / "watched"
    f.touch()
    first = Irmap([tmp_path / "tree"])
    k = key(f)
    assert first.lookup(*k) == str(f)
    ImageDir(tmp_path / "img").write_entries(CACHE_IMAGE, first.cache_entries())
    warm = Irmap([tmp_path / "tree"], [ImageDir(tmp_path / "img")])
    assert warm.lookup(*k) == str(f) and warm.scanned == 0          # from the cache
    os.rename(f, tmp_path / "tree" / "moved")
    again = Irmap([tmp_path / "tree"], [ImageDir(tmp_path / "img")])
    assert again.lookup(*k) == str(tmp_path / "tree" / "moved")     # stale: scanned
    assert again.scanned > 0


def _name_to_handle(path):
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("<I", buf, 0, 128)
    mnt = ctypes.c_int()
    r = libc.name_to_handle_at(-100, str(path).encode(), buf, ctypes.byref(mnt), 0)
    if r != 0:
        pytest.skip(f"name_to_handle_at on {path}: errno {ctypes.get_errno()}")
    nbytes, htype = struct.unpack_from("<Ii", buf, 0)
    return htype, buf.raw[8:8 + nbytes]


def test_handles_open_and_give_the_path(tmp_path):
    f = tmp_path / "watched"
    f.touch()
    htype, handle = _name_to_handle(f)
    dev, ino = key(f)
    fd = H.open_handle(dev, htype, handle)
    assert fd >= 0
    try:
        assert H.handle_path(fd, dev, ino) == str(f)
    finally:
        os.close(fd)
    assert H.watch_path(Irmap(), False, dev, ino, htype, handle, "w") == str(f)


def test_a_deleted_watched_file_is_refused_by_name(tmp_path):
    f = tmp_path / "gone"
    f.touch()
    htype, handle = _name_to_handle(f)
    dev, ino = key(f)
    keep = os.open(f, os.O_RDONLY)
    try:
        os.unlink(f)
        with pytest.raises(Unsupported, match="inotify wd 3 watches a deleted file"):
            H.watch_path(Irmap(), False, dev, ino, htype, handle, "pid 1 fd 2: inotify wd 3")
    finally:
        os.close(keep)


def test_fh_entry_round_trip():
    from criu_py.images.pb import fh_pb2
    msg = fh_pb2.fh_entry()
    H.fh_entry(msg, 1, bytes(range(12)), "/a/b")
    assert (msg.bytes, msg.type, len(msg.handle), msg.path) == (12, 1, 16, "/a/b")
    assert H.fh_handle(msg) == (1, bytes(range(12)))
