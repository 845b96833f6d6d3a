/* Thin native helpers of the restore: forking with a chosen PID (clone3 + set_tid, and
 * the sharing flags of the dumped tree), futexes on the shared sync page, filling
 * premapped memory from the pages file (writing only the pages that differ, so pages a
 * child still shares copy-on-write with its parent stay shared), locating the PIE
 * restorer's bytes in this module, glibc's rseq registration, and the jump onto the
 * restorer's own stack (which Python cannot do). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include "pie_restorer.h"
#include "restore_glue.h"
#include <time.h>

extern char __start_criu_pie[], __stop_criu_pie[];
extern void pie_restorer_main(struct pie_args *a) __attribute__((visibility("hidden")));

/* glibc >= 2.35 exports where it registered rseq for each thread. */
extern const ptrdiff_t __rseq_offset __attribute__((weak));
extern const unsigned int __rseq_size __attribute__((weak));

struct clone3_args {
	uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
	uint64_t set_tid, set_tid_size, cgroup;
};

/* glibc caches the thread id in its struct pthread (at the thread pointer) and fork()
 * has the kernel update it in the child (CLONE_CHILD_SETTID). A raw clone3 must do the
 * same or raise()/pthread_kill() in the child would signal the parent. The field's
 * offset is glibc-internal: 0x2d0 in the glibc versions we know; used only if the
 * value there really is our tid. */
#define GLIBC_PTHREAD_TID_OFFSET 0x2d0

static uint64_t glibc_tid_slot(void)
{
	int32_t *slot = (int32_t *)((char *)__builtin_thread_pointer() + GLIBC_PTHREAD_TID_OFFSET);

	return *slot == (int32_t)syscall(SYS_gettid) ? (uint64_t)(uintptr_t)slot : 0;
}

long criu_py_clone3_set_tid(int32_t pid)
{
	return criu_py_clone3_flags(pid, 0);
}

/* clone3 with set_tid and `flags` (CLONE_FILES / CLONE_FS: the child shares them). */
long criu_py_clone3_flags(int32_t pid, uint64_t flags)
{
	struct clone3_args ca = { 0 };
	int32_t tid = pid;
	uint64_t slot = glibc_tid_slot();
	long r;

	ca.flags = flags;
	ca.exit_signal = SIGCHLD;
	ca.set_tid = (uint64_t)(uintptr_t)&tid;
	ca.set_tid_size = 1;
	if (slot) {
		ca.flags |= 0x01000000;	/* CLONE_CHILD_SETTID */
		ca.child_tid = slot;
	}
	r = syscall(SYS_clone3, &ca, sizeof(ca));
	return r < 0 ? -errno : r;
}

/* Children one after the other (pids[i] with flags[i]: n int32 and n uint64, packed),
 * nothing run in between: in the i-th child i + 1; in the parent 0 once all exist, or
 * -errno with *made set to the number made before the one that failed. A parent running
 * Python between two forks writes to pages the new child now shares: a copy-on-write
 * fault each time, ~90 a child for a task's fork loop. */
long criu_py_clone3_batch(const char *pids, const char *flags, int32_t n, int32_t *made)
{
	for (int32_t i = 0; i < n; i++) {
		int32_t pid;
		uint64_t fl;
		long r;

		memcpy(&pid, pids + 4 * (size_t)i, sizeof(pid));
		memcpy(&fl, flags + 8 * (size_t)i, sizeof(fl));
		r = criu_py_clone3_flags(pid, fl);
		if (r == 0)
			return i + 1;
		if (r < 0) {
			*made = i;
			return r;
		}
	}
	*made = n;
	return 0;
}

uint64_t criu_py_pie_blob_start(void) { return (uint64_t)(uintptr_t)__start_criu_pie; }
uint64_t criu_py_pie_blob_end(void) { return (uint64_t)(uintptr_t)__stop_criu_pie; }
uint64_t criu_py_pie_entry(void) { return (uint64_t)(uintptr_t)pie_restorer_main; }

uint64_t criu_py_glibc_rseq_addr(void)
{
	if (!&__rseq_offset || !&__rseq_size || !__rseq_size)
		return 0;
	return (uint64_t)(uintptr_t)__builtin_thread_pointer() + __rseq_offset;
}

uint32_t criu_py_glibc_rseq_size(void)
{
	if (!&__rseq_size)
		return 0;
	return __rseq_size;
}

/* Switch to the restorer's stack and call its entry with the argument block. */
void criu_py_enter_restorer(uint64_t entry, uint64_t args, uint64_t stack_top)
{
	asm volatile("mov %0, %%rsp\n\t"
		     "xor %%ebp, %%ebp\n\t"
		     "call *%1\n\t"
		     "ud2"
		     : : "r"(stack_top), "r"(entry), "D"(args) : "memory");
	__builtin_unreachable();
}

/* A raw syscall returning -errno, with 64-bit results intact (addresses). */
int64_t criu_py_restore_syscall(int64_t nr, int64_t a, int64_t b, int64_t c, int64_t d, int64_t e, int64_t f)
{
	long r = syscall(nr, a, b, c, d, e, f);
	return r == -1 ? -errno : r;
}

/* This CPU's enabled user xstate features (XCR0): what a signal frame's xsave area may hold.
 * (The xsave layout itself comes from CPUID 0xD via csrc/kdat.c's criu_py_cpuid.) */
uint64_t criu_py_xcr0(void)
{
	uint32_t lo, hi;

	asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return ((uint64_t)hi << 32) | lo;
}

/* Futexes on a word of the shared sync page (not private: several processes). */
long criu_py_futex_wait(uint64_t addr, uint32_t val, int64_t timeout_ns)
{
	struct timespec ts = { timeout_ns / 1000000000, timeout_ns % 1000000000 };
	long r = syscall(SYS_futex, (uint32_t *)(uintptr_t)addr, FUTEX_WAIT, val,
			 timeout_ns >= 0 ? &ts : NULL, NULL, 0);

	return r < 0 ? -errno : r;
}

long criu_py_futex_wake(uint64_t addr)
{
	long r = syscall(SYS_futex, (uint32_t *)(uintptr_t)addr, FUTEX_WAKE, 0x7fffffff, NULL, NULL, 0);

	return r < 0 ? -errno : r;
}

uint32_t criu_py_atomic_add(uint64_t addr, int32_t delta)
{
	return __atomic_add_fetch((uint32_t *)(uintptr_t)addr, delta, __ATOMIC_SEQ_CST);
}

uint32_t criu_py_atomic_load(uint64_t addr)
{
	return __atomic_load_n((uint32_t *)(uintptr_t)addr, __ATOMIC_SEQ_CST);
}

void criu_py_atomic_store(uint64_t addr, uint32_t val)
{
	__atomic_store_n((uint32_t *)(uintptr_t)addr, val, __ATOMIC_SEQ_CST);
}

/* Fill [dst, dst + len) from fd at file offset off. With compare, the memory already
 * holds what the parent had (inherited copy-on-write): only the pages whose contents
 * differ are written, so identical pages stay shared. Returns the number of pages
 * written, or -errno. */
long criu_py_fill_pages(int fd, uint64_t off, uint64_t dst, uint64_t len, int compare)
{
	static char buf[1 << 20];
	long written = 0;

	while (len) {
		uint64_t n = len < sizeof(buf) ? len : sizeof(buf);
		uint64_t got = 0, p;

		if (!compare) {
			ssize_t r = pread(fd, (void *)(uintptr_t)dst, n, off);

			if (r < 0) {
				if (errno == EINTR)
					continue;
				return -errno;
			}
			if (r == 0)
				return -EIO;
			dst += r;
			off += r;
			len -= r;
			written += r / 4096;
			continue;
		}
		while (got < n) {
			ssize_t r = pread(fd, buf + got, n - got, off + got);

			if (r < 0) {
				if (errno == EINTR)
					continue;
				return -errno;
			}
			if (r == 0)
				return -EIO;
			got += r;
		}
		for (p = 0; p < n; p += 4096) {
			char *to = (char *)(uintptr_t)(dst + p);

			if (memcmp(to, buf + p, 4096)) {
				memcpy(to, buf + p, 4096);
				written++;
			}
		}
		dst += n;
		off += n;
		len -= n;
	}
	return written;
}
