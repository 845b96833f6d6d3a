/* Memory, pipe, heap and signal state that a restore must bring back bit for bit:
 * SIZE_MIB of patterned private anonymous memory, bytes left unread in a pipe, a heap
 * string, a SIGUSR1 handler (with flags and mask) and a blocked SIGUSR2. On SIGUSR1 it
 * checks all of it against values recomputed from SEED and logs "OK <pid>" or
 * "BAD <pid> <what>"; the pipe data is put back so the check can be repeated.
 * usage: memhog LOG SIZE_MIB SEED [PIPE_BYTES (default 3000, at most 65536)] */
#include "wl.h"
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>

static volatile sig_atomic_t check_requested;
static uint64_t *area;
static size_t area_words;
static char *heap_string;
static int pipe_fds[2];
static uint64_t seed;
static int pipe_bytes = 3000;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static uint64_t word_at(size_t i)
{
	return ((uint64_t)i + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
}

static void pipe_pattern(unsigned char *buf)
{
	for (int i = 0; i < pipe_bytes; i++)
		buf[i] = (unsigned char)(i * 7 + seed);
}

static void heap_expected(char *buf, size_t len)
{
	snprintf(buf, len, "heap string of pid %d seeded %llu", getpid(),
		 (unsigned long long)seed);
}

static const char *check(void)
{
	static char what[128];
	static unsigned char *want, *got;
	char heap_want[128];
	struct sigaction sa;
	sigset_t mask;
	ssize_t n;

	for (size_t i = 0; i < area_words; i++)
		if (area[i] != word_at(i)) {
			snprintf(what, sizeof(what), "memory word %zu", i);
			return what;
		}
	heap_expected(heap_want, sizeof(heap_want));
	if (strcmp(heap_string, heap_want))
		return "heap string";
	if (sigaction(SIGUSR1, NULL, &sa) || sa.sa_handler != on_usr1 ||
	    !(sa.sa_flags & SA_RESTART) || !sigismember(&sa.sa_mask, SIGHUP))
		return "sigaction";
	sigprocmask(SIG_BLOCK, NULL, &mask);
	if (!sigismember(&mask, SIGUSR2))
		return "blocked mask";
	if (!want) {
		want = malloc(pipe_bytes);
		got = malloc(pipe_bytes + 1);
	}
	pipe_pattern(want);
	n = read(pipe_fds[0], got, pipe_bytes + 1);
	if (n > 0 && write(pipe_fds[1], got, n) != n)
		return "pipe refill";
	if (n != pipe_bytes) {
		snprintf(what, sizeof(what), "pipe holds %zd bytes", n);
		return what;
	}
	if (memcmp(got, want, pipe_bytes))
		return "pipe data";
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	unsigned char *data;
	char heap_want[128];
	sigset_t block;
	size_t bytes;

	if (argc < 4) {
		fprintf(stderr, "usage: memhog LOG SIZE_MIB SEED [PIPE_BYTES]\n");
		return 2;
	}
	wl_open_log(argv[1]);
	bytes = (size_t)atol(argv[2]) << 20;
	seed = strtoull(argv[3], NULL, 0);
	if (argc > 4)
		pipe_bytes = atoi(argv[4]);	/* up to 65536, the default pipe size */

	area = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		return 4;
	area_words = bytes / sizeof(uint64_t);
	for (size_t i = 0; i < area_words; i++)
		area[i] = word_at(i);

	heap_expected(heap_want, sizeof(heap_want));
	heap_string = malloc(strlen(heap_want) + 1);
	strcpy(heap_string, heap_want);

	if (pipe(pipe_fds))
		return 4;
	fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK);
	data = malloc(pipe_bytes);
	pipe_pattern(data);
	if (write(pipe_fds[1], data, pipe_bytes) != pipe_bytes)
		return 4;
	free(data);

	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGHUP);
	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&block);
	sigaddset(&block, SIGUSR2);
	sigprocmask(SIG_BLOCK, &block, NULL);

	wl_log("ready %d", getpid());
	wl_serve_checks(&check_requested, check);
}
