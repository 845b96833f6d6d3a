# The kernel probes: one function per fact, all listed in PROBES. Each tries the feature
# for real on criu-py's own process (a page, a pagemap entry, a syscall with arguments
# that cannot do harm) rather than trusting version numbers or headers. A probe returns
# {fact name: value}; a probe that fails leaves its facts at "absent" and says why in
# probe_errors. Loaded only when probing: it imports cffi.
import errno
import mmap
import os
import signal
import struct
import time
from contextlib import ExitStack, contextmanager

from criu_py.errors import CriuError
from criu_py.kerndat import procfs
from criu_py.kerndat.cgroups import probe_cgroup_layout
from criu_py.kerndat.facts import VdsoArea, VdsoSymbol, XFeature
from criu_py.log import log
from criu_py.native import ffi, lib

# x86_64 syscall numbers and constants the Debian 12 (Linux 6.1) headers may lack.
NR_MMAP, NR_MUNMAP, NR_IOCTL, NR_PTRACE = 9, 11, 16, 101
NR_PRCTL, NR_ARCH_PRCTL, NR_KCMP, NR_USERFAULTFD, NR_RSEQ = 157, 158, 312, 323, 334
NR_PIDFD_OPEN, NR_CLONE3, NR_PIDFD_GETFD = 434, 435, 438
PROT_NONE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0, 0x02, 0x20, 0x100000
PR_SET_MM, PR_SET_MM_MAP_SIZE = 35, 15
ARCH_MAP_VDSO_64 = 0x2003
KCMP_VM = 1
PTRACE_TRACEME, PTRACE_GETREGSET, PTRACE_GET_RSEQ_CONFIGURATION = 0, 0x4204, 0x420F
NT_X86_XSTATE = 0x202
MFD_CLOEXEC, MFD_HUGETLB = 0x0001, 0x0004

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY, PM_EXCLUSIVE, PM_FILE, PM_PRESENT = 1 << 55, 1 << 56, 1 << 61, 1 << 63

# PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg), 12 u64 fields
PAGEMAP_SCAN = 0xC0606610
PM_SCAN_ARG_SIZE = 96
PM_SCAN_WP_MATCHING = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_ALL_KNOWN = 10          # categories up to bit 9 have been defined so far

# userfaultfd
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
USERFAULTFD_IOC_NEW = 0xAA00                    # _IO(0xAA, 0)
UFFDIO_API = 0xC018AA3F                         # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00                    # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_WRITEPROTECT = 0xC018AA06                # _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP = 1, 2
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFD_FEATURE_WP_UNPOPULATED, UFFD_FEATURE_WP_ASYNC = 1 << 13, 1 << 15

VDSO_AREAS = ("[vvar]", "[vvar_vclock]", "[vdso]")
PAGE = mmap.PAGESIZE


# ------------------------------------------------------------------ helpers

def _syscall(nr: int, *args) -> int:
    """Raw syscall; returns the result or -errno (never raises)."""
    args = [int(ffi.cast("intptr_t", a)) if isinstance(a, ffi.CData) else a for a in args]
    args += [0] * (6 - len(args))
    return lib.criu_py_raw_syscall6(nr, *args)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


@contextmanager
def _page(populate: bool = True, shared: bool = False):
    """One page of anonymous memory: yields (mmap object, its address)."""
    m = mmap.mmap(-1, PAGE, flags=(mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE))
    buf = ffi.from_buffer(m)
    try:
        if populate:
            m[0] = 1
        yield m, int(ffi.cast("uintptr_t", buf))
    finally:
        del buf
        m.close()


@contextmanager
def _fd(fd: int):
    try:
        yield fd
    finally:
        os.close(fd)


def _pagemap_entry(fd: int, addr: int) -> int:
    return struct.unpack("<Q", os.pread(fd, 8, addr // PAGE * 8))[0]


def _read_page_entry(addr: int) -> int:
    with _fd(os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)) as fd:
        return _pagemap_entry(fd, addr)


def _new_uffd(flags: int = 0) -> int:
    """A userfaultfd by whatever way this caller may use, or raise OSError."""
    fd = _syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | flags)
    if fd >= 0:
        return fd
    first = fd
    try:
        with _fd(os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)) as dev:
            return _check(_syscall(NR_IOCTL, dev, USERFAULTFD_IOC_NEW,
                                   os.O_CLOEXEC | os.O_NONBLOCK | flags), "USERFAULTFD_IOC_NEW")
    except OSError:
        fd = _syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY | flags)
        return _check(fd if fd >= 0 else first, "userfaultfd")


def _uffd_api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API on fd asking for `features`: returns (features, ioctls) offered."""
    api = ffi.new("uint64_t[3]", [UFFD_API, features, 0])
    _check(_syscall(NR_IOCTL, fd, UFFDIO_API, api), "UFFDIO_API")
    return api[1], api[2]


def _uffd_register(fd: int, addr: int, mode: int) -> None:
    reg = ffi.new("uint64_t[4]", [addr, PAGE, mode, 0])
    _check(_syscall(NR_IOCTL, fd, UFFDIO_REGISTER, reg), "UFFDIO_REGISTER")


def _pagemap_scan(fd: int, start: int, end: int, flags: int, category_mask: int,
                  anyof_mask: int, return_mask: int, nvec: int = 4):
    """PAGEMAP_SCAN over [start, end): returns [(start, end, categories)] or raises."""
    vec = ffi.new("uint64_t[]", 3 * nvec)
    arg = ffi.new("uint64_t[12]", [PM_SCAN_ARG_SIZE, flags, start, end, 0,
                                   int(ffi.cast("uintptr_t", vec)), nvec, 0, 0,
                                   category_mask, anyof_mask, return_mask])
    n = _check(_syscall(NR_IOCTL, fd, PAGEMAP_SCAN, arg), "PAGEMAP_SCAN")
    return [(vec[3 * i], vec[3 * i + 1], vec[3 * i + 2]) for i in range(n)]


# ------------------------------------------------------------------ memory

def probe_page_size() -> dict:
    return {"page_size": os.sysconf("SC_PAGE_SIZE")}


def probe_task_size() -> dict:
    """The highest user address + 1: try a MAP_FIXED_NOREPLACE page just below each
    candidate limit (5-level, then 4-level paging); EEXIST also proves the range valid."""
    for candidate in ((1 << 56) - PAGE, (1 << 47) - PAGE):
        addr = candidate - PAGE
        ret = _syscall(NR_MMAP, addr, PAGE, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if ret >= 0 or ret == -errno.EEXIST:
            if ret >= 0:
                _syscall(NR_MUNMAP, ret, PAGE)
                if ret != addr:     # a kernel that ignores NOREPLACE placed it elsewhere
                    continue
            return {"task_size": candidate}
    raise OSError(errno.ENOMEM, "no candidate TASK_SIZE accepted a mapping")


def probe_mmap_min_addr() -> dict:
    return {"mmap_min_addr": int(procfs.read_sysctl("vm/mmap_min_addr"))}


def probe_zero_pfn() -> dict:
    """A page that was only read maps the shared zero page; its PFN lets the dump skip such
    pages. PFNs read as 0 without CAP_SYS_ADMIN."""
    with _page(populate=False) as (m, addr):
        _ = m[0]
        entry = _read_page_entry(addr)
    pfn = entry & PM_PFN_MASK if entry & PM_PRESENT else 0
    return {"zero_pfn": pfn}


def probe_pagemap_pfn() -> dict:
    with _page() as (m, addr):
        entry = _read_page_entry(addr)
    return {"pagemap_pfn": bool(entry & PM_PRESENT and entry & PM_PFN_MASK)}


def probe_pagemap_exclusive() -> dict:
    with _page() as (m, addr):
        entry = _read_page_entry(addr)
    return {"pagemap_exclusive": bool(entry & PM_PRESENT and entry & PM_EXCLUSIVE)}


def probe_pagemap_file() -> dict:
    with _page(shared=True) as (m, addr):
        entry = _read_page_entry(addr)
    return {"pagemap_file": bool(entry & PM_PRESENT and entry & PM_FILE)}


def probe_soft_dirty() -> dict:
    """Clear the soft-dirty bits (clear_refs 4), check the page reads clean, write it,
    check bit 55 came back. Kernels without CONFIG_MEM_SOFT_DIRTY accept the clear
    silently and never set the bit: only the write test tells."""
    with _page() as (m, addr), _fd(os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)) as pm:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("4")
        clean = not _pagemap_entry(pm, addr) & PM_SOFT_DIRTY
        m[0] = 2
        dirty = bool(_pagemap_entry(pm, addr) & PM_SOFT_DIRTY)
    return {"soft_dirty": clean and dirty}


def probe_pagemap_scan() -> dict:
    """PAGEMAP_SCAN (Linux 6.7): scan one present page, then learn which PAGE_IS_*
    categories the kernel accepts (unknown ones are EINVAL)."""
    with _page() as (m, addr), _fd(os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)) as pm:
        try:
            regions = _pagemap_scan(pm, addr, addr + PAGE, 0, 0, PAGE_IS_PRESENT, PAGE_IS_PRESENT)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return {"pagemap_scan": False, "pagemap_scan_categories": 0}
            raise
        works = regions == [(addr, addr + PAGE, PAGE_IS_PRESENT)]
        categories = 0
        for bit in range(PAGE_IS_ALL_KNOWN):
            try:
                _pagemap_scan(pm, addr, addr + PAGE, 0, 0, 1 << bit, 1 << bit)
                categories |= 1 << bit
            except OSError:
                pass
    return {"pagemap_scan": works, "pagemap_scan_categories": categories}


def probe_shmem_dev() -> dict:
    """The device of MAP_SHARED|MAP_ANONYMOUS memory (the kernel's internal shmem mount),
    as its /proc/self/map_files entry shows it; memfd lives on the same mount."""
    with _page(shared=True) as (m, addr):
        try:
            return {"shmem_dev": os.stat(f"/proc/self/map_files/{addr:x}-{addr + PAGE:x}").st_dev}
        except OSError:
            pass
    with _fd(os.memfd_create("criu-py-kdat", MFD_CLOEXEC)) as fd:
        return {"shmem_dev": os.fstat(fd).st_dev}


def probe_prctl_mm_map() -> dict:
    size = ffi.new("unsigned int *")
    ret = _syscall(NR_PRCTL, PR_SET_MM, PR_SET_MM_MAP_SIZE, size, 0, 0)
    return {"prctl_mm_map": ret == 0 and size[0] > 0}


# ------------------------------------------------------------------ userfaultfd

def probe_dev_userfaultfd() -> dict:
    try:
        with _fd(os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)) as dev:
            fd = _syscall(NR_IOCTL, dev, USERFAULTFD_IOC_NEW, os.O_CLOEXEC)
    except OSError:
        return {"dev_userfaultfd": False}
    if fd >= 0:
        os.close(fd)
    return {"dev_userfaultfd": fd >= 0}


def probe_uffd_syscall() -> dict:
    """userfaultfd() without UFFD_USER_MODE_ONLY: what lazy restore needs (kernel faults too)."""
    fd = _syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
    return {"uffd_syscall": fd >= 0}


def probe_unprivileged_uffd() -> dict:
    try:
        return {"unprivileged_uffd": procfs.read_sysctl("vm/unprivileged_userfaultfd") == "1"}
    except FileNotFoundError:
        return {"unprivileged_uffd": False}


def probe_uffd_features() -> dict:
    with _fd(_new_uffd()) as fd:
        features, ioctls = _uffd_api(fd, 0)
    return {"uffd_features": features, "uffd_ioctls": ioctls}


def probe_uffd_missing() -> dict:
    with _fd(_new_uffd()) as fd, _page(populate=False) as (m, addr):
        _uffd_api(fd, 0)
        _uffd_register(fd, addr, UFFDIO_REGISTER_MODE_MISSING)
    return {"uffd_missing": True}


def probe_uffd_wp() -> dict:
    with _fd(_new_uffd()) as fd, _page() as (m, addr):
        _uffd_api(fd, 0)
        _uffd_register(fd, addr, UFFDIO_REGISTER_MODE_WP)
    return {"uffd_wp": True}


def probe_uffd_dirty_tracking() -> dict:
    """The pre-dump path without soft-dirty, end to end on two pages: write-protect both
    in WP_ASYNC mode, write one, and PAGEMAP_SCAN must report exactly that one."""
    with ExitStack() as stack:
        fd = stack.enter_context(_fd(_new_uffd()))
        _uffd_api(fd, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
        m = stack.enter_context(_mapping(2 * PAGE))
        buf = ffi.from_buffer(m)
        stack.callback(ffi.release, buf)        # before the mapping closes (LIFO)
        addr = int(ffi.cast("uintptr_t", buf))
        m[0] = m[PAGE] = 1
        reg = ffi.new("uint64_t[4]", [addr, 2 * PAGE, UFFDIO_REGISTER_MODE_WP, 0])
        _check(_syscall(NR_IOCTL, fd, UFFDIO_REGISTER, reg), "UFFDIO_REGISTER")
        wp = ffi.new("uint64_t[3]", [addr, 2 * PAGE, UFFDIO_WRITEPROTECT_MODE_WP])
        _check(_syscall(NR_IOCTL, fd, UFFDIO_WRITEPROTECT, wp), "UFFDIO_WRITEPROTECT")
        m[PAGE] = 2
        pm = stack.enter_context(_fd(os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)))
        written = _pagemap_scan(pm, addr, addr + 2 * PAGE, PM_SCAN_WP_MATCHING,
                                PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN)
    return {"uffd_dirty_tracking": written == [(addr + PAGE, addr + 2 * PAGE, PAGE_IS_WRITTEN)]}


@contextmanager
def _mapping(size: int):
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    try:
        yield m
    finally:
        m.close()


# ------------------------------------------------------------------ processes

def probe_pid_max() -> dict:
    return {"pid_max": int(procfs.read_sysctl("kernel/pid_max"))}


def probe_last_cap() -> dict:
    return {"last_cap": int(procfs.read_sysctl("kernel/cap_last_cap"))}


def probe_clone3_set_tid() -> dict:
    """clone3 with set_tid but set_tid_size 0 can never create a task: EINVAL means the
    kernel knows set_tid, E2BIG a clone3 without it, ENOSYS no clone3 at all."""
    args = ffi.new("uint64_t[11]")
    args[8] = (1 << 64) - 1     # set_tid: any non-NULL value (set_tid_size stays 0)
    ret = _syscall(NR_CLONE3, args, 88)
    if ret == 0:                # cannot happen with these arguments; be safe anyway
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, 0x40000000)  # __WALL: such a child has no exit signal
    return {"clone3_set_tid": ret == -errno.EINVAL}


def probe_pidfd_open() -> dict:
    fd = _syscall(NR_PIDFD_OPEN, os.getpid(), 0)
    if fd >= 0:
        os.close(fd)
    return {"pidfd_open": fd >= 0}


def probe_pidfd_getfd() -> dict:
    with _fd(_check(_syscall(NR_PIDFD_OPEN, os.getpid(), 0), "pidfd_open")) as pidfd:
        dup = _syscall(NR_PIDFD_GETFD, pidfd, pidfd, 0)
    if dup >= 0:
        os.close(dup)
    return {"pidfd_getfd": dup >= 0}


def probe_kcmp() -> dict:
    pid = os.getpid()
    return {"kcmp": _syscall(NR_KCMP, pid, pid, KCMP_VM, 0, 0) == 0}


def probe_nspid() -> dict:
    return {"nspid": "NSpid" in procfs.read_status()}


def probe_rseq() -> dict:
    """rseq(NULL, 0, 0, 0) is always refused: EINVAL by a kernel that has rseq."""
    return {"rseq": _syscall(NR_RSEQ, 0, 0, 0, 0) == -errno.EINVAL}


def probe_ptrace_child() -> dict:
    """Facts only a tracer sees, asked of a stopped child: PTRACE_GET_RSEQ_CONFIGURATION
    and the size of the NT_X86_XSTATE regset."""
    rseq_conf = ffi.new("uint64_t[4]")
    xstate = ffi.new("char[]", 65536)
    iov = ffi.new("uint64_t[2]", [int(ffi.cast("uintptr_t", xstate)), 65536])
    pid = os.fork()
    if pid == 0:
        try:
            if lib.criu_py_raw_syscall6(NR_PTRACE, PTRACE_TRACEME, 0, 0, 0, 0, 0) == 0:
                os.kill(os.getpid(), signal.SIGSTOP)
        finally:
            os._exit(0)
    try:
        _, status = os.waitpid(pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            raise OSError(errno.ECHILD, "the ptrace probe child did not stop")
        conf = _syscall(NR_PTRACE, PTRACE_GET_RSEQ_CONFIGURATION, pid, 32, rseq_conf)
        regset = _syscall(NR_PTRACE, PTRACE_GETREGSET, pid, NT_X86_XSTATE, iov)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"ptrace_rseq_conf": conf > 0,
            "ptrace_xstate_size": iov[1] if regset == 0 else 0}


def probe_time_ns() -> dict:
    return {"time_ns": os.path.exists("/proc/self/ns/time")}


def probe_memfd() -> dict:
    try:
        os.close(os.memfd_create("criu-py-kdat", MFD_CLOEXEC))
        return {"memfd": True}
    except OSError:
        return {"memfd": False}


def probe_memfd_hugetlb() -> dict:
    try:
        os.close(os.memfd_create("criu-py-kdat", MFD_CLOEXEC | MFD_HUGETLB))
        return {"memfd_hugetlb": True}
    except OSError:
        return {"memfd_hugetlb": False}


# ------------------------------------------------------------------ vDSO

def probe_vdso() -> dict:
    """Where [vvar], [vvar_vclock] and [vdso] lie relative to [vdso], and the vDSO's
    dynamic symbols, read from its ELF image in our own memory."""
    areas = {m.path: m for m in procfs.read_maps() if m.path in VDSO_AREAS}
    vdso = areas.get("[vdso]")
    if vdso is None:
        return {"vdso_areas": (), "vdso_symbols": (), "vdso_sha256": ""}
    import hashlib
    image = bytes(ffi.buffer(ffi.cast("char *", vdso.start), vdso.end - vdso.start))
    return {
        "vdso_areas": tuple(VdsoArea(name, m.end - m.start, m.start - vdso.start)
                            for name, m in sorted(areas.items(), key=lambda kv: kv[1].start)),
        "vdso_symbols": tuple(elf_dynamic_symbols(image)),
        "vdso_sha256": hashlib.sha256(image).hexdigest(),
    }


def elf_dynamic_symbols(image: bytes) -> list[VdsoSymbol]:
    """Defined function/object symbols of an in-memory ELF64 shared object (the vDSO), by
    PT_DYNAMIC: DT_SYMTAB, DT_STRTAB and the symbol count from DT_HASH (or the .dynsym
    section header when there is no DT_HASH). Offsets are relative to the image start."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        raise ValueError("the vDSO is not an ELF64 image")
    (e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum,
     _) = struct.unpack_from("<QQIHHHHHH", image, 0x20)
    base, dynamic = None, None
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", image, e_phoff + i * e_phentsize)
        if p_type == 1 and base is None:        # PT_LOAD: image offset 0 <-> this vaddr
            base = p_vaddr - p_offset
        elif p_type == 2:                        # PT_DYNAMIC
            dynamic = p_offset
    if base is None or dynamic is None:
        raise ValueError("the vDSO has no PT_LOAD or PT_DYNAMIC")
    tags = {}
    for off in range(dynamic, len(image) - 15, 16):
        tag, val = struct.unpack_from("<qQ", image, off)
        if tag == 0:
            break
        tags.setdefault(tag, val)
    symtab, strtab = tags[6] - base, tags[5] - base         # DT_SYMTAB, DT_STRTAB
    if 4 in tags:                                           # DT_HASH: nchain = symbol count
        count = struct.unpack_from("<II", image, tags[4] - base)[1]
    else:
        count = 0
        for i in range(e_shnum):
            sh = struct.unpack_from("<IIQQQQ", image, e_shoff + i * e_shentsize)
            if sh[1] == 11:                                 # SHT_DYNSYM
                count = sh[5] // 24
    out = []
    for i in range(1, count):
        st_name, st_info, _, st_shndx, st_value, _ = struct.unpack_from("<IBBHQQ", image, symtab + i * 24)
        if st_shndx in (0, 0xFFF1) or (st_info & 0xF) not in (0, 1, 2):  # undefined, version
            continue
        end = image.index(b"\0", strtab + st_name)
        out.append(VdsoSymbol(image[strtab + st_name:end].decode(), st_value - base))
    return out


def probe_map_vdso() -> dict:
    """arch_prctl(ARCH_MAP_VDSO_64) refuses with EEXIST while a vDSO is mapped, which ours
    is: EEXIST proves the call exists without mapping anything."""
    if not any(m.path == "[vdso]" for m in procfs.read_maps()):
        return {"map_vdso": False}
    return {"map_vdso": _syscall(NR_ARCH_PRCTL, ARCH_MAP_VDSO_64, 0) == -errno.EEXIST}


# ------------------------------------------------------------------ CPU extended state

def _cpuid(leaf: int, subleaf: int = 0) -> tuple:
    out = ffi.new("uint32_t[4]")
    lib.criu_py_cpuid(leaf, subleaf, out)
    return tuple(out)


def probe_xsave() -> dict:
    """CPUID leaf 0xD and XCR0: the xsave area size and the component layout the kernel
    uses for signal frames and ptrace (standard format)."""
    if not _cpuid(1)[2] >> 27 & 1:                          # OSXSAVE off: no xsave at all
        return {"xsave_size": 0, "xsave_max_size": 0, "xfeatures_mask": 0,
                "xfeatures_supported": 0, "xsave_instructions": 0, "xfeatures": ()}
    eax, ebx, ecx, edx = _cpuid(0xD, 0)
    xcr0 = lib.criu_py_xgetbv(0)
    layout = []
    for bit in range(2, 63):
        if xcr0 >> bit & 1:
            size, offset, _, _ = _cpuid(0xD, bit)
            layout.append(XFeature(bit, size, offset))
    return {"xsave_size": ebx, "xsave_max_size": ecx, "xfeatures_mask": xcr0,
            "xfeatures_supported": edx << 32 | eax, "xsave_instructions": _cpuid(0xD, 1)[0],
            "xfeatures": tuple(layout)}


# ------------------------------------------------------------------ the table

# (name, probe function). Each function returns {fact: value} for the facts it names.
PROBES = (
    ("page_size", probe_page_size),
    ("task_size", probe_task_size),
    ("mmap_min_addr", probe_mmap_min_addr),
    ("zero_pfn", probe_zero_pfn),
    ("pagemap_pfn", probe_pagemap_pfn),
    ("pagemap_exclusive", probe_pagemap_exclusive),
    ("pagemap_file", probe_pagemap_file),
    ("soft_dirty", probe_soft_dirty),
    ("pagemap_scan", probe_pagemap_scan),
    ("shmem_dev", probe_shmem_dev),
    ("prctl_mm_map", probe_prctl_mm_map),
    ("dev_userfaultfd", probe_dev_userfaultfd),
    ("uffd_syscall", probe_uffd_syscall),
    ("unprivileged_uffd", probe_unprivileged_uffd),
    ("uffd_features", probe_uffd_features),
    ("uffd_missing", probe_uffd_missing),
    ("uffd_wp", probe_uffd_wp),
    ("uffd_dirty_tracking", probe_uffd_dirty_tracking),
    ("pid_max", probe_pid_max),
    ("last_cap", probe_last_cap),
    ("clone3_set_tid", probe_clone3_set_tid),
    ("pidfd_open", probe_pidfd_open),
    ("pidfd_getfd", probe_pidfd_getfd),
    ("kcmp", probe_kcmp),
    ("nspid", probe_nspid),
    ("rseq", probe_rseq),
    ("ptrace", probe_ptrace_child),
    ("time_ns", probe_time_ns),
    ("memfd", probe_memfd),
    ("memfd_hugetlb", probe_memfd_hugetlb),
    ("vdso", probe_vdso),
    ("map_vdso", probe_map_vdso),
    ("xsave", probe_xsave),
    ("cgroup_layout", probe_cgroup_layout),
)


def probe_all() -> tuple[dict, dict]:
    """Run every probe. Returns ({fact: value}, {probe name: why it failed})."""
    values, errors = {}, {}
    for name, probe in PROBES:
        t0 = time.perf_counter()
        try:
            values.update(probe())
        except (OSError, ValueError, KeyError, IndexError, struct.error, CriuError) as exc:
            errors[name] = str(exc) or type(exc).__name__
            log.info("kdat: probe %s failed: %s", name, errors[name])
        log.debug("kdat: probe %s took %.3f ms", name, (time.perf_counter() - t0) * 1e3)
    return values, errors
