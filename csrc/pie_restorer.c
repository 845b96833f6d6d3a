/* The PIE restorer: the last stage of a restore, which no Python can run because it
 * unmaps the interpreter. It is freestanding: raw syscalls, no libc, no static data, no
 * string literals, no calls outside its own section "criu_pie", so that the bytes
 * [__start_criu_pie, __stop_criu_pie) can be copied anywhere and run there
 * (tests/test_pie_restorer.py checks the built module for this).
 *
 * It is entered on its own stack inside the restorer region with a struct pie_args
 * (csrc/pie_restorer.h) built by criu_py/restore/pie.py, and it
 *   unregisters glibc's rseq, unmaps everything outside the region, maps the dumped
 *   VMAs, faults in and reads page contents straight into place, places the sigframe on
 *   the task's stack, sets madvise advice and final protections, puts the vdso back at
 *   the dumped address, restores signal actions, mm fields (PR_SET_MM_MAP),
 *   clear_child_tid and rseq, closes the helper fds, reports to the parent, sets fs/gs
 *   base and rt_sigreturns into the task (after an int3 when the parent traces it, so it
 *   can unmap the region first: criu_py/restore/tracer.py). */
#pragma GCC optimize("no-tree-loop-distribute-patterns", "no-tree-vectorize")
#include <stdint.h>
#include "pie_restorer.h"

#define PIE static __attribute__((section("criu_pie"), used, noinline))
#define PIE_ENTRY __attribute__((section("criu_pie"), used, noinline, visibility("hidden")))
#define PIE_INLINE static inline __attribute__((section("criu_pie"), always_inline))

#define NR_read 0
#define NR_write 1
#define NR_close 3
#define NR_mmap 9
#define NR_mprotect 10
#define NR_munmap 11
#define NR_rt_sigaction 13
#define NR_rt_sigreturn 15
#define NR_preadv 295
#define NR_madvise 28
#define NR_exit_group 231
#define NR_arch_prctl 158
#define NR_prctl 157
#define NR_set_tid_address 218
#define NR_rseq 334

#define MAP_FIXED_ 0x10
#define MAP_ANONYMOUS_ 0x20
#define PROT_READ_ 1
#define PROT_WRITE_ 2
#define ARCH_SET_GS_ 0x1001
#define ARCH_SET_FS_ 0x1002
#define ARCH_MAP_VDSO_64_ 0x2003
#define PR_SET_MM_ 35
#define PR_SET_MM_MAP_ 14
#define RSEQ_FLAG_UNREGISTER_ 1
#define IOV_BATCH 1024
#define MADV_POPULATE_WRITE_ 23
#define EINTR_ 4
#define EAGAIN_ 11

struct pie_iovec {
	uint64_t base;
	uint64_t len;
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

/* Tell the restore parent how far we got; a failure ends the task here. */
PIE void pie_report(struct pie_args *a, int stage, long ret, uint64_t arg)
{
	struct pie_status st;

	st.magic = PIE_STATUS_MAGIC;
	st.stage = stage;
	st.ret = ret;
	st.arg = arg;
	if (a->status_fd >= 0)
		sys3(NR_write, a->status_fd, (long)&st, sizeof(st));
}

PIE __attribute__((noreturn)) void pie_fail(struct pie_args *a, int stage, long ret, uint64_t arg)
{
	pie_report(a, stage, ret, arg);
	for (;;)
		sys3(NR_exit_group, 127, 0, 0);
}

/* Everything but the region goes: the interpreter, its libraries, its stack, the vdso. */
PIE void pie_unmap_all(struct pie_args *a)
{
	long r;

	if (a->keep_start) {
		r = sys3(NR_munmap, 0, a->keep_start, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_UNMAP, r, 0);
	}
	if (a->keep_end < a->task_size) {
		r = sys3(NR_munmap, a->keep_end, a->task_size - a->keep_end, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_UNMAP, r, a->keep_end);
	}
}

/* Map every VMA; those that get pages are writable first, final protection later. */
PIE void pie_map_vmas(struct pie_args *a)
{
	struct pie_vma *v = (struct pie_vma *)a->vmas;
	uint64_t i;
	long r;

	for (i = 0; i < a->nr_vmas; i++, v++) {
		uint64_t len = v->end - v->start;

		if (v->kind == PIE_VMA_FILE)
			r = sys6(NR_mmap, v->start, len, v->map_prot, v->flags | MAP_FIXED_, v->fd, v->pgoff);
		else
			r = sys6(NR_mmap, v->start, len, v->map_prot,
				 v->flags | MAP_FIXED_ | MAP_ANONYMOUS_, -1, 0);
		if (r != (long)v->start)
			pie_fail(a, PIE_STAGE_MAP_VMA, r, v->start);
	}
}

/* preadv the pages file straight into place, IOV_BATCH iovecs per call; a short read
 * advances the iovecs (the array lives in the region and is consumed in place). */
PIE void pie_read_pages(struct pie_args *a)
{
	struct pie_iovec *iov = (struct pie_iovec *)a->iovs;
	uint64_t left = a->nr_iovs;
	uint64_t off = a->pages_off;
	uint64_t i;

	/* Fault the destination in with one call per run: far cheaper than a page fault
	 * per 4 KiB inside the copy (the pages must be allocated either way). */
	for (i = 0; i < left; i++)
		sys3(NR_madvise, iov[i].base, iov[i].len, MADV_POPULATE_WRITE_);

	while (left) {
		uint64_t n = left < IOV_BATCH ? left : IOV_BATCH;
		long r = sys6(NR_preadv, a->pages_fd, (long)iov, n, off, 0, 0);

		if (r == -EINTR_ || r == -EAGAIN_)
			continue;
		if (r <= 0)
			pie_fail(a, PIE_STAGE_READ_PAGES, r ? r : -5, off);
		off += r;
		while (left && (uint64_t)r >= iov->len) {
			r -= iov->len;
			iov++;
			left--;
		}
		if (r) {
			iov->base += r;
			iov->len -= r;
		}
	}
}

/* Word copy of the sigframe onto the task's stack (no memcpy outside the section). */
PIE void pie_place_sigframe(struct pie_args *a)
{
	uint64_t *dst = (uint64_t *)a->sigframe;
	const uint64_t *src = (const uint64_t *)a->sigframe_src;
	uint64_t i;

	if (!a->sigframe_src)
		return;
	for (i = 0; i < (a->sigframe_len + 7) / 8; i++)
		dst[i] = src[i];
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
		if (v->prot == v->map_prot)
			continue;
		r = sys3(NR_mprotect, v->start, v->end - v->start, v->prot);
		if (r < 0)
			pie_fail(a, PIE_STAGE_MPROTECT, r, v->start);
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

PIE void pie_close_fds(struct pie_args *a)
{
	int32_t *fds = (int32_t *)a->close_fds;
	uint64_t i;

	for (i = 0; i < a->nr_close_fds; i++)
		sys3(NR_close, fds[i], 0, 0);
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

PIE_ENTRY __attribute__((noreturn)) void pie_restorer_main(struct pie_args *a)
{
	long r;

	if (a->old_rseq_len) {
		r = sys6(NR_rseq, a->old_rseq, a->old_rseq_len, RSEQ_FLAG_UNREGISTER_, a->old_rseq_sig, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_RSEQ_UNREGISTER, r, a->old_rseq);
	}
	pie_unmap_all(a);
	pie_map_vmas(a);
	pie_read_pages(a);
	pie_place_sigframe(a);
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
	sys3(NR_set_tid_address, a->clear_child_tid, 0, 0);
	if (a->new_rseq_len) {
		r = sys6(NR_rseq, a->new_rseq, a->new_rseq_len, 0, a->new_rseq_sig, 0, 0);
		if (r < 0)
			pie_fail(a, PIE_STAGE_RSEQ_REGISTER, r, a->new_rseq);
	}
	pie_close_fds(a);

	r = sys3(NR_arch_prctl, ARCH_SET_GS_, a->gs_base, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_FS_BASE, r, a->gs_base);
	r = sys3(NR_arch_prctl, ARCH_SET_FS_, a->fs_base, 0);
	if (r < 0)
		pie_fail(a, PIE_STAGE_FS_BASE, r, a->fs_base);

	/* Tells the parent where the region is: with a tracer it unmaps it at the int3. */
	pie_report(a, PIE_STAGE_DONE, a->keep_end - a->keep_start, a->keep_start);
	if (a->status_fd >= 0)
		sys3(NR_close, a->status_fd, 0, 0);
	pie_sigreturn(a->sigframe, a->trap_before_sigreturn);
}
