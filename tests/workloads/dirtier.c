/* Memory that keeps changing a little, for incremental dumps: SIZE_MIB of private
 * anonymous memory where every page holds a pattern of (page index, its version), the
 * versions in a table of their own. Every 10 ms it rewrites a share of the pages so
 * that PERMILLE per mille of them are written per second (each gets the next version).
 * SIGUSR2 rewrites the marker page (index 7) once more, logging "marked <version>"
 * (the random writes leave that page alone). SIGHUP makes it exec itself again with the
 * same arguments (a new address space, the same pid): it logs "ready" once more.
 * On SIGUSR1 it checks every page against its version and logs
 * "OK <pid> <checksum> p7=<version>" or "BAD <pid> <what>"; the checksum covers every
 * word, so a test can compare it with a value logged earlier.
 * usage: dirtier LOG SIZE_MIB PERMILLE_PER_SECOND */
#include "wl.h"
#include <stdint.h>
#include <sys/mman.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MARKER 7

static volatile sig_atomic_t check_requested, mark_requested, exec_requested;
static uint64_t *area;
static uint32_t *version;
static size_t pages;

static void on_usr1(int sig) { (void)sig; check_requested = 1; }
static void on_usr2(int sig) { (void)sig; mark_requested = 1; }
static void on_hup(int sig) { (void)sig; exec_requested = 1; }

static uint64_t word(size_t page, size_t w, uint32_t v)
{
	return ((uint64_t)page << 32 | v) * 0x9E3779B97F4A7C15ULL ^ (w * 0xBF58476D1CE4E5B9ULL);
}

static void write_page(size_t page)
{
	uint64_t *p = area + page * WORDS;
	uint32_t v = ++version[page];

	for (size_t w = 0; w < WORDS; w++)
		p[w] = word(page, w, v);
}

static const char *check(uint64_t *sum)
{
	static char what[96];

	*sum = 0;
	for (size_t i = 0; i < pages; i++) {
		const uint64_t *p = area + i * WORDS;

		for (size_t w = 0; w < WORDS; w++) {
			if (p[w] != word(i, w, version[i])) {
				snprintf(what, sizeof(what), "page %zu word %zu (version %u)", i, w,
					 version[i]);
				return what;
			}
			*sum += p[w] * (w + 1);
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_flags = SA_RESTART };
	uint64_t rng = 88172645463325252ULL;
	long permille;
	double owed = 0;

	if (argc < 4) {
		fprintf(stderr, "usage: dirtier LOG SIZE_MIB PERMILLE_PER_SECOND\n");
		return 2;
	}
	wl_open_log(argv[1]);
	pages = ((size_t)atol(argv[2]) << 20) / PAGE;
	permille = atol(argv[3]);
	area = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	version = mmap(NULL, pages * sizeof(*version), PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED || version == MAP_FAILED)
		return 4;
	for (size_t i = 0; i < pages; i++)
		write_page(i);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	sa.sa_handler = on_hup;
	sigaction(SIGHUP, &sa, NULL);
	wl_log("ready %d", getpid());
	for (;;) {
		if (check_requested) {
			uint64_t sum;
			const char *bad;

			check_requested = 0;
			bad = check(&sum);
			if (bad)
				wl_log("BAD %d %s", getpid(), bad);
			else
				wl_log("OK %d %016llx p7=%u", getpid(), (unsigned long long)sum,
				       version[MARKER]);
		}
		if (exec_requested) {
			execv("/proc/self/exe", argv);
			wl_log("BAD %d exec failed", getpid());
			exec_requested = 0;
		}
		if (mark_requested) {
			mark_requested = 0;
			write_page(MARKER);
			wl_log("marked %u", version[MARKER]);
		}
		/* permille/1000 of the pages per second, in 10 ms steps */
		owed += (double)pages * permille / 1000.0 / 100.0;
		while (owed >= 1) {
			rng ^= rng << 13;
			rng ^= rng >> 7;
			rng ^= rng << 17;
			owed -= 1;
			if (rng % pages != MARKER)	/* the marker page changes on SIGUSR2 only */
				write_page(rng % pages);
		}
		wl_sleep_ms(10);
	}
}
