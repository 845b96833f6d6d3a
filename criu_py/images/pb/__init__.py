# The generated protobuf modules of the images (tools/gen_proto.sh). Loading this package
# first also spares each command protobuf's pure-Python message implementation:
# descriptor_pool.py and internal/builder.py import it (python_message, which imports
# text_format: ~25 ms) even when the upb backend does all the work. With upb, a stand-in
# takes its place in sys.modules and loads it on the first use of any of its names
# (none in a dump or a restore; crit's text output, for one).
import sys
import types

_PYTHON_MESSAGE = "google.protobuf.internal.python_message"


class _LoadedOnUse(types.ModuleType):
    """Stands for a module until one of its names is used; then loads it (in its place
    in sys.modules) and hands out its names."""

    def __getattr__(self, attr):
        import importlib
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def _defer_python_message() -> None:
    import importlib.util
    from google.protobuf.internal import api_implementation
    if api_implementation.Type() != "upb" or _PYTHON_MESSAGE in sys.modules:
        return
    spec = importlib.util.find_spec(_PYTHON_MESSAGE)
    if spec is None:
        return
    stand_in = _LoadedOnUse(_PYTHON_MESSAGE)
    stand_in.__spec__ = spec
    sys.modules[_PYTHON_MESSAGE] = stand_in


_defer_python_message()
