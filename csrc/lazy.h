/* userfaultfd in missing mode for lazy restore (csrc/lazy.c, criu_py/lazy/). */
#ifndef CRIU_PY_LAZY_H
#define CRIU_PY_LAZY_H
#include <stdint.h>

/* struct uffd_msg as the kernel writes it (linux/userfaultfd.h), 32 bytes. */
struct cp_uffd_msg {
	uint8_t event;
	uint8_t reserved1;
	uint16_t reserved2;
	uint32_t reserved3;
	uint64_t arg0;		/* PAGEFAULT: flags; FORK: ufd; REMAP: from; REMOVE/UNMAP: start */
	uint64_t arg1;		/* PAGEFAULT: address; REMAP: to; REMOVE/UNMAP: end */
	uint64_t arg2;		/* PAGEFAULT: thread id; REMAP: len */
};

long cp_uffd_fill(int uffd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
		  uint64_t *done);
long cp_uffd_read_msgs(int uffd, void *buf, long max);
long cp_uffd_wake_range(int uffd, uint64_t start, uint64_t len);
void cp_populate_read(uint64_t addr, uint64_t len);
#endif
