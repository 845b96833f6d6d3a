# Loads the compiled cffi module (criu_py._native): `from criu_py.native import ffi, lib`.
from criu_py._native import ffi, lib  # noqa: F401
