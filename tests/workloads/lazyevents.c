/* A lazily restored task that changes its memory layout while its pages are still
 * arriving: on SIGUSR1 it forks a child that checks the whole patterned area (its own
 * userfaultfd comes from UFFD_EVENT_FORK), then itself munmaps one part of the area,
 * madvise(MADV_DONTNEED)s another (which must read as zeros after), mremaps a third to a
 * new address (the data must move with it) and checks everything that is left, logging
 * "OK <pid>" or "BAD <pid> <what>". Each round works on a fresh copy of the layout it
 * recorded, so the check can be asked for only once per restore.
 * usage: lazyevents LOG SIZE_MIB SEED */
#define _GNU_SOURCE
#include "wl.h"
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>

static volatile sig_atomic_t check_requested;
static uint64_t *area;
static size_t area_words;
static uint64_t seed;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static uint64_t word_at(size_t i)
{
	return ((uint64_t)i + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
}

/* first word of [from, to) (word indexes into the original area) that differs */
static long bad_word(const uint64_t *p, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (p[i - from] != word_at(i))
			return (long)i;
	return -1;
}

static const char *check(void)
{
	static char what[160];
	size_t q = area_words / 8, page_words = 4096 / 8;
	uint64_t *moved;
	pid_t child;
	int status;
	long w;

	/* 1. a child checks everything while almost nothing has arrived yet */
	child = fork();
	if (child < 0)
		return "fork";
	if (child == 0)
		_exit(bad_word(area, 0, area_words) < 0 ? 0 : 1);
	/* 2. meanwhile: unmap the 2nd eighth, drop the 4th, move the 6th */
	if (munmap(area + q, q * 8))
		return "munmap";
	if (madvise(area + 3 * q, q * 8, MADV_DONTNEED))
		return "madvise";
	moved = mremap(area + 5 * q, q * 8, q * 8, MREMAP_MAYMOVE | MREMAP_FIXED,
		       (char *)area + area_words * 8 + (32 << 20));
	if (moved == MAP_FAILED)
		return "mremap";
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
		snprintf(what, sizeof(what), "the child found bad memory (status %#x)", status);
		return what;
	}
	if ((w = bad_word(area, 0, q)) >= 0 || (w = bad_word(area + 2 * q, 2 * q, 3 * q)) >= 0 ||
	    (w = bad_word(area + 4 * q, 4 * q, 5 * q)) >= 0 ||
	    (w = bad_word(area + 6 * q, 6 * q, area_words)) >= 0) {
		snprintf(what, sizeof(what), "memory word %ld", w);
		return what;
	}
	if ((w = bad_word(moved, 5 * q, 6 * q)) >= 0) {
		snprintf(what, sizeof(what), "moved memory word %ld", w);
		return what;
	}
	for (size_t i = 0; i < q; i += page_words / 4)
		if (area[3 * q + i]) {
			snprintf(what, sizeof(what), "dropped word %zu is not zero", 3 * q + i);
			return what;
		}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	size_t bytes;

	if (argc < 4) {
		fprintf(stderr, "usage: lazyevents LOG SIZE_MIB SEED\n");
		return 2;
	}
	wl_open_log(argv[1]);
	bytes = (size_t)atol(argv[2]) << 20;
	seed = strtoull(argv[3], NULL, 0);
	/* a PROT_NONE reservation after the area: where its moved part goes */
	area = mmap(NULL, bytes * 2 + (64 << 20), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		return 4;
	if (mprotect(area, bytes, PROT_READ | PROT_WRITE))
		return 4;
	area_words = bytes / sizeof(uint64_t);
	for (size_t i = 0; i < area_words; i++)
		area[i] = word_at(i);
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	wl_log("ready %d", getpid());
	wl_serve_checks(&check_requested, check);
}
