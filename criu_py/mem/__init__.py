# Memory of a task: which VMAs it has (as CRIU's vma_entry with its status bits) and
# which pages hold data that must go to the images. mem.dump writes them; the restorer
# reads the same pagemap/pages images. Constants shared by both halves live here.

import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_GROWSDOWN, MAP_LOCKED, MAP_NORESERVE, MAP_HUGETLB = 0x100, 0x2000, 0x4000, 0x40000
MAP_TYPE, MAP_DROPPABLE = 0x0F, 0x08       # droppable: private anonymous memory the kernel may free

# vma_entry.status bits (upstream criu/include/image.h).
VMA_AREA_REGULAR = 1 << 0
VMA_AREA_STACK = 1 << 1
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_HEAP = 1 << 5
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_SOCKET = 1 << 11
VMA_AREA_VVAR = 1 << 12
VMA_AREA_AIORING = 1 << 13
VMA_AREA_MEMFD = 1 << 14

# madvise advice numbers recorded in vma_entry.madv as bits (1 << advice).
MADV_RANDOM, MADV_SEQUENTIAL = 1, 2
MADV_DONTFORK, MADV_MERGEABLE, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 10, 12, 14, 15
MADV_DONTDUMP, MADV_WIPEONFORK = 16, 18
