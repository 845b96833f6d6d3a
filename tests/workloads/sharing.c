/* What the processes of a tree share, and what they do not: the root R opens a file
 * (one offset for everyone who inherits it), a pipe, and opens the read end of another
 * pipe a second time through /proc/self/fd with O_NONBLOCK (a separate description of
 * the same pipe); then
 *   C1: fork()ed: inherits the file, the pipe and both descriptions;
 *   C2: clone(CLONE_FILES): the very same fd table as R;
 *   C3: clone(CLONE_FS): the very same cwd, root and umask as R.
 * Every 20 ms R writes "r N\n" to the file and a token down the pipe; C1 writes
 * "c N\n" to the file and reads the token; all log "tick PID N" to the log. R logs
 * "ready R C1 C2 C3 FILEFD PIPE_RD PIPE_WR Q_RD Q_RD2" once set up.
 * On SIGUSR1 to C2 it opens /dev/zero (the new fd shows up in R's table); on SIGUSR1
 * to C3 it chdirs to / (R's cwd changes); R's tokens are checked by C1 (in order). */
#include "wl.h"
#include <sched.h>
#include <sys/wait.h>

static volatile sig_atomic_t poke;
static int file_fd, pipe_fd[2], q[2], q2;
static char stack2[65536], stack3[65536];

static void on_usr1(int sig)
{
	(void)sig;
	poke = 1;
}

static void __attribute__((noreturn)) ticker(void (*each)(unsigned long))
{
	unsigned long n = 0;

	for (;;) {
		n++;
		if (each)
			each(n);
		wl_log("tick %d %lu", getpid(), n);
		wl_sleep_ms(20);
	}
}

static void root_each(unsigned long n)
{
	char line[64];
	int len = snprintf(line, sizeof(line), "r %lu\n", n);

	if (write(file_fd, line, len) != len || write(pipe_fd[1], &n, sizeof(n)) != sizeof(n))
		exit(20);
}

static unsigned long expected = 0;

static void c1_each(unsigned long n)
{
	char line[64];
	int len = snprintf(line, sizeof(line), "c %lu\n", n);
	unsigned long token;

	if (write(file_fd, line, len) != len)
		exit(21);
	while (read(pipe_fd[0], &token, sizeof(token)) == sizeof(token)) {
		if (expected && token != expected + 1)
			wl_log("BAD %d token %lu after %lu", getpid(), token, expected);
		expected = token;
	}
}

static void c2_each(unsigned long n)
{
	(void)n;
	if (poke) {
		poke = 0;
		wl_log("opened %d %d", getpid(), open("/dev/zero", O_RDONLY));
	}
}

static void c3_each(unsigned long n)
{
	(void)n;
	if (poke) {
		poke = 0;
		wl_log("chdir %d %d", getpid(), chdir("/"));
	}
}

static int c2_main(void *arg)
{
	(void)arg;
	ticker(c2_each);
}

static int c3_main(void *arg)
{
	(void)arg;
	ticker(c3_each);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	char path[64];
	pid_t c1, c2, c3;

	if (argc < 3)
		return 2;
	wl_open_log(argv[1]);
	sigaction(SIGUSR1, &sa, NULL);
	file_fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (file_fd < 0 || pipe(pipe_fd) || pipe(q))
		return 3;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", q[0]);
	q2 = open(path, O_RDONLY | O_NONBLOCK);
	if (q2 < 0)
		return 4;
	c1 = fork();
	if (c1 == 0) {
		fcntl(pipe_fd[0], F_SETFL, O_NONBLOCK);
		ticker(c1_each);
	}
	c2 = clone(c2_main, stack2 + sizeof(stack2), CLONE_FILES | SIGCHLD, NULL);
	c3 = clone(c3_main, stack3 + sizeof(stack3), CLONE_FS | SIGCHLD, NULL);
	if (c2 < 0 || c3 < 0)
		return 5;
	wl_log("ready %d %d %d %d %d %d %d %d %d", getpid(), c1, c2, c3, file_fd, pipe_fd[0],
	       pipe_fd[1], q[0], q2);
	ticker(root_each);
}
