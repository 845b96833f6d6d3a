/* Declarations shared by the dump-side syscall wrappers (ptrace.c, memread.c). */
#ifndef CRIU_PY_PTRACE_H
#define CRIU_PY_PTRACE_H
#include <stdint.h>

/* PAGEMAP_SCAN (Linux 6.7) is newer than the 6.1 system headers: our own copy. */
struct cp_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

/* Prototypes (the cffi preamble includes this header). */
long cp_ptrace(long req, int pid, unsigned long addr, unsigned long data);
long cp_peek(int pid, unsigned long addr, unsigned long *out);
long cp_getregset(int pid, int note, void *buf, unsigned long len);
long cp_setregset(int pid, int note, void *buf, unsigned long len);
long cp_vm_read(int pid, void *buf, unsigned long remote, unsigned long len);
long cp_vm_copy_ranges(int pid, int fd, const uint64_t *ranges, long nranges, void *buf, unsigned long bufsize);
long cp_vm_copy_ranges2(int pid, int fd, const uint64_t *ranges, long nranges, void *bufs,
			unsigned long bufsize, uint32_t *crcs);
long cp_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, struct cp_page_region *vec, uint64_t vec_len, uint64_t inverted, uint64_t mask, uint64_t anyof, uint64_t ret_mask, uint64_t *walk_end);
long cp_pidfd_getfd(int pidfd, int targetfd);
long cp_tee(int fd_in, int fd_out, unsigned long len, unsigned int flags);

#endif
