/* Memory tracking for incremental dumps and snapshots: userfaultfd write-protect and
 * PAGEMAP_SCAN with its write-protect flag (both newer than the 6.1 system headers). */
#ifndef CRIU_PY_TRACK_H
#define CRIU_PY_TRACK_H
#include <stdint.h>

struct cp_page_region;

long cp_uffd_api(int uffd, uint64_t features, uint64_t *offered);
long cp_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode);
long cp_uffd_unregister(int uffd, uint64_t start, uint64_t len);
long cp_uffd_wp(int uffd, uint64_t start, uint64_t len, uint64_t mode);
long cp_uffd_wake(int uffd, uint64_t start, uint64_t len);
long cp_pagemap_scan_ex(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
			struct cp_page_region *vec, uint64_t vec_len, uint64_t inverted,
			uint64_t mask, uint64_t anyof, uint64_t ret_mask, uint64_t *walk_end);
long cp_track_scan(int fd, uint64_t start, uint64_t end, int mode, int rearm,
		   const uint64_t *cover, long ncover, uint64_t **out);
void cp_free(void *p);
long cp_vm_read_ranges(int pid, void *buf, const uint64_t *ranges, long n);
long cp_triples_bytes(const uint64_t *t, long n, uint64_t flag);
long cp_vm_read_triples(int pid, void *buf, const uint64_t *t, long n);
#endif
