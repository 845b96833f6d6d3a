/* Rewrites its whole memory in a tight loop, for snapshots: SIZE_MIB of private anonymous
 * memory whose first page is a control page {magic, state = generation << 32 | index}
 * and every other page is filled with the 8-byte word (generation << 32 | page index).
 * Pass G writes generation G into pages 1, 2, ... in order, storing the state (one
 * store) before each page, so at any moment pages below index hold G, pages above it
 * G - 1, and page index a prefix of G words over G - 1 words: a snapshot that is not
 * one moment breaks this.
 * SIGUSR1: check it and log "OK <pid> gen=<G> index=<I>" or "BAD <pid> <what>".
 * With RATE_MS > 0 it logs "rate <pages per second> <monotonic ns>" every RATE_MS ms.
 * THREADS more threads each rewrite a 4 MiB buffer of their own meanwhile; CHILDREN
 * child processes (forked first) do all of this too, each logging with its own pid.
 * usage: rewriter LOG SIZE_MIB [RATE_MS [THREADS [CHILDREN]]] */
#include "wl.h"
#include <stdint.h>
#include <pthread.h>
#include <sys/mman.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAGIC 0x5245575249544552ULL	/* "REWRITER" */

struct control {
	uint64_t magic;
	volatile uint64_t state;	/* generation << 32 | index */
};

static volatile sig_atomic_t check_requested;
static uint64_t *area;
static size_t pages;

static void on_usr1(int sig) { (void)sig; check_requested = 1; }

static void *scribble(void *arg)
{
	char *buf = malloc(4 << 20);

	for (unsigned char n = (unsigned char)(uintptr_t)arg;; n++) {
		memset(buf, n, 4 << 20);
		wl_sleep_ms(1);
	}
	return NULL;
}

static const char *check(struct control *c)
{
	static char what[128];
	uint64_t g = c->state >> 32, idx = c->state & 0xffffffff;

	for (size_t i = 1; i < pages; i++) {
		uint64_t want = (i < idx ? g : g - 1) << 32 | i;
		const uint64_t *p = area + i * WORDS;

		for (size_t w = 0; w < WORDS; w++)
			if (p[w] != want) {
				snprintf(what, sizeof(what), "page %zu word %zu is %#llx, not %#llx "
					 "(gen %llu index %llu)", i, w, (unsigned long long)p[w],
					 (unsigned long long)want, (unsigned long long)g,
					 (unsigned long long)idx);
				return what;
			}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	long rate_ms = argc > 3 ? atol(argv[3]) : 0;
	long long last = 0, done = 0;
	struct control *c;

	if (argc < 3) {
		fprintf(stderr, "usage: rewriter LOG SIZE_MIB [RATE_MS]\n");
		return 2;
	}
	wl_open_log(argv[1]);
	for (long k = 0; argc > 5 && k < atol(argv[5]); k++)
		if (fork() == 0)
			break;
	pages = ((size_t)atol(argv[2]) << 20) / PAGE;
	area = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		return 4;
	c = (struct control *)area;
	c->magic = MAGIC;
	for (size_t i = 1; i < pages; i++)		/* generation 0 everywhere */
		for (size_t w = 0; w < WORDS; w++)
			area[i * WORDS + w] = i;
	c->state = 1ULL << 32 | 1;
	sigaction(SIGUSR1, &sa, NULL);
	for (long t = 0; argc > 4 && t < atol(argv[4]); t++) {
		pthread_t th;

		pthread_create(&th, NULL, scribble, (void *)(uintptr_t)t);
	}
	wl_log("ready %d", getpid());
	last = wl_now_ns(CLOCK_MONOTONIC);
	for (uint64_t gen = 1;; gen++) {
		for (size_t i = 1; i < pages; i++) {
			uint64_t v = gen << 32 | i, *p = area + i * WORDS;

			c->state = v;
			for (size_t w = 0; w < WORDS; w++)
				p[w] = v;
			if (check_requested) {
				const char *bad;

				check_requested = 0;
				c->state = v + 1;		/* page i is whole */
				bad = check(c);
				if (bad)
					wl_log("BAD %d %s", getpid(), bad);
				else
					wl_log("OK %d gen=%llu index=%llu", getpid(),
					       (unsigned long long)gen, (unsigned long long)i + 1);
			}
			if (rate_ms && (++done & 255) == 0) {
				long long now = wl_now_ns(CLOCK_MONOTONIC);

				if (now - last >= rate_ms * 1000000LL) {
					wl_log("rate %lld %lld", done * 1000000000LL / (now - last), now);
					last = now;
					done = 0;
				}
			}
		}
		c->state = (gen + 1) << 32 | 1;		/* pass done: everything holds gen */
	}
}
