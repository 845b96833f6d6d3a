/* Mappings with the advice and flags a restore must keep (they show in smaps VmFlags):
 * MADV_DONTFORK, DONTDUMP, HUGEPAGE, NOHUGEPAGE, MERGEABLE, WIPEONFORK, SEQUENTIAL,
 * RANDOM, MAP_LOCKED, mlock() of part of a mapping, MAP_NORESERVE and MAP_DROPPABLE,
 * each 2 MiB with a pattern written into its first and last page. Logs "ready PID" and
 * then, on SIGUSR1, checks every pattern ("OK PID" / "BAD PID <what>"). */
#include "wl.h"
#include <stdint.h>
#include <sys/mman.h>

#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08
#endif
#define LEN (2 << 20)

static volatile sig_atomic_t requested;
static uint8_t *maps[16];
static int nmaps;

static void on_usr1(int sig)
{
	(void)sig;
	requested = 1;
}

static void fill(int i, uint8_t *p)
{
	for (int k = 0; k < 4096; k++) {
		p[k] = (uint8_t)(i * 31 + k);
		p[LEN - 4096 + k] = (uint8_t)(i * 17 + k);
	}
}

static const char *check(void)
{
	static char bad[64];

	for (int i = 0; i < nmaps; i++)
		for (int k = 0; k < 4096; k++)
			if (maps[i][k] != (uint8_t)(i * 31 + k) || maps[i][LEN - 4096 + k] != (uint8_t)(i * 17 + k)) {
				snprintf(bad, sizeof(bad), "mapping %d byte %d", i, k);
				return bad;
			}
	return NULL;
}

static uint8_t *add(int flags, int advice)
{
	uint8_t *p = mmap(NULL, LEN, PROT_READ | PROT_WRITE, flags | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		exit(3);
	if (advice >= 0 && madvise(p, LEN, advice))
		exit(4);
	fill(nmaps, p);
	maps[nmaps++] = p;
	/* keep neighbours apart so the kernel cannot merge them */
	mmap(p + LEN, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	return p;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	int advice[] = { MADV_DONTFORK, MADV_DONTDUMP, MADV_HUGEPAGE, MADV_NOHUGEPAGE,
			 MADV_MERGEABLE, MADV_WIPEONFORK, MADV_SEQUENTIAL, MADV_RANDOM };
	uint8_t *half;

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	sigaction(SIGUSR1, &sa, NULL);
	for (unsigned i = 0; i < sizeof(advice) / sizeof(advice[0]); i++)
		add(MAP_PRIVATE, advice[i]);
	add(MAP_PRIVATE | MAP_LOCKED, -1);
	half = add(MAP_PRIVATE, -1);
	if (mlock(half, LEN / 2))
		return 5;
	add(MAP_PRIVATE | MAP_NORESERVE, -1);
	add(MAP_DROPPABLE, -1);
	wl_log("ready %d", getpid());
	wl_serve_checks(&requested, check);
}
