#!/usr/bin/env python3
"""make-lazy speed: checkpoints of 64 MiB, 256 MiB and 1 GiB (half of the memory in private
anonymous VMAs, so lazy-eligible; half file-backed private, so kept) are synthesized with the
image layer; make-lazy is timed against a plain copy of the pages it keeps (shutil.copyfile of a
file of the same size), measured in the same run under the same page-cache conditions.

    .venv/bin/python bench/make_lazy.py [--sizes 64,256,1024] [--repeat 3] [--dir /tmp]

Target: make-lazy >= 50% of the copy's speed at 1 GiB; time growing linearly with size."""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import criu_py.images as img                                   # noqa: E402
from criu_py.crit.explore import (MAP_ANONYMOUS, MAP_PRIVATE, VMA_ANON_PRIVATE,  # noqa: E402
                                  VMA_AREA_REGULAR, VMA_FILE_PRIVATE)
from criu_py.crit.lazy import make_lazy                        # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
VMA_BYTES = 2 << 20      # 2 MiB VMAs, alternately anonymous and file-backed
ENTRY_BYTES = 256 << 10  # pagemap entries of 64 pages


def synthesize(path: str, size: int) -> None:
    d = img.ImageDir(path, create=True)
    mm_cls = img.message_class("mm")
    mm = mm_cls(**{f.name: 0 for f in mm_cls.DESCRIPTOR.fields
                   if f.is_required and f.type != f.TYPE_MESSAGE})
    pm = img.pb_module("pagemap_pb2")
    entries = []
    base = 0x7f0000000000
    block = os.urandom(1 << 20)
    fd = d.open_raw("pages-1.img", write=True)
    try:
        for k in range(size // VMA_BYTES):
            start = base + k * VMA_BYTES
            v = mm.vmas.add()
            anon = k % 2 == 0
            v.start, v.end, v.pgoff, v.fd = start, start + VMA_BYTES, 0, -1
            v.shmid = 0 if anon else 1
            v.prot = 3
            v.flags = MAP_PRIVATE | (MAP_ANONYMOUS if anon else 0)
            v.status = VMA_AREA_REGULAR | (VMA_ANON_PRIVATE if anon else VMA_FILE_PRIVATE)
            for off in range(0, VMA_BYTES, ENTRY_BYTES):
                pe = pm.pagemap_entry(vaddr=start + off, flags=img.PE_PRESENT)
                img.set_pagemap_nr_pages(pe, ENTRY_BYTES // PAGE)
                entries.append(pe)
            for _ in range(VMA_BYTES // len(block)):
                os.write(fd, block)
    finally:
        os.close(fd)
    d.write_entries("mm-100.img", [mm])
    d.write_entries("pagemap-100.img", [pm.pagemap_head(pages_id=1)] + entries)
    d.write_entries("pstree.img", [img.message_class("pstree")(pid=100, ppid=0, pgid=100, sid=100,
                                                               threads=[100])])
    d.write_entries("inventory.img", [img.message_class("inventory")(img_version=2)])
    d.close()


def bench(size_mib: int, repeat: int, workdir: str) -> dict:
    size = size_mib << 20
    root = tempfile.mkdtemp(prefix=f"mklazy-{size_mib}-", dir=workdir)
    try:
        src = os.path.join(root, "src")
        synthesize(src, size)
        lazy_t, copy_t = [], []
        kept = lazy = 0
        for i in range(repeat + 1):               # the first round warms the page cache
            out = os.path.join(root, "out")
            t = time.perf_counter()
            rep = make_lazy(src, out)
            dt = time.perf_counter() - t
            kept, lazy = rep.kept, rep.lazy
            copy_dst = os.path.join(root, "copy")
            t = time.perf_counter()
            shutil.copyfile(os.path.join(out, "pages-1.img"), copy_dst)
            ct = time.perf_counter() - t
            if i:
                lazy_t.append(dt)
                copy_t.append(ct)
            shutil.rmtree(out)
            os.unlink(copy_dst)
        ml, cp = statistics.median(lazy_t), statistics.median(copy_t)
        return {"mib": size_mib, "kept_mib": kept * PAGE >> 20, "lazy_mib": lazy * PAGE >> 20,
                "make_lazy_s": ml, "copy_s": cp, "ratio": cp / ml}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256,1024", help="checkpoint sizes in MiB")
    ap.add_argument("--repeat", type=int, default=3)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    ap.add_argument("--dir", default=shm,
                    help="where to build the checkpoints (default: tmpfs, so the disk's writeback"
                         " does not decide the numbers)")
    args = ap.parse_args()
    rows = [bench(int(s), args.repeat, args.dir) for s in args.sizes.split(",")]
    print(f"{'size':>8} {'kept':>8} {'lazy':>8} {'make-lazy':>10} {'copy kept':>10}"
          f" {'speed vs copy':>14} {'ms/GiB':>8}")
    for r in rows:
        print(f"{r['mib']:>5}MiB {r['kept_mib']:>5}MiB {r['lazy_mib']:>5}MiB {r['make_lazy_s']:>9.3f}s"
              f" {r['copy_s']:>9.3f}s {r['ratio'] * 100:>13.0f}% {r['make_lazy_s'] * 1024 / r['mib'] * 1000:>8.0f}")
    big = rows[-1]
    per = [r["make_lazy_s"] / r["mib"] for r in rows]
    spread = max(per) / min(per)
    print(f"largest: make-lazy at {big['ratio'] * 100:.0f}% of the copy's speed (target >= 50%):"
          f" {'PASS' if big['ratio'] >= 0.5 else 'FAIL'}")
    print(f"time per MiB from {min(per) * 1e3:.2f} to {max(per) * 1e3:.2f} ms across sizes"
          f" (max/min {spread:.2f}; linear growth keeps this near 1)")
    return 0 if big["ratio"] >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
