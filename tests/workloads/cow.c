/* Memory shared copy-on-write across a tree: the parent fills MIB MiB of private
 * anonymous memory with a pattern (every page different), then forks NCHILD children;
 * child i then writes its own mark into 16 pages of its own (those become private to
 * it), the rest stays shared with the parent. Everyone logs "ready PID" when set up
 * (the parent last, with "family PID c1 c2 ..."); on SIGUSR1 each checks its whole
 * region against what it must hold and logs "OK PID" or "BAD PID <what>".
 * usage: cow LOG MIB NCHILD */
#include "wl.h"
#include <stdint.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096

static uint8_t *mem;
static size_t npages;
static int me = -1;			/* child index, -1 in the parent */
static volatile sig_atomic_t requested;

static void on_usr1(int sig)
{
	(void)sig;
	requested = 1;
}

static uint64_t word_for(size_t page, size_t i)
{
	return (page * 0x9E3779B97F4A7C15ULL) ^ (i * 0xBF58476D1CE4E5B9ULL) ^ 0x1234;
}

static int is_mine(size_t page)
{
	return me >= 0 && page % 997 == (size_t)me * 61 % 997 && page / 997 < 16;
}

static const char *check(void)
{
	static char bad[128];

	for (size_t p = 0; p < npages; p++) {
		uint64_t *w = (uint64_t *)(mem + p * PAGE);

		for (size_t i = 0; i < PAGE / 8; i++) {
			uint64_t want = is_mine(p) ? word_for(p, i) ^ (0xC0FFEE00ULL + me) : word_for(p, i);

			if (w[i] != want) {
				snprintf(bad, sizeof(bad), "page %zu word %zu", p, i);
				return bad;
			}
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	int nchild;
	pid_t kids[64];
	char line[1024];
	int n;

	if (argc < 4)
		return 2;
	wl_open_log(argv[1]);
	npages = (size_t)atol(argv[2]) * 256;
	nchild = atoi(argv[3]);
	sigaction(SIGUSR1, &sa, NULL);
	mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return 3;
	for (size_t p = 0; p < npages; p++)
		for (size_t i = 0; i < PAGE / 8; i++)
			((uint64_t *)(mem + p * PAGE))[i] = word_for(p, i);
	for (int c = 0; c < nchild && c < 64; c++) {
		kids[c] = fork();
		if (kids[c] == 0) {
			me = c;
			for (size_t p = 0; p < npages; p++)
				if (is_mine(p))
					for (size_t i = 0; i < PAGE / 8; i++)
						((uint64_t *)(mem + p * PAGE))[i] ^= 0xC0FFEE00ULL + me;
			wl_log("ready %d", getpid());
			wl_serve_checks(&requested, check);
		}
	}
	n = snprintf(line, sizeof(line), "family %d", getpid());
	for (int c = 0; c < nchild; c++)
		n += snprintf(line + n, sizeof(line) - n, " %d", kids[c]);
	wl_sleep_ms(100);
	wl_log("%s", line);
	wl_serve_checks(&requested, check);
}
