/* userfaultfd ioctls and PAGEMAP_SCAN with flags, for memory tracking (criu_py/track)
 * and copy-before-write snapshots (snapshot.c). The uffd may belong to another process's
 * mm (created inside it, taken with pidfd_getfd): every ioctl acts on that mm. Each
 * returns -errno on failure. */
#include "sys.h"
#include "ptrace.h"
#include "track.h"
#include <string.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>

#define CP_RET(expr) do { long __r = (long)(expr); return __r < 0 ? -errno : __r; } while (0)

long cp_uffd_api(int uffd, uint64_t features, uint64_t *offered)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };

	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		return -errno;
	if (offered)
		*offered = api.features;
	return 0;
}

long cp_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = mode };

	CP_RET(ioctl(uffd, UFFDIO_REGISTER, &reg));
}

long cp_uffd_unregister(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };

	CP_RET(ioctl(uffd, UFFDIO_UNREGISTER, &range));
}

/* mode UFFDIO_WRITEPROTECT_MODE_WP protects; 0 removes the protection (and wakes the
 * threads waiting on the range unless UFFDIO_WRITEPROTECT_MODE_DONTWAKE). */
long cp_uffd_wp(int uffd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect wp = { .range = { start, len }, .mode = mode };

	CP_RET(ioctl(uffd, UFFDIO_WRITEPROTECT, &wp));
}

long cp_uffd_wake(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };

	CP_RET(ioctl(uffd, UFFDIO_WAKE, &range));
}

struct cp_pm_scan_arg_ex {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define CP_PAGEMAP_SCAN_EX _IOWR('f', 16, struct cp_pm_scan_arg_ex)

/* PAGEMAP_SCAN with flags (PM_SCAN_WP_MATCHING: write-protect the pages it reports,
 * which re-arms uffd-wp tracking in the same walk). */
long cp_pagemap_scan_ex(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
			struct cp_page_region *vec, uint64_t vec_len, uint64_t inverted,
			uint64_t mask, uint64_t anyof, uint64_t ret_mask, uint64_t *walk_end)
{
	struct cp_pm_scan_arg_ex a;
	long r;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.flags = flags;
	a.start = start;
	a.end = end;
	a.vec = (uint64_t)(unsigned long)vec;
	a.vec_len = vec_len;
	a.category_inverted = inverted;
	a.category_mask = mask;
	a.category_anyof_mask = anyof;
	a.return_mask = ret_mask;
	r = ioctl(pagemap_fd, CP_PAGEMAP_SCAN_EX, &a);
	if (r < 0)
		return -errno;
	*walk_end = a.walk_end;
	return r;
}

/* ---------------------------------------------------------------- tracking scans
 * One VMA of a tracked task: which of its data pages were written since the tracking
 * was (re-)armed. Output: (start, end, in_parent) triples in address order, adjacent
 * ones with the same flag merged; in_parent only where `cover` (sorted, merged
 * [start, end) pairs: what the parent images hold) has the pages. */
#define PAGE_IS_WRITTEN_ (1ULL << 1)
#define PAGE_IS_FILE_ (1ULL << 2)
#define PAGE_IS_PRESENT_ (1ULL << 3)
#define PAGE_IS_SWAPPED_ (1ULL << 4)
#define PAGE_IS_PFNZERO_ (1ULL << 5)
#define PAGE_IS_SOFT_DIRTY_ (1ULL << 7)
#define PM_SCAN_WP_MATCHING_ 1ULL
#define SCAN_VEC 4096

struct cp_rangebuf {
	struct cp_page_region *r;
	long n, cap;
};

static int rb_add(struct cp_rangebuf *b, uint64_t s, uint64_t e, uint64_t cat)
{
	if (b->n && b->r[b->n - 1].end == s && b->r[b->n - 1].categories == cat) {
		b->r[b->n - 1].end = e;
		return 0;
	}
	if (b->n == b->cap) {
		long cap = b->cap ? 2 * b->cap : 1024;
		struct cp_page_region *r = realloc(b->r, cap * sizeof(*r));

		if (!r)
			return -ENOMEM;
		b->r = r;
		b->cap = cap;
	}
	b->r[b->n].start = s;
	b->r[b->n].end = e;
	b->r[b->n].categories = cat;
	b->n++;
	return 0;
}

/* Every region of [start, end) matching the categories, with categories & ret_mask. */
static long scan_all(int fd, uint64_t start, uint64_t end, uint64_t flags, uint64_t inverted,
		     uint64_t mask, uint64_t anyof, uint64_t ret_mask, struct cp_rangebuf *out,
		     struct cp_page_region *vec)
{
	uint64_t addr = start, walk_end;

	while (addr < end) {
		long n = cp_pagemap_scan_ex(fd, addr, end, flags, vec, SCAN_VEC, inverted, mask,
					    anyof, ret_mask, &walk_end);
		if (n < 0)
			return n;
		for (long i = 0; i < n; i++)
			if (rb_add(out, vec[i].start, vec[i].end, vec[i].categories & ret_mask))
				return -ENOMEM;
		/* a walk that did not fill the vector is complete (walk_end may be stale) */
		if (n < SCAN_VEC)
			break;
		if (walk_end <= addr)
			return -EIO;
		addr = walk_end;
	}
	return 0;
}

/* Emit [s, e) as in_parent where `cover` has it, data elsewhere. */
static int emit_parent(struct cp_rangebuf *out, uint64_t s, uint64_t e, const uint64_t *cover,
		       long ncover, long *ci)
{
	while (s < e) {
		while (*ci < ncover && cover[2 * *ci + 1] <= s)
			(*ci)++;
		if (*ci >= ncover || cover[2 * *ci] >= e)
			return rb_add(out, s, e, 0);
		if (cover[2 * *ci] > s) {
			if (rb_add(out, s, cover[2 * *ci], 0))
				return -ENOMEM;
			s = cover[2 * *ci];
		}
		uint64_t hi = cover[2 * *ci + 1] < e ? cover[2 * *ci + 1] : e;

		if (rb_add(out, s, hi, 1))
			return -ENOMEM;
		s = hi;
	}
	return 0;
}

/* mode 0: uffd-wp, fast: the written pages from the kernel's quick walk of protection
 *         bits, intersected with the present pages (page cache and zero pages are not
 *         told apart: anonymous VMAs only, and a zero page may come out as data);
 * mode 1: uffd-wp, exact: data pages reporting PAGE_IS_WRITTEN; rearm protects them
 *         again in the same walk;
 * mode 2: soft-dirty: data pages reporting PAGE_IS_SOFT_DIRTY.
 * Returns the number of triples, in *out (3 u64 each, malloc'ed: cp_free() it), or
 * -errno. */
long cp_track_scan(int fd, uint64_t start, uint64_t end, int mode, int rearm,
		   const uint64_t *cover, long ncover, uint64_t **out)
{
	struct cp_page_region *vec = malloc(SCAN_VEC * sizeof(*vec));
	struct cp_rangebuf a = { 0 }, b = { 0 }, res = { 0 };
	const uint64_t data_not = PAGE_IS_FILE_ | PAGE_IS_PFNZERO_;
	const uint64_t data_any = PAGE_IS_PRESENT_ | PAGE_IS_SWAPPED_;
	long ret = 0, ci = 0;

	if (!vec)
		return -ENOMEM;
	if (mode == 0) {
		ret = scan_all(fd, start, end, 0, 0, PAGE_IS_WRITTEN_, 0, PAGE_IS_WRITTEN_, &a, vec);
		if (!ret)
			ret = scan_all(fd, start, end, 0, 0, PAGE_IS_PRESENT_, 0, PAGE_IS_PRESENT_, &b, vec);
		/* walk present ranges (b), splitting them by written (a) */
		long wi = 0;

		for (long i = 0; !ret && i < b.n; i++) {
			uint64_t s = b.r[i].start, e = b.r[i].end;

			while (s < e && !ret) {
				while (wi < a.n && a.r[wi].end <= s)
					wi++;
				if (wi >= a.n || a.r[wi].start >= e) {
					ret = emit_parent(&res, s, e, cover, ncover, &ci);
					break;
				}
				if (a.r[wi].start > s) {
					ret = emit_parent(&res, s, a.r[wi].start, cover, ncover, &ci);
					s = a.r[wi].start;
					continue;
				}
				uint64_t hi = a.r[wi].end < e ? a.r[wi].end : e;

				ret = rb_add(&res, s, hi, 0);
				s = hi;
			}
		}
	} else {
		uint64_t report = mode == 2 ? PAGE_IS_SOFT_DIRTY_ : PAGE_IS_WRITTEN_;

		ret = scan_all(fd, start, end, rearm ? PM_SCAN_WP_MATCHING_ : 0, data_not, data_not,
			       data_any, report, &a, vec);
		for (long i = 0; !ret && i < a.n; i++) {
			if (a.r[i].categories & report)
				ret = rb_add(&res, a.r[i].start, a.r[i].end, 0);
			else
				ret = emit_parent(&res, a.r[i].start, a.r[i].end, cover, ncover, &ci);
		}
	}
	*out = NULL;
	if (!ret) {
		/* struct cp_page_region is three u64: the result is the triples already */
		*out = (uint64_t *)res.r;
		ret = res.n;
		res.r = NULL;
	}
	free(vec);
	free(a.r);
	free(b.r);
	free(res.r);
	return ret;
}

/* process_vm_readv of `n` (start, end) ranges of pid, back to back into buf, up to
 * 1024 remote iovecs per call. Returns the bytes read, -EFAULT on a short read. */
long cp_vm_read_ranges(int pid, void *buf, const uint64_t *ranges, long n)
{
	struct iovec remote[1024];
	char *dst = buf;
	long total = 0, i = 0;

	while (i < n) {
		long k = 0;
		uint64_t want = 0;

		while (i + k < n && k < 1024) {
			remote[k].iov_base = (void *)(uintptr_t)ranges[2 * (i + k)];
			remote[k].iov_len = ranges[2 * (i + k) + 1] - ranges[2 * (i + k)];
			want += remote[k].iov_len;
			k++;
		}
		struct iovec local = { dst, want };
		long got = syscall(SYS_process_vm_readv, pid, &local, 1UL, remote, (unsigned long)k, 0UL);

		if (got < 0)
			return -errno;
		if ((uint64_t)got != want)
			return -EFAULT;
		dst += want;
		total += want;
		i += k;
	}
	return total;
}

/* Bytes of the (start, end, flag) triples with the given flag. */
long cp_triples_bytes(const uint64_t *t, long n, uint64_t flag)
{
	long total = 0;

	for (long i = 0; i < n; i++)
		if (t[3 * i + 2] == flag)
			total += t[3 * i + 1] - t[3 * i];
	return total;
}

/* process_vm_readv of the triples with flag 0 (data, not in the parent images), back to
 * back into buf. Returns the bytes read. */
long cp_vm_read_triples(int pid, void *buf, const uint64_t *t, long n)
{
	uint64_t pairs[2 * 256];
	char *dst = buf;
	long total = 0, k = 0;

	for (long i = 0; i <= n; i++) {
		if (i < n && t[3 * i + 2])
			continue;
		if (i < n) {
			pairs[2 * k] = t[3 * i];
			pairs[2 * k + 1] = t[3 * i + 1];
			k++;
		}
		if (k == 256 || (i == n && k)) {
			long got = cp_vm_read_ranges(pid, dst, pairs, k);

			if (got < 0)
				return got;
			dst += got;
			total += got;
			k = 0;
		}
	}
	return total;
}

void cp_free(void *p)
{
	free(p);
}
