/* Shared and file-backed memory that a restore must refill: a MAP_SHARED|MAP_ANONYMOUS
 * area, a MAP_SHARED memfd (its fd closed, so only the mapping holds it) and a
 * MAP_PRIVATE mapping of DATA_FILE of which every other page was written
 * (copy-on-write). On SIGUSR1 it checks all three against SEED and logs "OK <pid>" or
 * "BAD <pid> <what>". usage: shmem LOG DATA_FILE SEED   (DATA_FILE is created) */
#include "wl.h"
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>

#define SHARED_BYTES (8u << 20)
#define MEMFD_BYTES (6u << 20)
#define FILE_BYTES (1u << 20)
#define PAGE 4096u

static volatile sig_atomic_t check_requested;
static uint64_t seed;
static uint64_t *shared_anon, *memfd_map, *private_file;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static uint64_t pattern(uint64_t kind, size_t i)
{
	return (kind << 60) ^ ((uint64_t)i * 0xD6E8FEB86659FD93ULL) ^ seed;
}

/* file contents: pattern 3; pages written after mapping (odd pages): pattern 4 */
static uint64_t private_expected(size_t i)
{
	size_t page = i * 8 / PAGE;

	return page % 2 ? pattern(4, i) : pattern(3, i);
}

static const char *check(void)
{
	static char what[96];

	for (size_t i = 0; i < SHARED_BYTES / 8; i++)
		if (shared_anon[i] != pattern(1, i)) {
			snprintf(what, sizeof(what), "shared anonymous word %zu", i);
			return what;
		}
	for (size_t i = 0; i < MEMFD_BYTES / 8; i++)
		if (memfd_map[i] != pattern(2, i)) {
			snprintf(what, sizeof(what), "memfd word %zu", i);
			return what;
		}
	for (size_t i = 0; i < FILE_BYTES / 8; i++)
		if (private_file[i] != private_expected(i)) {
			snprintf(what, sizeof(what), "private file mapping word %zu", i);
			return what;
		}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	uint64_t *buf;
	int fd;

	if (argc < 4) {
		fprintf(stderr, "usage: shmem LOG DATA_FILE SEED\n");
		return 2;
	}
	wl_open_log(argv[1]);
	seed = strtoull(argv[3], NULL, 0);

	shared_anon = mmap(NULL, SHARED_BYTES, PROT_READ | PROT_WRITE,
			   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared_anon == MAP_FAILED)
		return 4;
	for (size_t i = 0; i < SHARED_BYTES / 8; i++)
		shared_anon[i] = pattern(1, i);

	fd = memfd_create("wl-memfd", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, MEMFD_BYTES))
		return 4;
	memfd_map = mmap(NULL, MEMFD_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (memfd_map == MAP_FAILED)
		return 4;
	close(fd);
	for (size_t i = 0; i < MEMFD_BYTES / 8; i++)
		memfd_map[i] = pattern(2, i);

	buf = malloc(FILE_BYTES);
	for (size_t i = 0; i < FILE_BYTES / 8; i++)
		buf[i] = pattern(3, i);
	fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, buf, FILE_BYTES) != FILE_BYTES)
		return 4;
	free(buf);
	private_file = mmap(NULL, FILE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (private_file == MAP_FAILED)
		return 4;
	close(fd);
	for (size_t i = 0; i < FILE_BYTES / 8; i++)
		if ((i * 8 / PAGE) % 2)
			private_file[i] = pattern(4, i);

	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	wl_log("ready %d %p %p %p", getpid(), (void *)shared_anon, (void *)memfd_map,
	       (void *)private_file);
	wl_serve_checks(&check_requested, check);
}
