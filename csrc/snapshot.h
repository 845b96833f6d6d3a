/* Copy-before-write snapshots with a synchronous userfaultfd (snapshot.c). */
#ifndef CRIU_PY_SNAPSHOT_H
#define CRIU_PY_SNAPSHOT_H
#include <stdint.h>

struct cp_snap_stats {
	uint64_t bytes;			/* copied */
	uint64_t faults;		/* write faults read from the uffds */
	uint64_t fault_copies;		/* chunks copied because a task was waiting for them */
	uint64_t pre_unprotects;	/* chunks let through before the freeze */
	uint64_t copy_ns;		/* until the last page was copied (before the disk writes) */
	uint64_t error_addr;
};

struct cp_snap;
struct cp_snap *cp_snap_new(long ntargets, uint64_t chunk);
long cp_snap_target(struct cp_snap *s, long i, int uffd, int mem_fd, int pid, const uint64_t *vmas, long nvmas);
long cp_snap_start(struct cp_snap *s);
long cp_snap_protect(struct cp_snap *s, long i, const uint64_t *ranges, long n);
long cp_snap_set_chunks(struct cp_snap *s, long i, const uint64_t *ranges, long n, int out_fd);
void cp_snap_copy_mode(struct cp_snap *s);
long cp_snap_reserve(struct cp_snap *s, uint64_t pool_size);
long cp_snap_copy(struct cp_snap *s, uint64_t pool_size, struct cp_snap_stats *out);
void cp_snap_stop(struct cp_snap *s);
void cp_snap_free(struct cp_snap *s);
long cp_snap_refresh(struct cp_snap *s, long i, uint64_t *t, long n);
#endif
