# Which memory a lazy restore leaves to the lazy-pages daemon. One rule for `crit
# make-lazy` (which pages it leaves out), `dump --lazy-pages` (which pages it keeps in
# the frozen source instead of the images), `restore --lazy-pages` (which ranges it
# registers with the task's userfaultfd) and `lazy-pages` (which tasks will hand it a
# userfaultfd, and what to fill): private anonymous memory that is not a stack, not
# vdso/vvar/vsyscall, not locked and not hugetlb (upstream CRIU's rule), taken a whole
# VMA at a time; adjacent lazy VMAs are merged into one range.
import bisect

from criu_py import mem as M

_NOT_LAZY_STATUS = (M.VMA_AREA_STACK | M.VMA_AREA_VSYSCALL | M.VMA_AREA_VDSO | M.VMA_AREA_VVAR |
                    M.VMA_AREA_AIORING | M.VMA_AREA_SYSVIPC | M.VMA_AREA_SOCKET |
                    M.VMA_ANON_SHARED | M.VMA_FILE_PRIVATE | M.VMA_FILE_SHARED)
_NOT_LAZY_FLAGS = M.MAP_LOCKED | M.MAP_HUGETLB | M.MAP_GROWSDOWN


def vma_can_be_lazy(vma) -> bool:
    """Private anonymous memory that is not vdso/vvar/vsyscall, stack, locked or hugetlb."""
    return (vma.flags & M.MAP_PRIVATE and vma.flags & M.MAP_ANONYMOUS
            and vma.status & M.VMA_AREA_REGULAR
            and not vma.status & _NOT_LAZY_STATUS
            and not vma.flags & _NOT_LAZY_FLAGS) != 0


def lazy_ranges(vmas, stack_addrs=()) -> list[tuple[int, int]]:
    """Sorted, merged [start, end) ranges of the lazy-eligible VMAs. A VMA holding one of
    `stack_addrs` (thread stack pointers, the main stack start) is a stack: never lazy."""
    stacks = sorted(stack_addrs)
    out: list[list[int]] = []
    for v in sorted(vmas, key=lambda v: v.start):
        if not vma_can_be_lazy(v):
            continue
        i = bisect.bisect_left(stacks, v.start)
        if i < len(stacks) and stacks[i] < v.end:
            continue
        if out and out[-1][1] == v.start:
            out[-1][1] = v.end
        else:
            out.append([v.start, v.end])
    return [(a, b) for a, b in out]


def stack_addrs_of(mm, cores) -> list[int]:
    """Addresses that mark a VMA as a stack: mm_start_stack and every thread's stack
    pointer (cores: the thread cores of the process)."""
    addrs = [mm.mm_start_stack] if mm.mm_start_stack else []
    for core in cores:
        if core is not None and core.HasField("thread_info"):
            addrs.append(core.thread_info.gpregs.sp)
    return addrs


def stack_addrs(images, task, mm) -> list[int]:
    """stack_addrs_of() with the cores read from `images` (task: its pstree entry)."""
    cores = []
    for tid in (task.threads or [task.pid]):
        name = f"core-{tid}.img"
        if images.exists(name):
            cores.append(images.read_one(name))
    return stack_addrs_of(mm, cores)


def pages_in(entries, ranges, page_size: int) -> int:
    """How many pages of the pagemap `entries` (head excluded) that the restore does not
    write itself - data here, lazy, or in the parents - lie inside `ranges`: what the
    daemon has to bring. A task whose lazy ranges hold none hands over no userfaultfd."""
    from criu_py.images import PE_LAZY, PE_PARENT, PE_PRESENT, pagemap_nr_pages
    starts = [a for a, _ in ranges]
    n = 0
    for pe in entries:
        flags = pe.flags if pe.HasField("flags") else PE_PRESENT
        if pe.HasField("in_parent") and pe.in_parent:
            flags |= PE_PARENT
        if not flags & (PE_PRESENT | PE_LAZY | PE_PARENT):
            continue
        start = pe.vaddr
        end = start + pagemap_nr_pages(pe) * page_size
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(ranges) and ranges[i][0] < end:
            lo, hi = max(start, ranges[i][0]), min(end, ranges[i][1])
            if hi > lo:
                n += (hi - lo) // page_size
            i += 1
    return n


def expected_tasks(images, page_size: int) -> dict:
    """pid -> lazy ranges of every process of the images that will hand its userfaultfd
    to the lazy-pages daemon: alive, with its own memory (not a vfork child running in
    its parent's), and with pages to bring inside its lazy ranges."""
    out = {}
    entries = images.read_entries("pstree.img")
    vm_of = {}
    for e in entries:
        core = images.read_one(f"core-{e.pid}.img")
        if core.HasField("tc") and core.tc.task_state == 2:
            continue                        # a zombie
        ids = images.read_one(f"ids-{e.pid}.img")
        vm_of[e.pid] = ids.vm_id
        if e.ppid in vm_of and vm_of[e.ppid] == ids.vm_id:
            continue                        # runs in its parent's memory
        mm = images.read_one(f"mm-{e.pid}.img")
        ranges = lazy_ranges(mm.vmas, stack_addrs(images, e, mm))
        pm = images.read_entries(f"pagemap-{e.pid}.img")
        if ranges and pages_in(pm[1:], ranges, page_size):
            out[e.pid] = ranges
    return out
