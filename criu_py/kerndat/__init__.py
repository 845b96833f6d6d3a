# Kernel feature probes ("kdat") and their cache file. dump, pre-dump, restore and check
# ask here what the kernel can do instead of probing it each on their own:
#
#   from criu_py import kerndat
#   facts = kerndat.load()            # cached in /run/criu-py.kdat, or probed and saved
#   facts.page_size, facts.soft_dirty, facts.uffd_wp_async, facts.vdso_areas, ...
#   facts.caller.has_cap("CAP_SYS_ADMIN")   # about this run, never cached
#
# Kept import-light: the CLI imports this package at start-up; the probes (cffi) load
# only when a probe runs, the cache (protobuf) only when a cache is read or written.
import time

_said_no_cache = False


def load(cache_path: str | None = None, *, key=None, environ=None):
    """The kernel facts (criu_py.kerndat.facts.KerndatFacts): from the kdat cache when it
    is valid, else probed now and saved there. `cache_path` overrides the location
    (None: $CRIU_PY_KDAT, /run/criu-py.kdat, $XDG_RUNTIME_DIR/criu-py.kdat; "none": no cache).
    `key` (a cache.CacheKey) replaces the running system's identity, for tests. The
    caller facts (`.caller`) are read afresh every time."""
    import os
    from criu_py.kerndat import cache
    from criu_py.kerndat.caller import probe_caller
    from criu_py.log import log
    t0 = time.perf_counter()
    location = cache.resolve_location(cache_path, os.environ if environ is None else environ)
    caller = probe_caller()
    facts = None
    if location.path is None:
        _say_no_cache(location.reason)
    else:
        key = key or cache.current_key()
        facts = cache.read_cache(location.path, key)
    if facts is not None:
        facts.source = "cache"
        if facts.cgroup_mnt_ns != _mnt_ns():
            from criu_py.kerndat.cgroups import probe_cgroup_layout
            for name, value in probe_cgroup_layout().items():
                setattr(facts, name, value)
    else:
        facts = probe(key)
        if location.path is not None:
            saved = cache.save_cache(location.path, cache.to_bytes(facts, key))
            log.info("kdat: %s %s", "saved" if saved else "did not save", location.path)
    facts.cache_path = location.path
    facts.caller = caller
    facts.load_seconds = time.perf_counter() - t0
    log.debug("kdat: facts from %s in %.3f ms", facts.source, facts.load_seconds * 1e3)
    return facts


def probe(key=None):
    """Probe every fact now (no cache involved). Returns a KerndatFacts with source "probe"."""
    from criu_py.kerndat import cache
    from criu_py.kerndat.caller import probe_caller
    from criu_py.kerndat.facts import KerndatFacts
    from criu_py.kerndat.probes import probe_all
    t0 = time.perf_counter()
    key = key or cache.current_key()
    values, errors = probe_all()
    seconds = time.perf_counter() - t0
    return KerndatFacts(boot_id=key.boot_id, kernel_release=key.kernel_release,
                        criu_py_version=key.criu_py_version, probed_euid=key.euid,
                        probed_at=time.time(), probe_seconds=seconds, probe_errors=errors,
                        caller=probe_caller(), source="probe", load_seconds=seconds, **values)


def save(facts, cache_path: str | None = None, *, key=None) -> str:
    """Write `facts` to the kdat cache now; returns the path. Raises CriuError when there
    is no writable location or the write failed."""
    from criu_py.errors import CriuError
    from criu_py.kerndat import cache
    location = cache.resolve_location(cache_path)
    if location.path is None:
        raise CriuError(f"cannot save the kdat cache: {location.reason}")
    key = key or cache.current_key()
    foreign = cache.foreign_file(location.path)
    if foreign:
        raise CriuError(f"cannot save the kdat cache: {location.path} is {foreign}; "
                        f"criu-py replaces only its own cache files")
    if not cache.save_cache(location.path, cache.to_bytes(facts, key)):
        raise CriuError(f"cannot save the kdat cache {location.path} (see the log, -v3)")
    return location.path


def drop(cache_path: str | None = None) -> tuple[str | None, bool]:
    """Remove the kdat cache. Returns (path, whether a file was there); path None when
    there is no cache location at all."""
    from criu_py.kerndat import cache
    location = cache.resolve_location(cache_path)
    if location.path is None:
        return None, False
    return location.path, cache.drop_cache(location.path)


def _mnt_ns() -> int:
    import os
    try:
        link = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return 0
    return int(link[link.index("[") + 1:-1])


def _say_no_cache(reason: str) -> None:
    global _said_no_cache
    if _said_no_cache:
        return
    _said_no_cache = True
    from criu_py.log import log
    if reason == "the kdat cache is turned off":
        log.info("kdat: %s, probing", reason)
    else:
        log.warning("kdat: no cache file (%s), probing the kernel every run", reason)


def __getattr__(name):
    # `from criu_py.kerndat import KerndatFacts` without importing facts at start-up.
    if name in ("KerndatFacts", "CallerFacts"):
        from criu_py.kerndat import facts
        return getattr(facts, name)
    raise AttributeError(name)
