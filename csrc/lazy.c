/* userfaultfd in missing mode, for lazy restore (criu_py/lazy/): the lazy-pages daemon
 * fills a restored task's memory with UFFDIO_COPY from a pages file it maps (or from a
 * page server's answer) and UFFDIO_ZEROPAGE, and reads the uffd's messages (page faults
 * and the events of a running task: fork, mremap, madvise(DONTNEED), munmap). The uffd
 * was made inside the task and handed over: every ioctl acts on the task's mm.
 * Functions return -errno on failure. */
#include "sys.h"
#include "lazy.h"
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/userfaultfd.h>

#define PAGE 4096ul

/* Copy [dst, dst + len) from src (len a multiple of the page size). Pages that are
 * there already (EEXIST: the task has them since a fault or an event) are skipped.
 * Returns 0 once the whole range is done, else -errno of the first failure that is
 * not EEXIST (EAGAIN: the task's layout is changing, read its events first; ENOENT:
 * the range is no longer registered, i.e. unmapped; ESRCH: the task's memory is
 * gone). *done gets the bytes dealt with before it. */
long cp_uffd_fill(int uffd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
		  uint64_t *done)
{
	uint64_t pos = 0;

	while (pos < len) {
		long r;
		int64_t got;

		if (src) {
			struct uffdio_copy c = { .dst = dst + pos, .src = src + pos,
						 .len = len - pos, .mode = mode };

			r = ioctl(uffd, UFFDIO_COPY, &c);
			got = c.copy;
		} else {
			struct uffdio_zeropage z = { .range = { dst + pos, len - pos },
						     .mode = mode };

			r = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
			got = z.zeropage;
		}
		if (r == 0) {
			pos = len;
			break;
		}
		if (got > 0) {		/* part of it went in */
			pos += (uint64_t)got;
			continue;
		}
		if (errno == EEXIST || got == -EEXIST) {
			pos += PAGE;	/* that page is there: go on after it */
			continue;
		}
		*done = pos;
		return got < 0 ? got : -errno;
	}
	*done = pos;
	return 0;
}

/* Read up to max messages (32 bytes each) from a non-blocking uffd into buf. Returns
 * the number read (0: none pending), or -errno. */
long cp_uffd_read_msgs(int uffd, void *buf, long max)
{
	ssize_t n = read(uffd, buf, (size_t)max * sizeof(struct uffd_msg));

	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	return n / (long)sizeof(struct uffd_msg);
}

/* Wake the threads waiting on [start, start + len) (after a DONTWAKE fill). */
long cp_uffd_wake_range(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };

	return ioctl(uffd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

/* Fault a read-only mapping of a pages file in before its bytes are copied (one call
 * instead of a minor fault per page inside UFFDIO_COPY). Best effort. */
void cp_populate_read(uint64_t addr, uint64_t len)
{
	madvise((void *)addr, len, 22 /* MADV_POPULATE_READ */);
}
