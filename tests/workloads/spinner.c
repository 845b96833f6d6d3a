/* A task that is almost always running user code, so the dump catches it between two
 * instructions rather than in a syscall. It keeps the same sum twice: in a register
 * (loop-carried) and in memory (volatile), and every 2^24 steps compares them and logs
 * "tick <pid> <n> ok" (or "BAD <pid> <n> ..."). Any register or memory corruption, or a
 * restart of the program, shows in the log. usage: spinner LOG */
#include "wl.h"
#include <stdint.h>

static volatile uint64_t in_memory;

int main(int argc, char **argv)
{
	uint64_t in_register = 0, i = 0;

	if (argc < 2) {
		fprintf(stderr, "usage: spinner LOG\n");
		return 2;
	}
	wl_open_log(argv[1]);
	wl_log("ready %d", getpid());
	for (unsigned long n = 1;; n++) {
		for (uint64_t end = i + (1u << 24); i < end; i++) {
			in_register += i * i ^ (i >> 3);
			in_memory += i * i ^ (i >> 3);
		}
		if (in_register != in_memory) {
			wl_log("BAD %d %lu register %llx memory %llx", getpid(), n,
			       (unsigned long long)in_register, (unsigned long long)in_memory);
			return 1;
		}
		wl_log("tick %d %lu ok", getpid(), n);
	}
}
