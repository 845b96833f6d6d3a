/* `dump --page-server`'s data path: a process's pagemap entries and their pages go to a
 * page server over TCP (criu_py/pageserver/__init__.py has the protocol). Reading a
 * page (process_vm_readv, and the CRC of each 4 KiB block for the criu-py extension)
 * and sending it are of the same cost, so they overlap: this thread reads into one of
 * two buffers while a second thread sends the other (header, data and CRCs in one
 * sendmsg). Python hands over a whole pagemap at once; the entries without data
 * (PE_PARENT, PE_LAZY alone) travel as bare headers in the same order. */
#define _GNU_SOURCE
#include "sys.h"
#include "pagexfer.h"
#include "digest.h"
#include "handover.h"
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <fcntl.h>
#include <poll.h>

#define PAGE 4096ul
#define PS_IOV_ADD_F 6u
#define PS_CMD_SHIFT 16

struct ps_header {		/* upstream's struct page_server_iov */
	uint32_t cmd;
	uint32_t pad;
	uint64_t nr_pages, vaddr, dst_id;
};

struct ps_slot {
	struct ps_header hdr;
	char *data;
	uint32_t *crcs;
	unsigned long len;	/* data bytes (0 for a bare header) */
	int full;
};

struct ps_ring {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct ps_slot slot[2];
	int sock, send_crcs, done, err;
};

/* sendmsg until every byte of iov[0..n) is out (the iovecs are consumed). */
static long send_all(int sock, struct iovec *iov, int n)
{
	while (n > 0) {
		struct msghdr m = { .msg_iov = iov, .msg_iovlen = n };
		long w = sendmsg(sock, &m, MSG_NOSIGNAL);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		while (n > 0 && (unsigned long)w >= iov->iov_len) {
			w -= iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= w;
		}
	}
	return 0;
}

static void *ps_sender(void *arg)
{
	struct ps_ring *r = arg;

	for (int i = 0;; i ^= 1) {
		struct ps_slot *s = &r->slot[i];
		struct iovec iov[3];
		int n = 1;

		pthread_mutex_lock(&r->lock);
		while (!s->full && !r->done && !r->err)
			pthread_cond_wait(&r->cond, &r->lock);
		int go = s->full && !r->err;
		pthread_mutex_unlock(&r->lock);
		if (!go)
			return NULL;	/* finished, or the reader failed */
		iov[0] = (struct iovec){ &s->hdr, sizeof(s->hdr) };
		if (s->len) {
			iov[n++] = (struct iovec){ s->data, s->len };
			if (r->send_crcs)
				iov[n++] = (struct iovec){ s->crcs, s->len / PAGE * 4 };
		}
		long w = send_all(r->sock, iov, n);
		pthread_mutex_lock(&r->lock);
		if (w < 0 && !r->err)
			r->err = (int)w;
		s->full = 0;
		pthread_cond_broadcast(&r->cond);
		pthread_mutex_unlock(&r->lock);
		if (w < 0)
			return NULL;
	}
}

/* Wait until slot i is free; 0, or the sender's error. */
static int wait_free(struct ps_ring *r, int i)
{
	int err;

	pthread_mutex_lock(&r->lock);
	while (r->slot[i].full && !r->err)
		pthread_cond_wait(&r->cond, &r->lock);
	err = r->err;
	pthread_mutex_unlock(&r->lock);
	return err;
}

static void hand_over(struct ps_ring *r, int i)
{
	pthread_mutex_lock(&r->lock);
	r->slot[i].full = 1;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
}

long cp_ps_send_pages(int pid, int sock, const struct cp_ps_entry *ents, long nents,
		      uint32_t present, uint32_t data_flags, int send_crcs, void *bufs,
		      unsigned long bufsize, void *crc_bufs)
{
	struct ps_ring r = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER };
	pthread_t sender;
	long total = 0, err = 0;
	int i = 0;

	if (bufsize % PAGE || !bufsize)
		return -EINVAL;
	r.sock = sock;
	r.send_crcs = send_crcs;
	for (int k = 0; k < 2; k++) {
		r.slot[k].data = (char *)bufs + k * bufsize;
		r.slot[k].crcs = (uint32_t *)crc_bufs + k * (bufsize / PAGE);
	}
	if (pthread_create(&sender, NULL, ps_sender, &r) != 0)
		return -EAGAIN;
	for (long k = 0; k < nents && !err; k++) {
		uint64_t addr = ents[k].start, end = ents[k].end;
		uint32_t flags = (uint32_t)ents[k].flags;

		if (addr % PAGE || end % PAGE || end < addr) {
			err = -EINVAL;
			break;
		}
		if (addr == end)
			continue;
		do {
			struct ps_slot *s = &r.slot[i];
			unsigned long n = 0;

			err = wait_free(&r, i);
			if (err)
				break;
			if (flags & present) {
				n = end - addr < bufsize ? end - addr : bufsize;
				struct iovec l = { s->data, n }, rem = { (void *)addr, n };
				long got = syscall(SYS_process_vm_readv, pid, &l, 1UL, &rem, 1UL, 0UL);
				if (got < 0 || (unsigned long)got != n) {
					err = got < 0 ? -errno : -EFAULT;
					break;
				}
				if (send_crcs)
					cp_crc_blocks(s->data, n, s->crcs);
				s->hdr = (struct ps_header){ (flags | data_flags) << PS_CMD_SHIFT | PS_IOV_ADD_F,
							     0, n / PAGE, addr, 0 };
			} else {
				s->hdr = (struct ps_header){ flags << PS_CMD_SHIFT | PS_IOV_ADD_F, 0,
							     (end - addr) / PAGE, addr, 0 };
				addr = end;
			}
			s->len = n;
			hand_over(&r, i);
			addr += n;
			total += n;
			i ^= 1;
		} while (addr < end);
	}
	return cp_handover_end(&r.lock, &r.cond, &r.done, &r.err, err, sender, total);
}

/* The page server's side: n bytes of data from the socket into the file at its offset,
 * through a pipe (socket -> pipe -> file: the data never comes up to user space).
 * Returns n, -ECONNRESET when the peer hangs up first, or -errno. */
long cp_ps_recv_to_file(int sock, int pipe_r, int pipe_w, int fd, unsigned long n,
			unsigned long pipe_size)
{
	unsigned long left = n;

	while (left) {
		long k = splice(sock, NULL, pipe_w, NULL, left < pipe_size ? left : pipe_size,
				SPLICE_F_MOVE);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return -errno;
		if (k == 0)
			return -ECONNRESET;
		left -= k;
		while (k > 0) {
			long w = splice(pipe_r, NULL, fd, NULL, k, SPLICE_F_MOVE);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0)
				return w < 0 ? -errno : -EIO;
			k -= w;
		}
	}
	return n;
}

/* Drain what is left in the pipe (after a failure: the task's vmsplice must not find
 * its reader gone), until its writer closes it or *stop is set. */
static void drain(int pipe_r, void *buf, unsigned long size, volatile int *stop)
{
	while (!*stop) {
		struct pollfd p = { pipe_r, POLLIN, 0 };
		if (poll(&p, 1, 50) <= 0)
			continue;
		long k = read(pipe_r, buf, size);
		if (k == 0 || (k < 0 && errno != EINTR && errno != EAGAIN))
			return;
	}
}

/* One chunk of a present entry flagged CP_PS_COPY: read now with process_vm_readv into
 * buf, its CRCs computed here, header, data and (with digests) CRCs sent. */
static long send_copied(int pid, int sock, uint64_t addr, unsigned long n, uint32_t wire,
			int digests, uint32_t *crcs, void *buf)
{
	struct iovec l = { buf, n }, rem = { (void *)addr, n };
	long got = syscall(SYS_process_vm_readv, pid, &l, 1UL, &rem, 1UL, 0UL);

	if (got < 0 || (unsigned long)got != n)
		return got < 0 ? -errno : -EFAULT;
	struct ps_header hdr = { wire << PS_CMD_SHIFT | PS_IOV_ADD_F, 0, n / PAGE, addr, 0 };
	struct iovec iov[3] = { { &hdr, sizeof(hdr) }, { buf, n }, { crcs, n / PAGE * 4 } };
	if (digests)
		cp_crc_blocks(buf, n, crcs);
	return send_all(sock, iov, digests ? 3 : 2);
}

/* The same session as cp_ps_send_pages, but the data of the present entries is in the
 * pipe pipe_r reads, in entry order (the task itself vmsplices its pages there,
 * dump/parasite.py), and goes from the pipe to the socket without a copy. With
 * crc_remote, the task has also put the CRC of each 4 KiB block there (u32 each, one
 * after the other over all the data), each chunk's before its data: they are read
 * from it once the data is through (crcs: room for chunk / 4096). Entries flagged
 * CP_PS_COPY are not in the pipe: pages the kernel itself may still write while the
 * task runs its blob (a thread's rseq area: the CPU it resumes on), read and summed
 * here instead, so that what is sent and its CRCs agree. buf (bufsize >= chunk bytes)
 * is for those and for draining. Returns the data bytes sent or -errno; either way the
 * pipe is read until its writer closes it (or the caller sets *stop, when it could not
 * close it). */
long cp_ps_splice_pages(int pid, int sock, int pipe_r, const struct cp_ps_entry *ents,
			long nents, uint32_t present, uint32_t data_flags, uint64_t crc_remote,
			uint32_t *crcs, unsigned long chunk, void *buf, unsigned long bufsize,
			volatile int *stop)
{
	long total = 0, err = 0, spliced = 0;

	if (chunk % PAGE || !chunk || bufsize < chunk)
		return -EINVAL;
	for (long k = 0; k < nents && !err; k++) {
		uint64_t addr = ents[k].start, end = ents[k].end;
		uint32_t flags = (uint32_t)ents[k].flags;
		struct ps_header hdr;
		struct iovec iov[1];

		if (addr % PAGE || end % PAGE || end < addr) {
			err = -EINVAL;
			break;
		}
		if ((flags & present) && (ents[k].flags & CP_PS_COPY)) {
			while (addr < end && !err) {
				unsigned long n = end - addr < chunk ? end - addr : chunk;
				err = send_copied(pid, sock, addr, n, flags | data_flags, crc_remote != 0,
						  crcs, buf);
				addr += n;
				total += n;
			}
			continue;
		}
		if (!(flags & present)) {
			hdr = (struct ps_header){ flags << PS_CMD_SHIFT | PS_IOV_ADD_F, 0,
						  (end - addr) / PAGE, addr, 0 };
			iov[0] = (struct iovec){ &hdr, sizeof(hdr) };
			err = send_all(sock, iov, 1);
			continue;
		}
		while (addr < end && !err) {
			unsigned long n = end - addr < chunk ? end - addr : chunk;

			hdr = (struct ps_header){ (flags | data_flags) << PS_CMD_SHIFT | PS_IOV_ADD_F,
						  0, n / PAGE, addr, 0 };
			iov[0] = (struct iovec){ &hdr, sizeof(hdr) };
			struct msghdr m = { .msg_iov = iov, .msg_iovlen = 1 };
			long w;
			do {
				w = sendmsg(sock, &m, MSG_NOSIGNAL | MSG_MORE);
			} while (w < 0 && errno == EINTR);
			if (w != sizeof(hdr)) {
				if (w >= 0) {
					iov[0].iov_base = (char *)iov[0].iov_base + w;
					iov[0].iov_len -= w;
					err = send_all(sock, iov, 1);
				} else {
					err = -errno;
				}
				if (err)
					break;
			}
			for (unsigned long left = n; left && !err;) {
				long s = splice(pipe_r, NULL, sock, NULL, left,
						SPLICE_F_MOVE | SPLICE_F_MORE);
				if (s < 0 && errno == EINTR)
					continue;
				if (s <= 0)
					err = s < 0 ? -errno : -EPIPE;	/* 0: the task stopped writing */
				else
					left -= s;
			}
			if (!err && crc_remote) {
				unsigned long m = n / PAGE * 4;
				struct iovec l = { crcs, m }, rem = { (void *)(crc_remote + spliced / PAGE * 4), m };
				long got = syscall(SYS_process_vm_readv, pid, &l, 1UL, &rem, 1UL, 0UL);
				if (got < 0 || (unsigned long)got != m)
					err = got < 0 ? -errno : -EFAULT;
				iov[0] = (struct iovec){ crcs, m };
				if (!err)
					err = send_all(sock, iov, 1);
			}
			addr += n;
			total += n;
			spliced += n;
		}
	}
	drain(pipe_r, buf, bufsize, stop);
	return err ? err : total;
}
