/* The PIE restorer: the last stage of a restore, which no Python can run because it
 * unmaps the interpreter. It is freestanding: raw syscalls, no libc, no static data, no
 * string literals, no calls outside its own section "criu_pie", so that the bytes
 * [__start_criu_pie, __stop_criu_pie) can be copied anywhere and run there
 * (tests/test_pie_restorer.py checks the built module for this).
 *
 * It is entered on its own stack inside the restorer region with a struct pie_args
 * (csrc/pie_restorer.h) built by criu_py/restore/pie.py. The leader
 *   unregisters glibc's rseq, unmaps everything but the region, the premapped VMAs and
 *   the shared sync page, moves the premapped (copy-on-write shared) VMAs into place,
 *   maps the other dumped VMAs, reads page contents straight into place (with much to
 *   read, half of it in a short-lived helper thread; a lazy restore then registers the
 *   lazy ranges with its userfaultfd), places every
 *   thread's sigframe on that thread's stack, sets madvise advice and final
 *   protections, puts the vdso back at the dumped address, restores signal actions, mm
 *   fields (PR_SET_MM_MAP) and the process's pending signals, closes the helper fds and
 *   creates the other threads with their TIDs (clone3 + set_tid).
 * Then every thread, the leader included, sets up its own state (clear_child_tid,
 * robust list, rseq, scheduling, name, pending signals, credentials last, fs/gs base),
 * counts itself ready, and waits on the sync page until the restore command lets the
 * whole tree go; it then rt_sigreturns into the task (after an int3 when the restore
 * command traces it, so the region can be unmapped first: criu_py/restore/tracer.py). */
#pragma GCC optimize("no-tree-loop-distribute-patterns", "no-tree-vectorize")
#include <stdint.h>
#include "pie_restorer.h"

#define PIE static __attribute__((section("criu_pie"), used, noinline))
#define PIE_ENTRY __attribute__((section("criu_pie"), used, noinline, visibility("hidden")))
#define PIE_INLINE static inline __attribute__((section("criu_pie"), always_inline))

#define NR_write 1
#define NR_close 3
#define NR_mmap 9
#define NR_mprotect 10
#define NR_munmap 11
#define NR_rt_sigaction 13
#define NR_mremap 25
#define NR_madvise 28
#define NR_rt_sigqueueinfo 129
#define NR_setpriority 141
#define NR_sched_setscheduler 144
#define NR_setgroups 116
#define NR_setresuid 117
#define NR_setresgid 119
#define NR_setfsuid 122
#define NR_setfsgid 123
#define NR_capset 126
#define NR_prctl 157
#define NR_arch_prctl 158
#define NR_futex 202
#define NR_set_tid_address 218
#define NR_exit_group 231
#define NR_set_robust_list 273
#define NR_preadv 295
#define NR_rt_tgsigqueueinfo 297
#define NR_rseq 334
#define NR_clone3 435
#define NR_dup3 292
#define NR_fchdir 81
#define NR_chroot 161
#define NR_umask 95
#define NR_setsid 112
#define NR_setpgid 109
#define NR_personality 135
#define NR_prlimit64 302
#define NR_setitimer 38
#define NR_fcntl 72
#define NR_shmat 30
#define SHM_RDONLY_ 010000
#define SHM_REMAP_ 040000
#define SHM_EXEC_ 0100000
#define PROT_READ_ 1
#define PROT_WRITE_ 2
#define PROT_EXEC_ 4
#define NR_ioctl 16
#define UFFDIO_REGISTER_ 0xC020AA00UL
#define UFFDIO_REGISTER_MODE_MISSING_ 1
#define NR_timer_create 222
#define NR_timer_settime 223
#define NR_timer_delete 226
#define NR_clock_gettime 228
#define NR_timerfd_settime 286
#define F_SETLK_ 6
#define PR_TIMER_CREATE_RESTORE_IDS_ 77
#define TFD_TIMER_ABSTIME_ 1
#define TFD_IOC_SET_TICKS_ 0x40085400
#define EINVAL_ 22
#define NSEC_ 1000000000LL
#define O_CLOEXEC_ 02000000
#define SIGCHLD_ 17

#define MAP_PRIVATE_ 0x02
#define MAP_FIXED_ 0x10
#define MAP_ANONYMOUS_ 0x20
#define MAP_LOCKED_ 0x2000
#define NR_mlock 149
#define MREMAP_MAYMOVE_ 1
#define MREMAP_FIXED_ 2
#define ARCH_SET_GS_ 0x1001
#define ARCH_SET_FS_ 0x1002
#define ARCH_MAP_VDSO_64_ 0x2003
#define PR_SET_PDEATHSIG_ 1
#define PR_SET_DUMPABLE_ 4
#define PR_SET_NAME_ 15
#define PR_CAPBSET_DROP_ 24
#define PR_SET_SECUREBITS_ 28
#define PR_SET_MM_ 35
#define PR_SET_MM_MAP_ 14
#define PR_SET_NO_NEW_PRIVS_ 38
#define PR_CAP_AMBIENT_ 47
#define PR_CAP_AMBIENT_RAISE_ 2
#define SECBIT_NO_SETUID_FIXUP_ (1 << 2)
#define CAP_VERSION_3_ 0x20080522
#define RSEQ_FLAG_UNREGISTER_ 1
#define IOV_BATCH 1024
#define MADV_POPULATE_WRITE_ 23
#define EINTR_ 4
#define EAGAIN_ 11
#define FUTEX_WAIT_ 0
#define FUTEX_WAKE_ 1
#define FUTEX_PRIVATE_ 128
#define SIGINFO_SIZE 128
#define CLONE_THREAD_FLAGS_ (0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000)
	/* CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM */

struct clone_args_ {
	uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
	uint64_t set_tid, set_tid_size, cgroup;
};

PIE_INLINE long sys6(long nr, long a, long b, long c, long d, long e, long f)
{
	register long r10 asm("r10") = d;
	register long r8 asm("r8") = e;
	register long r9 asm("r9") = f;
	long ret;
	asm volatile("syscall"
		     : "=a"(ret)
		     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
		     : "rcx", "r11", "memory");
	return ret;
}

PIE_INLINE long sys3(long nr, long a, long b, long c)
{
	return sys6(nr, a, b, c, 0, 0, 0);
}

PIE_INLINE uint32_t atomic_load32(uint32_t *p)
{
	return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

/* Tell the restore parent how far we got. */
PIE void pie_report(struct pie_args *a, int stage, long ret, uint64_t arg)
{
	struct pie_status st;

	st.magic = PIE_STATUS_MAGIC;
	st.stage = stage;
	st.ret = ret;
	st.arg = arg;
	st.pid = a->tgid;
	st.pad = 0;
	if (a->status_fd >= 0)
		sys3(NR_write, a->status_fd, (long)&st, sizeof(st));
}

/* A failure ends the task here; with a sync page, the first failure of the whole
 * restore is recorded there and every other task is told to give up. */
PIE __attribute__((noreturn)) void pie_fail(struct pie_args *a, int stage, long ret, uint64_t arg)
{
	struct pie_sync *s = (struct pie_sync *)a->sync;
	int32_t none = 0;

	pie_report(a, stage, ret, arg);
	if (s) {
		if (__atomic_compare_exchange_n(&s->err_stage, &none, stage, 0,
						__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
			s->err_ret = ret;
			s->err_arg = arg;
			s->err_tid = a->tgid;
		}
		__atomic_store_n(&s->stage, PIE_SYNC_ERROR, __ATOMIC_SEQ_CST);
		sys6(NR_futex, (long)&s->stage, FUTEX_WAKE_, 0x7fffffff, 0, 0, 0);
	}
	for (;;)
		sys3(NR_exit_group, 127, 0, 0);
}

/* Everything goes but the region, the premapped VMAs and the sync page: the
 * interpreter, its libraries, its stack, the vdso. */
PIE void pie_unmap_all(struct pie_args *a)
{
	uint64_t keep[6], n = 0, i, j, prev = 0;
	long r;

	keep[n++] = a->keep_start;
	keep[n++] = a->keep_end;
	if (a->premap_end > a->premap_start) {
		keep[n++] = a->premap_start;
		keep[n++] = a->premap_end;
	}
	if (a->sync) {
		keep[n++] = a->sync;
		keep[n++] = a->sync + a->sync_len;
	}
	/* sort the (start, end) pairs by start */
	for (i = 2; i < n; i += 2)
		for (j = i; j >= 2 && keep[j - 2] > keep[j]; j -= 2) {
			uint64_t s = keep[j], e = keep[j + 1];

			keep[j] = keep[j - 2];
			keep[j + 1] = keep[j - 1];
			keep[j - 2] = s;
			keep[j - 1] = e;
		}
	for (i = 0; i <= n; i += 2) {
		uint64_t end = i < n ? keep[i] : a->task_size;

		if (end > prev) {
			r = sys3(NR_munmap, prev, end - prev, 0);
			if (r < 0)
				pie_fail(a, PIE_STAGE_UNMAP, r, prev);
		}
		if (i < n)
			prev = keep[i + 1];
	}
}

/* The premapped VMAs (filled before the fork, shared copy-on-write with the parent or
 * the children) move into place first: their area never overlaps the final layout. */
PIE void pie_remap_premapped(struct pie_args *a)
{
	struct pie_vma *v = (struct pie_vma *)a->vmas;
	uint64_t i;
	long r;

	for (i = 0; i < a->nr_vmas; i++, v++) {
		uint64_t len = v->end - v->start;

		if (v->kind != PIE_VMA_PREMAPPED)
			continue;
		r = sys6(NR_mremap, v->src, len, len, MREMAP_MAYMOVE_ | MREMAP_FIXED_, v->start, 0);
		if (r != (long)v->start)
			pie_fail(a, PIE_STAGE_REMAP_VMA, r, v->start);
	}
}

/* Map every other VMA; those that get pages are writable first, final protection later. */
PIE void pie_map_vmas(struct pie_args *a)
{
	struct pie_vma *v = (struct pie_vma *)a->vmas;
	uint64_t i;
	long r;

	for (i = 0; i < a->nr_vmas; i++, v++) {
		uint64_t len = v->end - v->start;

		if (v->kind == PIE_VMA_PREMAPPED)
			continue;
		/* locked only once filled (pie_protect_vmas): mapped locked, it would be
		 * populated with empty pages first */
		if (v->kind == PIE_VMA_SYSVSHM)
			r = sys3(NR_shmat, v->fd, v->start, SHM_REMAP_ |
				 (v->map_prot & PROT_WRITE_ ? 0 : SHM_RDONLY_) |
				 (v->map_prot & PROT_EXEC_ ? SHM_EXEC_ : 0));
		else if (v->kind == PIE_VMA_FILE)
			r = sys6(NR_mmap, v->start, len, v->map_prot,
				 (v->flags & ~MAP_LOCKED_) | MAP_FIXED_, v->fd, v->pgoff);
		else
			r = sys6(NR_mmap, v->start, len, v->map_prot,
				 (v->flags & ~MAP_LOCKED_) | MAP_FIXED_ | MAP_ANONYMOUS_, -1, 0);
		if (r != (long)v->start)
			pie_fail(a, PIE_STAGE_MAP_VMA, r, v->start);
	}
}

PIE void pie_wait_while(uint32_t *word, uint32_t val, int private_);

/* clone3 with *ca into ret; the child starts on ca's stack in entry(arg0, arg1), which
 * never returns (r12 and r13 survive the syscall in the child). A macro: the call must be
 * direct, so the entry is an immediate. */
#define PIE_CLONE3_CALL(ret, ca, entry, arg0, arg1) do {				\
	register long r12_ asm("r12") = (long)(arg0);					\
	register long r13_ asm("r13") = (long)(arg1);					\
	asm volatile("syscall\n\t"							\
		     "test %%rax, %%rax\n\t"						\
		     "jnz 1f\n\t"							\
		     "xor %%ebp, %%ebp\n\t"						\
		     "mov %%r12, %%rdi\n\t"						\
		     "mov %%r13, %%rsi\n\t"						\
		     "call %P[e]\n\t"							\
		     "ud2\n"								\
		     "1:"								\
		     : "=a"(ret)							\
		     : "a"(NR_clone3), "D"(ca), "S"(sizeof(*(ca))), "r"(r12_), "r"(r13_),	\
		       [e] "i"(entry)							\
		     : "rcx", "r11", "memory");						\
} while (0)

#define FILL_BATCH 64		/* iovecs per preadv (a copy on the stack) */
#define FILL_STACK (64 * 1024)	/* the fill helper's own stack, mapped for it */
#define CLONE_CHILD_CLEARTID_ 0x00200000
#define NR_exit 60

/* preadv `n` file-contiguous iovecs at file offset `off`, to the end (a short read
 * advances the local copy). */
PIE void pie_preadv_all(struct pie_args *a, int fd, struct pie_iovec *iov, uint64_t n,
			uint64_t off)
{
	while (n) {
		long r = sys6(NR_preadv, fd, (long)iov, n, off, 0, 0);

		if (r == -EINTR_ || r == -EAGAIN_)
			continue;
		if (r <= 0)
			pie_fail(a, PIE_STAGE_READ_PAGES, r ? r : -5, off);
		off += r;
		while (n && (uint64_t)r >= iov->len) {
			r -= iov->len;
			iov++;
			n--;
		}
		if (r) {
			iov->base += r;
			iov->len -= r;
		}
	}
}

/* Bytes [lo, hi) of one pages file's stream (its iovecs in file order; an iovec with
 * base 0 stands for bytes restored another way): fault the destination in with one
 * madvise per run (populate), or preadv them into place. */
PIE void pie_fill_range(struct pie_args *a, struct pie_page_src *src, uint64_t lo,
			uint64_t hi, int populate)
{
	struct pie_iovec *iov = (struct pie_iovec *)src->iovs;
	struct pie_iovec batch[FILL_BATCH];
	uint64_t pos = 0, i, nb = 0, boff = 0;

	for (i = 0; i < src->nr_iovs && pos < hi; pos += iov[i].len, i++) {
		uint64_t s = pos > lo ? pos : lo;
		uint64_t e = pos + iov[i].len < hi ? pos + iov[i].len : hi;

		if (s >= e)
			continue;
		if (!iov[i].base || nb == FILL_BATCH) {
			if (nb)
				pie_preadv_all(a, src->fd, batch, nb, boff);
			nb = 0;
			if (!iov[i].base)
				continue;
		}
		if (populate) {
			sys3(NR_madvise, iov[i].base + (s - pos), e - s, MADV_POPULATE_WRITE_);
			continue;
		}
		if (!nb)
			boff = src->off + s;
		batch[nb].base = iov[i].base + (s - pos);
		batch[nb].len = e - s;
		nb++;
	}
	if (nb)
		pie_preadv_all(a, src->fd, batch, nb, boff);
}

/* Part p of n of every source (its share of each file's bytes, cut at a page): first
 * the destination faulted in (one call per run: far cheaper than a page fault per
 * 4 KiB inside the copy), then the copy. */
PIE void pie_fill_part(struct pie_args *a, uint64_t p, uint64_t n)
{
	struct pie_page_src *src = (struct pie_page_src *)a->page_srcs;
	uint64_t i, j;
	int pass;

	for (pass = 1; pass >= 0; pass--)
		for (i = 0; i < a->nr_page_srcs; i++) {
			struct pie_iovec *iov = (struct pie_iovec *)src[i].iovs;
			uint64_t total = 0, lo, hi;

			for (j = 0; j < src[i].nr_iovs; j++)
				total += iov[j].len;
			lo = (total / n * p) & ~4095ULL;
			hi = p + 1 == n ? total : (total / n * (p + 1)) & ~4095ULL;
			pie_fill_range(a, &src[i], lo, hi, pass);
		}
}

struct pie_fill_job {
	struct pie_args *a;
	uint32_t tid;		/* cleared by the kernel (and woken) when the helper exits */
};

PIE __attribute__((noreturn, used)) void pie_fill_entry(struct pie_fill_job *job)
{
	pie_fill_part(job->a, 1, 2);
	for (;;)
		sys3(NR_exit, 0, 0, 0);
}

/* The helper thread: a plain thread of this task on its own mapped stack, starting in
 * pie_fill_entry; its TID, or -errno if it was not made. */
PIE long pie_clone_filler(struct pie_fill_job *job, uint64_t stack)
{
	struct clone_args_ ca;
	long ret;

	ca.flags = CLONE_THREAD_FLAGS_ | CLONE_CHILD_CLEARTID_;
	ca.pidfd = ca.parent_tid = ca.exit_signal = ca.tls = ca.cgroup = 0;
	ca.child_tid = (uint64_t)&job->tid;
	ca.stack = stack;
	ca.stack_size = FILL_STACK;
	ca.set_tid = ca.set_tid_size = 0;
	PIE_CLONE3_CALL(ret, &ca, pie_fill_entry, job, 0);
	return ret;
}

/* The pages of every source (the dump's own pages file, then its parents'): with
 * fill_parts 2, half of each in a helper thread meanwhile (when it cannot be made,
 * all of it here). */
PIE void pie_read_pages(struct pie_args *a)
{
	struct pie_fill_job job;
	long stack, r;

	if (a->fill_parts < 2) {
		pie_fill_part(a, 0, 1);
		return;
	}
	stack = sys6(NR_mmap, 0, FILL_STACK, PROT_READ_ | PROT_WRITE_,
		     MAP_PRIVATE_ | MAP_ANONYMOUS_, -1, 0);
	if (stack < 0 && stack > -4096) {
		pie_fill_part(a, 0, 1);
		return;
	}
	job.a = a;
	job.tid = 1;
	r = pie_clone_filler(&job, stack);
	if (r < 0) {
		sys3(NR_munmap, stack, FILL_STACK, 0);
		pie_fill_part(a, 0, 1);
		return;
	}
	pie_fill_part(a, 0, 2);
	pie_wait_while(&job.tid, 1, 0);	/* the kernel's wake at its exit is a shared one */
	sys3(NR_munmap, stack, FILL_STACK, 0);
}

/* Lazy restore: the lazy ranges are mapped and still empty (nothing above touched
 * them); from here on, a missing page there is a fault the lazy-pages daemon answers
 * (it holds the uffd already, so even a kernel access, such as rseq's cpu_id update on
 * the way back from a syscall, waits for the page rather than seeing zeros). */
PIE void pie_register_lazy(struct pie_args *a)
{
	struct pie_iovec *r = (struct pie_iovec *)a->lazy;
	struct { uint64_t start, len, mode, ioctls; } reg;
	uint64_t i;
	long ret;

	if (a->uffd < 0)
		return;
	for (i = 0; i < a->nr_lazy; i++) {
		reg.start = r[i].base;
		reg.len = r[i].len;
		reg.mode = UFFDIO_REGISTER_MODE_MISSING_;
		reg.ioctls = 0;
		ret = sys3(NR_ioctl, a->uffd, UFFDIO_REGISTER_, (long)&reg);
		if (ret < 0)
			pie_fail(a, PIE_STAGE_UFFD, ret, r[i].base);
	}
}

/* Word copies of the sigframes onto the threads' stacks (no memcpy outside the section). */
PIE void pie_place_sigframes(struct pie_args *a)
{
	struct pie_thread *t = (struct pie_thread *)a->threads;
	uint64_t i, w;

	for (i = 0; i < a->nr_threads; i++, t++) {
		uint64_t *dst = (uint64_t *)t->sigframe;
		const uint64_t *src = (const uint64_t *)t->sigframe_src;

		if (!t->sigframe_src)
			continue;
		for (w = 0; w < (t->sigframe_len + 7) / 8; w++)
			dst[w] = src[w];
	}
}

PIE void pie_protect_vmas(struct pie_args *a)
{
	struct pie_vma *v = (struct pie_vma *)a->vmas;
	uint64_t i;
	long r;
	int n;

	for (i = 0; i < a->nr_vmas; i++, v++) {
		/* Advice (MADV_DONTFORK, MADV_HUGEPAGE, ...) is best effort: a kernel without
		 * KSM refuses MADV_MERGEABLE, and that must not fail the restore. */
		for (n = 0; n < 64; n++)
			if (v->madv & (1ULL << n))
				sys3(NR_madvise, v->start, v->end - v->start, n);
		if (v->prot != v->map_prot) {
			r = sys3(NR_mprotect, v->start, v->end - v->start, v->prot);
			if (r < 0)
				pie_fail(a, PIE_STAGE_MPROTECT, r, v->start);
		}
		if (v->flags & MAP_LOCKED_) {
			r = sys3(NR_mlock, v->start, v->end - v->start, 0);
			if (r < 0)
				pie_fail(a, PIE_STAGE_MPROTECT, r, v->start);
		}
	}
}

PIE void pie_restore_sigactions(struct pie_args *a)
{
	struct pie_sigaction *act = (struct pie_sigaction *)a->sigactions;
	int sig;
	long r;

	for (sig = 1; sig <= 64; sig++) {
		if (!(a->sigaction_mask & (1ULL << (sig - 1))))
			continue;
		r = sys6(NR_rt_sigaction, sig, (long)&act[sig - 1], 0, 8, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_SIGACTION, r, sig);
	}
}

/* Queue siginfos back: to the process (tid 0) or to one thread. All signals are
 * blocked here, so they wait, pending, for the task's own mask. */
PIE void pie_queue_signals(struct pie_args *a, uint64_t infos, uint64_t nr, int tid)
{
	uint64_t i;
	long r;

	for (i = 0; i < nr; i++) {
		const int32_t *info = (const int32_t *)(infos + i * SIGINFO_SIZE);

		if (tid)
			r = sys6(NR_rt_tgsigqueueinfo, a->tgid, tid, info[0], (long)info, 0, 0);
		else
			r = sys3(NR_rt_sigqueueinfo, a->tgid, info[0], (long)info);
		if (r < 0)
			pie_fail(a, PIE_STAGE_SIGNALS, r, info[0]);
	}
}

PIE void pie_close_fds(struct pie_args *a)
{
	int32_t *fds = (int32_t *)a->close_fds;
	uint64_t i;

	for (i = 0; i < a->nr_close_fds; i++)
		sys3(NR_close, fds[i], 0, 0);
}

/* The thread's credentials, in the order that keeps the rights each step needs:
 * groups, ids (with SECBIT_NO_SETUID_FIXUP so the capabilities survive them),
 * securebits, the bounding set, the capability sets, ambient capabilities, and
 * no_new_privs last. */
PIE void pie_restore_creds(struct pie_args *a, struct pie_creds *c)
{
	struct { uint32_t version; int32_t pid; } hdr;
	struct { uint32_t eff, prm, inh; } data[2];
	uint32_t cap;
	long r;
	int i;

	if (!c->set)
		return;
	r = sys3(NR_setgroups, c->nr_groups, c->groups, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_CREDS, r, 1);
	r = sys6(NR_prctl, PR_SET_SECUREBITS_, SECBIT_NO_SETUID_FIXUP_, 0, 0, 0, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_CREDS, r, 2);
	r = sys3(NR_setresgid, c->gid, c->egid, c->sgid);
	if (r < 0)
		pie_fail(a, PIE_STAGE_CREDS, r, 3);
	sys3(NR_setfsgid, c->fsgid, 0, 0);
	r = sys3(NR_setresuid, c->uid, c->euid, c->suid);
	if (r < 0)
		pie_fail(a, PIE_STAGE_CREDS, r, 4);
	sys3(NR_setfsuid, c->fsuid, 0, 0);
	r = sys6(NR_prctl, PR_SET_SECUREBITS_, c->secbits, 0, 0, 0, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_CREDS, r, 5);
	for (cap = 0; cap <= c->cap_last_cap && cap < 64; cap++) {
		if (c->cap_bnd[cap / 32] & (1U << (cap % 32)))
			continue;
		r = sys6(NR_prctl, PR_CAPBSET_DROP_, cap, 0, 0, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_CREDS, r, 6);
	}
	hdr.version = CAP_VERSION_3_;
	hdr.pid = 0;
	for (i = 0; i < 2; i++) {
		data[i].eff = c->cap_eff[i];
		data[i].prm = c->cap_prm[i];
		data[i].inh = c->cap_inh[i];
	}
	r = sys3(NR_capset, (long)&hdr, (long)data, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_CREDS, r, 7);
	for (cap = 0; cap <= c->cap_last_cap && cap < 64; cap++) {
		if (!(c->cap_amb[cap / 32] & (1U << (cap % 32))))
			continue;
		r = sys6(NR_prctl, PR_CAP_AMBIENT_, PR_CAP_AMBIENT_RAISE_, cap, 0, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_CREDS, r, 8);
	}
	if (c->no_new_privs) {
		r = sys6(NR_prctl, PR_SET_NO_NEW_PRIVS_, 1, 0, 0, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_CREDS, r, 9);
	}
}

/* rt_sigreturn with rsp just above pretcode of the frame Python built: the kernel
 * loads every register, the xsave state and the signal mask from it. */
PIE __attribute__((noreturn)) void pie_sigreturn(uint64_t frame, int trap)
{
	if (trap)
		asm volatile("mov %0, %%rsp\n\t"
			     "int3\n\t"
			     "mov $15, %%eax\n\t"
			     "syscall\n\t"
			     "ud2" : : "r"(frame + 8) : "memory");
	asm volatile("mov %0, %%rsp\n\t"
		     "mov $15, %%eax\n\t"
		     "syscall\n\t"
		     "ud2" : : "r"(frame + 8) : "memory");
	__builtin_unreachable();
}

/* Wait while *word == val (FUTEX_WAIT on the shared page or, private, in the region). */
PIE void pie_wait_while(uint32_t *word, uint32_t val, int private_)
{
	while (atomic_load32(word) == val)
		sys6(NR_futex, (long)word, FUTEX_WAIT_ | (private_ ? FUTEX_PRIVATE_ : 0), val, 0, 0, 0);
}

/* POSIX record locks of the process: after the restorer closed its own fds, since
 * closing any fd of a file drops the process's locks on it. */
PIE void pie_take_locks(struct pie_args *a)
{
	struct pie_lock *l = (struct pie_lock *)a->locks;
	struct { int16_t type, whence; int32_t pad; int64_t start, len; int32_t pid, pad2; } fl;
	uint64_t i;
	long r;

	for (i = 0; i < a->nr_locks; i++) {
		fl.type = l[i].type;
		fl.whence = 0;
		fl.pad = fl.pid = fl.pad2 = 0;
		fl.start = l[i].start;
		fl.len = l[i].len;
		r = sys3(NR_fcntl, l[i].fd, F_SETLK_, (long)&fl);
		if (r < 0)
			pie_fail(a, PIE_STAGE_LOCKS, r, l[i].fd);
	}
}

/* The POSIX timers, with their ids: PR_TIMER_CREATE_RESTORE_IDS makes timer_create take
 * the id it is handed; without it (older kernels), ids come in order, so timers are
 * created and deleted until each id comes up. Armed later (pie_arm_timers). */
PIE void pie_create_timers(struct pie_args *a)
{
	struct pie_posix_timer *t = (struct pie_posix_timer *)a->posix_timers;
	struct { uint64_t value; int32_t signo, notify; int32_t tid; int32_t pad[11]; } sev;
	int32_t id;
	uint64_t i;
	long r, by_id;

	if (!a->nr_posix_timers)
		return;
	by_id = sys6(NR_prctl, PR_TIMER_CREATE_RESTORE_IDS_, 1, 0, 0, 0, 0);
	if (by_id < 0 && by_id != -EINVAL_)
		pie_fail(a, PIE_STAGE_TIMERS, by_id, 0);
	for (i = 0; i < a->nr_posix_timers; i++) {
		int j;

		sev.value = t[i].sival;
		sev.signo = t[i].signo;
		sev.notify = t[i].notify;
		sev.tid = t[i].thread_id;
		for (j = 0; j < 11; j++)
			sev.pad[j] = 0;
		for (;;) {
			id = t[i].id;
			r = sys3(NR_timer_create, t[i].clockid, (long)&sev, (long)&id);
			if (r < 0)
				pie_fail(a, PIE_STAGE_TIMERS, r, t[i].id);
			if (id == t[i].id)
				break;
			if (by_id == 0 || id > t[i].id)
				pie_fail(a, PIE_STAGE_TIMERS, -EINVAL_, t[i].id);
			sys3(NR_timer_delete, id, 0, 0);
		}
	}
	if (by_id == 0)
		sys6(NR_prctl, PR_TIMER_CREATE_RESTORE_IDS_, 0, 0, 0, 0, 0);
}

/* Right before the task returns to its code: interval timers, POSIX timers and
 * timerfds get the time that was left at the dump (an ABSTIME timerfd: now + that). */
PIE void pie_arm_timers(struct pie_args *a)
{
	struct pie_posix_timer *t = (struct pie_posix_timer *)a->posix_timers;
	struct pie_timerfd *f = (struct pie_timerfd *)a->timerfds;
	int64_t its[4];
	uint64_t i;

	if (a->arm_itimers)
		for (i = 0; i < 3; i++)
			sys3(NR_setitimer, i, a->itimers + 32 * i, 0);
	for (i = 0; i < a->nr_posix_timers; i++) {
		its[0] = t[i].isec;
		its[1] = t[i].insec;
		its[2] = t[i].vsec;
		its[3] = t[i].vnsec;
		sys6(NR_timer_settime, t[i].id, 0, (long)its, 0, 0, 0);
	}
	for (i = 0; i < a->nr_timerfds; i++) {
		its[0] = f[i].isec;
		its[1] = f[i].insec;
		its[2] = f[i].vsec;
		its[3] = f[i].vnsec;
		if ((f[i].flags & TFD_TIMER_ABSTIME_) && (its[2] || its[3])) {
			int64_t now[2] = { 0, 0 };

			sys3(NR_clock_gettime, f[i].clockid, (long)now, 0);
			its[2] += now[0];
			its[3] += now[1];
			if (its[3] >= NSEC_) {
				its[3] -= NSEC_;
				its[2]++;
			}
		}
		sys6(NR_timerfd_settime, f[i].fd, f[i].flags, (long)its, 0, 0, 0);
		if (f[i].ticks)
			sys3(NR_ioctl, f[i].fd, TFD_IOC_SET_TICKS_, (long)&f[i].ticks);
	}
}

PIE void pie_vfork(struct pie_args *a);

/* Everything one thread restores for itself, then the barrier, then into the task. */
PIE __attribute__((noreturn)) void pie_thread_main(struct pie_args *a, struct pie_thread *t)
{
	struct pie_thread *leader = (struct pie_thread *)a->threads;
	struct pie_sync *s = (struct pie_sync *)a->sync;
	long r;

	sys3(NR_set_tid_address, t->clear_child_tid, 0, 0);
	if (t->robust_list) {
		r = sys3(NR_set_robust_list, t->robust_list, t->robust_len, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_ROBUST_LIST, r, t->tid);
	}
	if (t->rseq_len) {
		r = sys6(NR_rseq, t->rseq, t->rseq_len, 0, t->rseq_sig, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_RSEQ_REGISTER, r, t->rseq);
	}
	if (t->sched_policy > 0) {
		r = sys3(NR_sched_setscheduler, 0, t->sched_policy, (long)&t->sched_prio);
		if (r < 0)
			pie_fail(a, PIE_STAGE_SCHED, r, t->tid);
	}
	if (t->has_nice) {
		r = sys3(NR_setpriority, 0, 0, t->sched_nice);
		if (r < 0)
			pie_fail(a, PIE_STAGE_SCHED, r, t->tid);
	}
	if (t->comm[0])
		sys6(NR_prctl, PR_SET_NAME_, (long)t->comm, 0, 0, 0, 0);
	pie_queue_signals(a, t->signals, t->nr_signals, t->tid);
	pie_restore_creds(a, &t->creds);
	/* after the credentials, which reset it; the pdeath signal only once the tree is
	 * let go (below): until then the leader dies with its parent */
	if (t == leader && a->dumpable >= 0)
		sys6(NR_prctl, PR_SET_DUMPABLE_, a->dumpable, 0, 0, 0, 0);

	r = sys3(NR_arch_prctl, ARCH_SET_GS_, t->gs_base, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_FS_BASE, r, t->gs_base);
	r = sys3(NR_arch_prctl, ARCH_SET_FS_, t->fs_base, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_FS_BASE, r, t->fs_base);

	__atomic_add_fetch(&a->threads_ready, 1, __ATOMIC_SEQ_CST);
	if (t == leader) {
		uint32_t n;

		/* every thread of the task is set up: tell the parent where the region is */
		while ((n = atomic_load32(&a->threads_ready)) < a->nr_threads) {
			if (s && atomic_load32(&s->stage) == PIE_SYNC_ERROR)
				sys3(NR_exit_group, 127, 0, 0);
			sys6(NR_futex, (long)&a->threads_ready, FUTEX_WAIT_ | FUTEX_PRIVATE_, n, 0, 0, 0);
		}
		pie_report(a, PIE_STAGE_DONE, a->keep_end - a->keep_start, a->keep_start);
		if (a->status_fd >= 0 && !a->vfork_args)
			sys3(NR_close, a->status_fd, 0, 0);
		if (s && __atomic_sub_fetch(&s->nr_in_progress, 1, __ATOMIC_SEQ_CST) == 0)
			sys6(NR_futex, (long)&s->nr_in_progress, FUTEX_WAKE_, 0x7fffffff, 0, 0, 0);
		if (a->vfork_args)
			pie_vfork(a);
	} else {
		sys6(NR_futex, (long)&a->threads_ready, FUTEX_WAKE_ | FUTEX_PRIVATE_, 1, 0, 0, 0);
	}
	if (s) {
		uint32_t st;

		while ((st = atomic_load32(&s->stage)) != a->stage_go) {
			if (st == PIE_SYNC_ERROR)
				sys3(NR_exit_group, 127, 0, 0);
			sys6(NR_futex, (long)&s->stage, FUTEX_WAIT_, st, 0, 0, 0);
		}
	}
	/* The Python phase had the leader die with its parent (nothing half-restored is
	 * left if the restore dies); now its own pdeath signal, whatever it is. */
	if (t->pdeath_sig || t == leader) {
		r = sys6(NR_prctl, PR_SET_PDEATHSIG_, t->pdeath_sig, 0, 0, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_PRCTL, r, t->tid);
	}
	if (t == leader)
		pie_arm_timers(a);
	pie_sigreturn(t->sigframe, a->trap_before_sigreturn);
}

PIE __attribute__((noreturn, used)) void pie_thread_entry(struct pie_args *a, struct pie_thread *t)
{
	pie_thread_main(a, t);
}

/* What a process made here (a vfork child) restores for itself before its thread
 * state: its fd table from the fds its parent parked, cwd/root/umask, session and
 * group, personality, resource limits, interval timers, signal actions and pending
 * signals. Limits and timers are best effort, as in the Python phase. */
PIE void pie_process_extras(struct pie_args *a)
{
	struct pie_fd_move *m = (struct pie_fd_move *)a->fd_moves;
	uint64_t *rl = (uint64_t *)a->rlimits;
	uint64_t i;
	long r;

	for (i = 0; i < a->nr_fd_moves; i++) {
		r = sys3(NR_dup3, m[i].from, m[i].to, m[i].cloexec ? O_CLOEXEC_ : 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_CLOSE, r, m[i].to);
	}
	if (a->root_fd >= 0) {
		r = sys3(NR_fchdir, a->root_fd, 0, 0);
		if (r == 0)
			r = sys3(NR_chroot, (long)a->dot, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_PRCTL, r, 1);
	}
	if (a->cwd_fd >= 0) {
		r = sys3(NR_fchdir, a->cwd_fd, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_PRCTL, r, 2);
	}
	if (a->umask >= 0)
		sys3(NR_umask, a->umask, 0, 0);
	if (a->setsid)
		sys3(NR_setsid, 0, 0, 0);
	else if (a->pgid > 0) {
		r = sys3(NR_setpgid, 0, a->pgid, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_PRCTL, r, 3);
	}
	if (a->personality >= 0)
		sys3(NR_personality, a->personality, 0, 0);
	for (i = 0; i < a->nr_rlimits; i++)
		sys6(NR_prlimit64, 0, i, (long)&rl[2 * i], 0, 0, 0);
	if (a->has_itimers)
		for (i = 0; i < 3; i++)
			sys3(NR_setitimer, i, a->itimers + 32 * i, 0);
	pie_restore_sigactions(a);
	pie_queue_signals(a, a->signals, a->nr_signals, 0);
	pie_close_fds(a);
}

PIE __attribute__((noreturn, used)) void pie_vfork_entry(struct pie_args *v)
{
	pie_process_extras(v);
	pie_thread_main(v, (struct pie_thread *)v->threads);
}

/* The child that runs in this task's memory, with its PID and the dumped sharing (with
 * CLONE_VFORK the caller sleeps in the kernel until the child exits or execs, exactly
 * as the dumped parent did). */
PIE long pie_clone_vfork(struct pie_args *a)
{
	struct pie_args *v = (struct pie_args *)a->vfork_args;
	struct pie_thread *vt = (struct pie_thread *)v->threads;
	struct clone_args_ ca;
	int32_t tid = vt->tid;
	register long r12 asm("r12") = (long)v;
	long ret;

	ca.flags = v->clone_flags;
	ca.pidfd = ca.child_tid = ca.parent_tid = ca.tls = ca.cgroup = 0;
	ca.exit_signal = SIGCHLD_;
	ca.stack = vt->stack_top - a->thread_stack;
	ca.stack_size = a->thread_stack;
	ca.set_tid = (uint64_t)&tid;
	ca.set_tid_size = 1;
	asm volatile("syscall\n\t"
		     "test %%rax, %%rax\n\t"
		     "jnz 1f\n\t"
		     "xor %%ebp, %%ebp\n\t"
		     "mov %%r12, %%rdi\n\t"
		     "call %P[entry]\n\t"
		     "ud2\n"
		     "1:"
		     : "=a"(ret)
		     : "a"(NR_clone3), "D"(&ca), "S"(sizeof(ca)), "r"(r12), [entry] "i"(pie_vfork_entry)
		     : "rcx", "r11", "memory");
	return ret;
}

/* clone3 a thread of this task with its TID; the child starts on its own stack in the
 * region and goes straight to pie_thread_entry(a, t). */
PIE long pie_clone_thread(struct pie_args *a, struct pie_thread *t, uint64_t stack_size)
{
	struct clone_args_ ca;
	int32_t tid = t->tid;
	long ret;

	ca.flags = CLONE_THREAD_FLAGS_;
	ca.pidfd = ca.child_tid = ca.parent_tid = ca.exit_signal = ca.tls = ca.cgroup = 0;
	ca.stack = t->stack_top - stack_size;
	ca.stack_size = stack_size;
	ca.set_tid = (uint64_t)&tid;
	ca.set_tid_size = 1;
	PIE_CLONE3_CALL(ret, &ca, pie_thread_entry, a, t);
	return ret;
}

/* Once ready: make the child that runs in this memory (a vfork parent sleeps until it
 * is done); then close what was parked for it (its fd table's sources) and the status fd. */
PIE void pie_vfork(struct pie_args *a)
{
	struct pie_args *v = (struct pie_args *)a->vfork_args;
	struct pie_fd_move *m = (struct pie_fd_move *)v->fd_moves;
	struct pie_thread *vt = (struct pie_thread *)v->threads;
	uint64_t i;
	long r;

	r = pie_clone_vfork(a);
	if (r < 0)
		pie_fail(a, PIE_STAGE_CLONE_THREAD, r, vt->tid);
	for (i = 0; i < v->nr_fd_moves; i++)
		sys3(NR_close, m[i].from, 0, 0);
	if (v->cwd_fd >= 0)
		sys3(NR_close, v->cwd_fd, 0, 0);
	if (v->root_fd >= 0)
		sys3(NR_close, v->root_fd, 0, 0);
	if (a->status_fd >= 0)
		sys3(NR_close, a->status_fd, 0, 0);
}

PIE_ENTRY __attribute__((noreturn)) void pie_restorer_main(struct pie_args *a)
{
	struct pie_thread *t = (struct pie_thread *)a->threads;
	uint64_t i;
	long r;

	if (a->old_rseq_len) {
		r = sys6(NR_rseq, a->old_rseq, a->old_rseq_len, RSEQ_FLAG_UNREGISTER_, a->old_rseq_sig, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_RSEQ_UNREGISTER, r, a->old_rseq);
	}
	pie_unmap_all(a);
	pie_remap_premapped(a);
	pie_map_vmas(a);
	pie_read_pages(a);
	pie_register_lazy(a);
	pie_place_sigframes(a);
	pie_protect_vmas(a);

	if (a->vdso_vvar) {
		r = sys3(NR_arch_prctl, ARCH_MAP_VDSO_64_, a->vdso_vvar, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_VDSO, r, a->vdso_vvar);
	}
	pie_restore_sigactions(a);

	if (a->has_mm_map) {
		r = sys6(NR_prctl, PR_SET_MM_, PR_SET_MM_MAP_, (long)&a->mm_map, sizeof(a->mm_map), 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_MM_MAP, r, 0);
	}
	pie_queue_signals(a, a->signals, a->nr_signals, 0);
	pie_close_fds(a);
	pie_take_locks(a);

	for (i = 1; i < a->nr_threads; i++) {
		r = pie_clone_thread(a, &t[i], a->thread_stack);
		if (r < 0)
			pie_fail(a, PIE_STAGE_CLONE_THREAD, r, t[i].tid);
	}
	pie_create_timers(a);
	pie_thread_main(a, t);
}
