/* Thin wrappers for the dump side: ptrace requests with iovec/regset arguments,
 * process_vm_readv in chunks straight to a file, PAGEMAP_SCAN, pidfd_getfd, tee.
 * Each returns -errno on failure so Python maps it with errors.check_errno(). */
#include "sys.h"
#include "ptrace.h"
#include "digest.h"
#include "handover.h"
#include <pthread.h>
#include <string.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/uio.h>

#define CP_RET(expr) do { long __r = (long)(expr); return __r < 0 ? -errno : __r; } while (0)

long cp_ptrace(long req, int pid, unsigned long addr, unsigned long data)
{
	CP_RET(syscall(SYS_ptrace, req, pid, addr, data));
}

/* PTRACE_PEEKDATA through the raw syscall: the word lands in *out, no errno games. */
long cp_peek(int pid, unsigned long addr, unsigned long *out)
{
	CP_RET(syscall(SYS_ptrace, PTRACE_PEEKDATA, pid, addr, out));
}

/* PTRACE_GETREGSET / SETREGSET: returns the size the kernel used. */
long cp_getregset(int pid, int note, void *buf, unsigned long len)
{
	struct iovec iov = { buf, len };
	long r = syscall(SYS_ptrace, PTRACE_GETREGSET, pid, (long)note, &iov);
	return r < 0 ? -errno : (long)iov.iov_len;
}

long cp_setregset(int pid, int note, void *buf, unsigned long len)
{
	struct iovec iov = { buf, len };
	CP_RET(syscall(SYS_ptrace, PTRACE_SETREGSET, pid, (long)note, &iov));
}

/* One process_vm_readv of [remote, remote+len) into buf. Returns bytes read. */
long cp_vm_read(int pid, void *buf, unsigned long remote, unsigned long len)
{
	struct iovec l = { buf, len }, r = { (void *)remote, len };
	CP_RET(syscall(SYS_process_vm_readv, pid, &l, 1UL, &r, 1UL, 0UL));
}

static long write_all(int fd, const char *p, unsigned long len)
{
	while (len) {
		long w = write(fd, p, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += w;
		len -= w;
	}
	return 0;
}

/* Copy ranges[i] = (start, end) of pid's memory to fd, through buf (bufsize bytes),
 * with one process_vm_readv per chunk of up to bufsize bytes. Returns bytes written,
 * or -errno; a short read (memory vanished under us) is -EFAULT. */
long cp_vm_copy_ranges(int pid, int fd, const uint64_t *ranges, long nranges,
		       void *buf, unsigned long bufsize)
{
	long total = 0;
	for (long i = 0; i < nranges; i++) {
		uint64_t addr = ranges[2 * i], end = ranges[2 * i + 1];
		while (addr < end) {
			unsigned long n = end - addr < bufsize ? end - addr : bufsize;
			struct iovec l = { buf, n }, r = { (void *)addr, n };
			long got = syscall(SYS_process_vm_readv, pid, &l, 1UL, &r, 1UL, 0UL);
			if (got < 0)
				return -errno;
			if ((unsigned long)got != n)
				return -EFAULT;
			long w = write_all(fd, buf, n);
			if (w < 0)
				return w;
			addr += n;
			total += n;
		}
	}
	return total;
}

struct cp_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define CP_PAGEMAP_SCAN _IOWR('f', 16, struct cp_pm_scan_arg)

/* PAGEMAP_SCAN over [start, end) of the task whose /proc/PID/pagemap is pagemap_fd.
 * Fills vec with up to vec_len regions; *walk_end tells where the walk stopped
 * (== end when the range is complete). Returns the number of regions. */
long cp_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end,
		     struct cp_page_region *vec, uint64_t vec_len,
		     uint64_t inverted, uint64_t mask, uint64_t anyof, uint64_t ret_mask,
		     uint64_t *walk_end)
{
	struct cp_pm_scan_arg a;
	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.start = start;
	a.end = end;
	a.vec = (uint64_t)(unsigned long)vec;
	a.vec_len = vec_len;
	a.category_inverted = inverted;
	a.category_mask = mask;
	a.category_anyof_mask = anyof;
	a.return_mask = ret_mask;
	long r = ioctl(pagemap_fd, CP_PAGEMAP_SCAN, &a);
	if (r < 0)
		return -errno;
	*walk_end = a.walk_end;
	return r;
}

long cp_pidfd_getfd(int pidfd, int targetfd)
{
	CP_RET(syscall(SYS_pidfd_getfd, pidfd, targetfd, 0));
}

long cp_tee(int fd_in, int fd_out, unsigned long len, unsigned int flags)
{
	CP_RET(syscall(SYS_tee, fd_in, fd_out, len, flags));
}

/* Copy ranges like cp_vm_copy_ranges, with the reading (process_vm_readv, and the CRC of
 * every 4 KiB block into crcs[] unless it is NULL: images/integrity.py's digest without
 * reading the file back) in this thread and the writing in another, through two
 * buffers of bufsize bytes (bufs: 2 * bufsize). Returns bytes written, or -errno. */
struct copy_ring {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	char *buf[2];
	unsigned long len[2];	/* filled length; 0: empty */
	int done, err, fd;
};

static void *copy_writer(void *arg)
{
	struct copy_ring *r = arg;

	for (int i = 0;; i ^= 1) {
		unsigned long n;

		pthread_mutex_lock(&r->lock);
		while (!r->len[i] && !r->done && !r->err)
			pthread_cond_wait(&r->cond, &r->lock);
		n = r->len[i];
		pthread_mutex_unlock(&r->lock);
		if (!n)
			return NULL;		/* finished (or the reader failed) */
		long w = write_all(r->fd, r->buf[i], n);
		pthread_mutex_lock(&r->lock);
		if (w < 0 && !r->err)
			r->err = (int)w;
		r->len[i] = 0;
		pthread_cond_broadcast(&r->cond);
		pthread_mutex_unlock(&r->lock);
		if (w < 0)
			return NULL;
	}
}

long cp_vm_copy_ranges2(int pid, int fd, const uint64_t *ranges, long nranges, void *bufs,
			unsigned long bufsize, uint32_t *crcs)
{
	struct copy_ring r = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
			       { bufs, (char *)bufs + bufsize }, { 0, 0 }, 0, 0, fd };
	pthread_t writer;
	long total = 0, err = 0;
	int i = 0;

	if (pthread_create(&writer, NULL, copy_writer, &r) != 0)
		return -EAGAIN;
	for (long k = 0; k < nranges && !err; k++) {
		uint64_t addr = ranges[2 * k], end = ranges[2 * k + 1];

		while (addr < end && !err) {
			unsigned long n = end - addr < bufsize ? end - addr : bufsize;

			pthread_mutex_lock(&r.lock);
			while (r.len[i] && !r.err)
				pthread_cond_wait(&r.cond, &r.lock);
			err = r.err;
			pthread_mutex_unlock(&r.lock);
			if (err)
				break;
			struct iovec l = { r.buf[i], n }, rem = { (void *)addr, n };
			long got = syscall(SYS_process_vm_readv, pid, &l, 1UL, &rem, 1UL, 0UL);
			if (got < 0 || (unsigned long)got != n) {
				err = got < 0 ? -errno : -EFAULT;
				break;
			}
			if (crcs)
				cp_crc_blocks(r.buf[i], n, crcs + total / 4096);
			pthread_mutex_lock(&r.lock);
			r.len[i] = n;
			pthread_cond_broadcast(&r.cond);
			pthread_mutex_unlock(&r.lock);
			addr += n;
			total += n;
			i ^= 1;
		}
	}
	return cp_handover_end(&r.lock, &r.cond, &r.done, &r.err, err, writer, total);
}
