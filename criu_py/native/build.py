# cffi build of criu_py._native: thin syscall wrappers and the PIE restorer.
# Every csrc/NAME.c is compiled into the one extension; csrc/NAME.cdef holds the
# declarations of NAME.c that Python may call (cffi cdef syntax). Adding C means one
# .c/.cdef pair, nothing here. The flags keep the restorer freestanding: no stack
# protector canary (reads %fs, which the restorer replaces), no jump tables in .rodata,
# no CET landing pads, no builtins turned into libc calls.
import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.normpath(os.path.join(HERE, "..", "..", "csrc"))

ffibuilder = FFI()
for cdef in sorted(glob.glob(os.path.join(CSRC, "*.cdef"))):
    with open(cdef) as f:
        ffibuilder.cdef(f.read())

_headers = "".join(f'#include "{os.path.basename(h)}"\n'
                   for h in sorted(glob.glob(os.path.join(CSRC, "*.h"))))
ffibuilder.set_source(
    "criu_py._native",
    "#define _GNU_SOURCE\n" + _headers,
    # setuptools wants paths relative to setup.py; the in-place build below compiles
    # inside its tmpdir, so there the paths must be absolute.
    sources=[c if __name__ == "__main__" else os.path.relpath(c)
             for c in sorted(glob.glob(os.path.join(CSRC, "*.c")))],
    include_dirs=[CSRC],
    extra_compile_args=["-O2", "-fno-stack-protector", "-fno-jump-tables",
                        "-fcf-protection=none", "-fno-builtin", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    # `python criu_py/native/build.py` builds the module in place (development).
    os.chdir(os.path.join(CSRC, ".."))
    ffibuilder.compile(tmpdir="build/native", verbose=False)
    import shutil
    for so in glob.glob("build/native/criu_py/_native*.so"):
        dst = os.path.join("criu_py", os.path.basename(so))
        shutil.copy(so, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
