# The generated protobuf modules of the images (tools/gen_proto.sh). Loading this package
# first also spares each command three modules of protobuf's that a dump or a restore
# never uses (with the upb backend only):
# - the pure-Python message implementation (python_message, which imports text_format;
#   ~12 ms): descriptor_pool.py and internal/builder.py import it although upb does all
#   the work;
# - descriptor_pb2: opts.proto extends FieldOptions, so every image module needs
#   descriptor.proto in the pool, but importing descriptor_pb2 also builds its 30-odd
#   message classes. The pool gets the file from the installed descriptor_pb2's own
#   compiled code (the very bytes its import adds, which the pool then takes as the
#   same file);
# - well_known_types (datetime, calendar, locale): upb asks it for the mixins of the
#   well-known message types (Timestamp, Any, ...). No image proto uses one
#   (tests/test_images.py checks proto/), so upb gets an empty table.
#   (These two: ~7 ms of loading the six main image modules.)
# Each module stands in sys.modules until one of its names is used, then loads itself
# in its place (crit's text output; crit reading the (criu) field options).
import sys
import types

_PYTHON_MESSAGE = "google.protobuf.internal.python_message"
_WELL_KNOWN = "google.protobuf.internal.well_known_types"
_DESCRIPTOR_PB2 = "google.protobuf.descriptor_pb2"


class _LoadedOnUse(types.ModuleType):
    """Stands for a module until one of its names is used; then loads it (in its place
    in sys.modules) and hands out its names."""

    def __getattr__(self, attr):
        import importlib
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        return getattr(real, attr)


class _WellKnownTypes(_LoadedOnUse):
    """well_known_types as upb first asks for it: no mixins (no image proto uses a
    well-known type)."""

    WKTBASES: dict = {}


def _stand_in(spec, kind=_LoadedOnUse) -> None:
    if spec is not None:
        stand_in = kind(spec.name)
        stand_in.__spec__ = spec
        sys.modules[spec.name] = stand_in


def _descriptor_proto(spec) -> bytes | None:
    """The serialized descriptor.proto that descriptor_pb2's import would add to the
    pool, read from the constants of its compiled code (None if it is not there)."""
    try:
        code = spec.loader.get_code(spec.name)
    except (ImportError, OSError, AttributeError):
        return None
    for const in code.co_consts:
        if isinstance(const, bytes) and const.startswith(b"\n google/protobuf/descriptor.proto"):
            return const
    return None


def _defer_unused_modules() -> None:
    import importlib.util
    from google.protobuf.internal import api_implementation
    if api_implementation.Type() != "upb":
        return
    if _PYTHON_MESSAGE not in sys.modules:
        _stand_in(importlib.util.find_spec(_PYTHON_MESSAGE))
    if _WELL_KNOWN not in sys.modules:
        _stand_in(importlib.util.find_spec(_WELL_KNOWN), _WellKnownTypes)
    if _DESCRIPTOR_PB2 not in sys.modules:
        spec = importlib.util.find_spec(_DESCRIPTOR_PB2)
        data = _descriptor_proto(spec) if spec is not None else None
        if data is not None:
            from google.protobuf import descriptor_pool
            descriptor_pool.Default().AddSerializedFile(data)
            _stand_in(spec)


_defer_unused_modules()
