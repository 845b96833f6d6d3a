/* Copy-before-write snapshots of running processes (the way QEMU takes background
 * snapshots): the pages to save are write-protected with a synchronous userfaultfd of
 * each process's mm, the processes run on, and every page is copied before the first
 * write to it is let through. Two threads of ours do the work (criu_py/track/
 * snapshot.py drives them):
 *  - the fault thread reads the uffds. Before the freeze ("pre" mode, while the pages
 *    are being protected) a write only has its 2 MiB chunk unprotected (the dump finds
 *    such pages again once the tasks are frozen and protects them anew). After it
 *    ("copy" mode) a write to a chunk not copied yet has the chunk copied first;
 *  - the copier (the caller's thread) copies the chunks in address order, jumping to
 *    the chunk after the last fault (a task writing through its memory finds the
 *    copier ahead of it), and lifts each chunk's protection once it has its bytes;
 *  - a writer thread puts the copied chunks into the pages files, so disk speed does
 *    not hold back the copy (a pool of buffers between them).
 * Pages are read through /proc/PID/mem opened while the task was frozen: that fd reads
 * the same mm whatever the task does (an exec or exit makes the reads fail). If this
 * process dies, the uffds close and the tasks run on unprotected. */
#define _GNU_SOURCE
#include "sys.h"
#include "snapshot.h"
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <linux/userfaultfd.h>

enum { MODE_PRE = 0, MODE_COPY = 1 };
enum { TODO = 0, BUSY = 1, DONE = 2 };

struct chunk {
	uint64_t addr, len, off;
	_Atomic int state;
};

struct target {
	int uffd, mem_fd, out_fd;
	int pid;			/* > 0: read with process_vm_readv, mem_fd only proves */
					/* after each read that the mm is still the frozen one */
	uint64_t *vmas;			/* registered [start, end) pairs, sorted */
	long nvmas;
	struct chunk *chunks;		/* sorted by address */
	long nchunks;
};

struct buf {
	char *p;
	uint64_t len, off;
	int fd;
	struct buf *next;
};

struct cp_snap {
	struct target *t;
	long nt;
	uint64_t chunk;
	_Atomic int mode;
	int stop_fd;
	pthread_t fault_thr, writer_thr;
	int fault_started, writer_started;

	pthread_mutex_t mu;
	pthread_cond_t cv_free, cv_full;
	struct buf *bufs, *free_list, *full_head, *full_tail;
	char *pool;
	uint64_t pool_size;
	int writer_stop;

	_Atomic long hint_t, hint_c;
	_Atomic long left;
	struct cp_snap_stats st;
	_Atomic uint64_t bytes, faults, fault_copies, pre_unprotects;
	_Atomic long error;
};

static long wp_range(int uffd, uint64_t start, uint64_t len, int protect)
{
	struct uffdio_writeprotect wp = { .range = { start, len },
					  .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0 };

	return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

static void wake_range(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { start, len };

	ioctl(uffd, UFFDIO_WAKE, &r);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void fail(struct cp_snap *s, long err, uint64_t addr)
{
	long zero = 0;

	if (atomic_compare_exchange_strong(&s->error, &zero, err))
		s->st.error_addr = addr;
}

/* ---------------------------------------------------------------- buffers */
static struct buf *get_buf(struct cp_snap *s)
{
	struct buf *b;

	pthread_mutex_lock(&s->mu);
	while (!s->free_list)
		pthread_cond_wait(&s->cv_free, &s->mu);
	b = s->free_list;
	s->free_list = b->next;
	pthread_mutex_unlock(&s->mu);
	return b;
}

static void put_free(struct cp_snap *s, struct buf *b)
{
	pthread_mutex_lock(&s->mu);
	b->next = s->free_list;
	s->free_list = b;
	pthread_cond_signal(&s->cv_free);
	pthread_mutex_unlock(&s->mu);
}

static void put_full(struct cp_snap *s, struct buf *b)
{
	pthread_mutex_lock(&s->mu);
	b->next = NULL;
	if (s->full_tail)
		s->full_tail->next = b;
	else
		s->full_head = b;
	s->full_tail = b;
	pthread_cond_signal(&s->cv_full);
	pthread_mutex_unlock(&s->mu);
}

static void *writer(void *arg)
{
	struct cp_snap *s = arg;

	for (;;) {
		struct buf *b;

		pthread_mutex_lock(&s->mu);
		while (!s->full_head && !s->writer_stop)
			pthread_cond_wait(&s->cv_full, &s->mu);
		b = s->full_head;
		if (b) {
			s->full_head = b->next;
			if (!s->full_head)
				s->full_tail = NULL;
		}
		pthread_mutex_unlock(&s->mu);
		if (!b)
			return NULL;
		uint64_t done = 0;

		while (done < b->len) {
			ssize_t w = pwrite(b->fd, b->p + done, b->len - done, b->off + done);

			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				fail(s, w < 0 ? -errno : -EIO, b->off);
				break;
			}
			done += w;
		}
		put_free(s, b);
	}
}

/* ---------------------------------------------------------------- copying */
/* Copy chunk c of target t (its state is ours, BUSY), then let writes through. */
static void copy_chunk(struct cp_snap *s, struct target *t, struct chunk *c, int by_fault)
{
	struct buf *b = get_buf(s);
	uint64_t got = 0;
	long err = 0;

	if (t->pid > 0) {
		/* process_vm_readv reads whatever mm the pid has now: the mm we protected is
		 * still its own as long as a pagemap fd opened while it was frozen reads (an
		 * exec or exit ends it; no other task shares this mm). */
		struct iovec l = { b->p, c->len }, r = { (void *)(uintptr_t)c->addr, c->len };
		ssize_t n = syscall(SYS_process_vm_readv, t->pid, &l, 1UL, &r, 1UL, 0UL);
		char probe[8];

		if (n != (ssize_t)c->len)
			err = n < 0 ? -errno : -EFAULT;
		else if (pread(t->mem_fd, probe, sizeof(probe), 0) != sizeof(probe))
			err = -ESRCH;
		got = c->len;
	}
	while (!err && got < c->len) {
		ssize_t r = pread(t->mem_fd, b->p + got, c->len - got, c->addr + got);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			err = r < 0 ? -errno : -EIO;
			break;
		}
		got += r;
	}
	/* Unprotected in any case: a task must never wait for a snapshot that failed. */
	long w = wp_range(t->uffd, c->addr, c->len, 0);

	if (!err && w)
		err = w;
	atomic_store(&c->state, DONE);
	atomic_fetch_sub(&s->left, 1);
	if (err) {
		fail(s, err, c->addr);
		put_free(s, b);
		return;
	}
	b->len = c->len;
	b->off = c->off;
	b->fd = t->out_fd;
	put_full(s, b);
	atomic_fetch_add(&s->bytes, c->len);
	if (by_fault)
		atomic_fetch_add(&s->fault_copies, 1);
}

static long find_chunk(struct target *t, uint64_t addr)
{
	long lo = 0, hi = t->nchunks - 1;

	while (lo <= hi) {
		long mid = (lo + hi) / 2;
		struct chunk *c = &t->chunks[mid];

		if (addr < c->addr)
			hi = mid - 1;
		else if (addr >= c->addr + c->len)
			lo = mid + 1;
		else
			return mid;
	}
	return -1;
}

static int find_vma(struct target *t, uint64_t addr, uint64_t *start, uint64_t *end)
{
	for (long i = 0; i < t->nvmas; i++)
		if (t->vmas[2 * i] <= addr && addr < t->vmas[2 * i + 1]) {
			*start = t->vmas[2 * i];
			*end = t->vmas[2 * i + 1];
			return 1;
		}
	return 0;
}

static void on_fault(struct cp_snap *s, long ti, uint64_t addr)
{
	struct target *t = &s->t[ti];

	atomic_fetch_add(&s->faults, 1);
	if (atomic_load(&s->mode) == MODE_PRE) {
		/* Not frozen yet: let the write through (its whole chunk, so the task does not
		 * come back for every page); the freeze finds and protects it again. */
		uint64_t vs, ve, lo = addr & ~(s->chunk - 1), hi = lo + s->chunk;

		if (find_vma(t, addr, &vs, &ve)) {
			lo = lo < vs ? vs : lo;
			hi = hi > ve ? ve : hi;
		} else {
			lo = addr;
			hi = addr + 4096;
		}
		if (wp_range(t->uffd, lo, hi - lo, 0))
			wake_range(t->uffd, addr, 4096);
		atomic_fetch_add(&s->pre_unprotects, 1);
		return;
	}
	long ci = find_chunk(t, addr);

	if (ci < 0) {
		/* not a page of the snapshot */
		if (wp_range(t->uffd, addr, 4096, 0))
			wake_range(t->uffd, addr, 4096);
		return;
	}
	atomic_store(&s->hint_t, ti);
	atomic_store(&s->hint_c, ci + 1);
	struct chunk *c = &t->chunks[ci];
	int todo = TODO;

	if (atomic_compare_exchange_strong(&c->state, &todo, BUSY))
		copy_chunk(s, t, c, 1);
	else if (atomic_load(&c->state) == DONE)
		wake_range(t->uffd, c->addr, c->len);
	/* BUSY: the copier lifts the protection, which wakes the task */
}

/* The tasks wait for this thread and the copier: they come before ordinary work (best
 * effort: a raised priority needs CAP_SYS_NICE). */
static void raise_priority(int nice)
{
	setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
}

static void *fault_thread(void *arg)
{
	struct cp_snap *s = arg;

	raise_priority(-15);
	struct pollfd *pfd = calloc(s->nt + 1, sizeof(*pfd));
	struct uffd_msg msgs[32];

	if (!pfd) {
		fail(s, -ENOMEM, 0);
		return NULL;
	}
	for (long i = 0; i < s->nt; i++) {
		pfd[i].fd = s->t[i].uffd;
		pfd[i].events = POLLIN;
	}
	pfd[s->nt].fd = s->stop_fd;
	pfd[s->nt].events = POLLIN;
	for (;;) {
		if (poll(pfd, s->nt + 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail(s, -errno, 0);
			break;
		}
		for (long i = 0; i < s->nt; i++) {
			if (!(pfd[i].revents & POLLIN))
				continue;
			for (;;) {
				ssize_t n = read(s->t[i].uffd, msgs, sizeof(msgs));

				if (n <= 0)
					break;
				for (long k = 0; k < n / (ssize_t)sizeof(msgs[0]); k++)
					if (msgs[k].event == UFFD_EVENT_PAGEFAULT)
						on_fault(s, i, msgs[k].arg.pagefault.address & ~4095ULL);
			}
		}
		if (pfd[s->nt].revents & POLLIN)
			break;
	}
	free(pfd);
	return NULL;
}

/* ---------------------------------------------------------------- API */
struct cp_snap *cp_snap_new(long ntargets, uint64_t chunk)
{
	struct cp_snap *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->t = calloc(ntargets ? ntargets : 1, sizeof(*s->t));
	s->nt = ntargets;
	s->chunk = chunk;
	s->stop_fd = eventfd(0, EFD_CLOEXEC);
	atomic_store(&s->hint_t, -1);
	pthread_mutex_init(&s->mu, NULL);
	pthread_cond_init(&s->cv_free, NULL);
	pthread_cond_init(&s->cv_full, NULL);
	if (!s->t || s->stop_fd < 0) {
		cp_snap_free(s);
		return NULL;
	}
	return s;
}

long cp_snap_target(struct cp_snap *s, long i, int uffd, int mem_fd, int pid, const uint64_t *vmas,
		    long nvmas)
{
	struct target *t = &s->t[i];

	t->uffd = uffd;
	t->mem_fd = mem_fd;
	t->pid = pid;
	t->out_fd = -1;
	t->vmas = malloc((nvmas ? nvmas : 1) * 2 * sizeof(uint64_t));
	if (!t->vmas)
		return -ENOMEM;
	memcpy(t->vmas, vmas, nvmas * 2 * sizeof(uint64_t));
	t->nvmas = nvmas;
	return 0;
}

/* The fault thread, in "pre" mode: protection may begin. */
long cp_snap_start(struct cp_snap *s)
{
	int r = pthread_create(&s->fault_thr, NULL, fault_thread, s);

	if (r)
		return -r;
	s->fault_started = 1;
	return 0;
}

/* Protect (start, len) pairs of target i. */
long cp_snap_protect(struct cp_snap *s, long i, const uint64_t *ranges, long n)
{
	for (long k = 0; k < n; k++) {
		long r = wp_range(s->t[i].uffd, ranges[2 * k], ranges[2 * k + 1], 1);

		if (r)
			return r;
	}
	return 0;
}

/* Frozen: what target i's pages file holds from the engine: (address, length, file
 * offset) triples, cut into chunks at multiples of the chunk size. */
long cp_snap_set_chunks(struct cp_snap *s, long i, const uint64_t *ranges, long n, int out_fd)
{
	struct target *t = &s->t[i];
	long count = 0;

	for (long k = 0; k < n; k++) {
		uint64_t a = ranges[3 * k], e = a + ranges[3 * k + 1];

		while (a < e) {
			uint64_t next = (a & ~(s->chunk - 1)) + s->chunk;

			a = next < e ? next : e;
			count++;
		}
	}
	free(t->chunks);
	t->chunks = calloc(count ? count : 1, sizeof(*t->chunks));
	if (!t->chunks)
		return -ENOMEM;
	count = 0;
	for (long k = 0; k < n; k++) {
		uint64_t a = ranges[3 * k], e = a + ranges[3 * k + 1], off = ranges[3 * k + 2];

		while (a < e) {
			uint64_t next = (a & ~(s->chunk - 1)) + s->chunk;
			uint64_t hi = next < e ? next : e;
			struct chunk *c = &t->chunks[count++];

			c->addr = a;
			c->len = hi - a;
			c->off = off;
			atomic_store(&c->state, TODO);
			off += hi - a;
			a = hi;
		}
	}
	t->nchunks = count;
	t->out_fd = out_fd;
	return count;
}

/* Frozen, after every target's chunks are set: from now on a write waits for its copy. */
void cp_snap_copy_mode(struct cp_snap *s)
{
	long left = 0;

	for (long i = 0; i < s->nt; i++)
		left += s->t[i].nchunks;
	atomic_store(&s->left, left);
	atomic_store(&s->mode, MODE_COPY);
}

/* Before the freeze: the buffers between the copy and the disk, faulted in now (fresh
 * memory faults in at ~2 GB/s, slower than the copy itself), in huge pages when the
 * kernel gives them. 0 or -errno. */
long cp_snap_reserve(struct cp_snap *s, uint64_t pool_size)
{
	long nbufs = pool_size / s->chunk;

	if (nbufs < 2)
		nbufs = 2;
	s->pool_size = nbufs * s->chunk;
	s->pool = mmap(NULL, s->pool_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s->pool == MAP_FAILED) {
		s->pool = NULL;
		return -ENOMEM;
	}
	madvise(s->pool, s->pool_size, 14 /* MADV_HUGEPAGE */);
	madvise(s->pool, s->pool_size, 23 /* MADV_POPULATE_WRITE */);
	return 0;
}

/* The tasks run again: copy every chunk, wait for the writes, stop the fault thread.
 * 0 or -errno. */
long cp_snap_copy(struct cp_snap *s, uint64_t pool_size, struct cp_snap_stats *out)
{
	uint64_t t0 = now_ns();

	if (!s->pool && cp_snap_reserve(s, pool_size))
		fail(s, -ENOMEM, 0);
	long nbufs = s->pool ? s->pool_size / s->chunk : 0;

	s->bufs = calloc(nbufs ? nbufs : 1, sizeof(*s->bufs));
	/* Room for every chunk: the disk is written once the copy is done, so the copy has
	 * the CPU to itself while the tasks wait for it. Else a writer drains as it goes. */
	int defer_writes = nbufs >= atomic_load(&s->left);

	if (!s->pool || !s->bufs) {
		fail(s, -ENOMEM, 0);
	} else {
		for (long i = 0; i < nbufs; i++) {
			s->bufs[i].p = s->pool + i * s->chunk;
			put_free(s, &s->bufs[i]);
		}
		if (!defer_writes) {
			if (pthread_create(&s->writer_thr, NULL, writer, s))
				fail(s, -EAGAIN, 0);
			else
				s->writer_started = 1;
		}
	}
	long ti = 0, ci = 0;

	while (atomic_load(&s->left) > 0) {
		long ht = atomic_exchange(&s->hint_t, -1);

		if (ht >= 0) {
			ti = ht;
			ci = atomic_load(&s->hint_c);
		}
		/* the next chunk still to copy, from (ti, ci) on, wrapping around */
		long tries = 0, found = 0;

		while (tries < s->nt + 1 && !found) {
			struct target *t = &s->t[ti];

			for (; ci < t->nchunks; ci++) {
				int todo = TODO;

				if (atomic_load(&t->chunks[ci].state) != TODO)
					continue;
				if (!atomic_compare_exchange_strong(&t->chunks[ci].state, &todo, BUSY))
					continue;
				if (s->error)		/* give up copying, but lift the protection */
					wp_range(t->uffd, t->chunks[ci].addr, t->chunks[ci].len, 0),
					atomic_store(&t->chunks[ci].state, DONE),
					atomic_fetch_sub(&s->left, 1);
				else
					copy_chunk(s, t, &t->chunks[ci], 0);
				found = 1;
				ci++;
				break;
			}
			if (!found) {
				ti = (ti + 1) % (s->nt ? s->nt : 1);
				ci = 0;
				tries++;
			}
		}
		if (!found) {
			/* the last chunks are with the fault thread */
			struct timespec ts = { 0, 100000 };

			nanosleep(&ts, NULL);
		}
	}
	cp_snap_stop(s);
	s->st.copy_ns = now_ns() - t0;
	pthread_mutex_lock(&s->mu);
	s->writer_stop = 1;
	pthread_cond_signal(&s->cv_full);
	pthread_mutex_unlock(&s->mu);
	if (s->writer_started) {
		pthread_join(s->writer_thr, NULL);
		s->writer_started = 0;
	} else if (s->pool) {
		writer(s);			/* what was kept for after the copy */
	}
	s->st.bytes = s->bytes;
	s->st.faults = s->faults;
	s->st.fault_copies = s->fault_copies;
	s->st.pre_unprotects = s->pre_unprotects;
	if (out)
		*out = s->st;
	return s->error;
}

/* Stop the fault thread (also when the snapshot is abandoned: the caller then closes
 * the uffds, which lets every waiting task go). */
void cp_snap_stop(struct cp_snap *s)
{
	if (s->fault_started) {
		uint64_t one = 1;

		if (write(s->stop_fd, &one, sizeof(one)) != sizeof(one))
			fail(s, -EIO, 0);
		pthread_join(s->fault_thr, NULL);
		s->fault_started = 0;
	}
}

void cp_snap_free(struct cp_snap *s)
{
	if (!s)
		return;
	cp_snap_stop(s);
	for (long i = 0; s->t && i < s->nt; i++) {
		free(s->t[i].vmas);
		free(s->t[i].chunks);
	}
	free(s->t);
	free(s->bufs);
	if (s->pool)
		munmap(s->pool, s->pool_size);
	if (s->stop_fd >= 0)
		close(s->stop_fd);
	pthread_mutex_destroy(&s->mu);
	pthread_cond_destroy(&s->cv_free);
	pthread_cond_destroy(&s->cv_full);
	free(s);
}

/* Frozen: the (start, end, flag) triples of cp_track_scan for a registered VMA (flag 0:
 * not protected) -> protect those, and clear the flags (every page is data). */
long cp_snap_refresh(struct cp_snap *s, long i, uint64_t *t, long n)
{
	for (long k = 0; k < n; k++) {
		if (!t[3 * k + 2]) {
			long r = wp_range(s->t[i].uffd, t[3 * k], t[3 * k + 1] - t[3 * k], 1);

			if (r)
				return r;
		}
		t[3 * k + 2] = 0;
	}
	return 0;
}
