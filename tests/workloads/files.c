/* File descriptor state a restore must keep: positions, open flags, close-on-exec, fd
 * numbers, cwd and umask. It opens (in DIR, which it makes its cwd):
 *   fd 3   "records" O_RDONLY, already read up to 4096+160 bytes. The file is 16-byte
 *          records "%015ld\n" of their own offset, so the next record read tells the
 *          position.
 *   fd 4   "out" O_WRONLY (no O_APPEND), positioned at 1000
 *   fd 5   "both" O_RDWR|O_APPEND|O_NONBLOCK, close-on-exec
 *   fd HIGH /dev/null O_WRONLY (dup2'd up high; HIGH = argv[3], default 100)
 * and sets umask 027. On SIGUSR1 it reads one record from fd 3, writes one byte on fd 4
 * and logs "report <pid> record=<record> <fd>:<pos>:<flags>:<fdflags>... cwd=<dir>
 * umask=<octal>". usage: files LOG DIR [HIGH] */
#include "wl.h"
#include <signal.h>
#include <sys/stat.h>

static volatile sig_atomic_t report_requested;
static int high_fd = 100;

static void on_usr1(int sig)
{
	(void)sig;
	report_requested = 1;
}

static void make_records(const char *name)
{
	FILE *f = fopen(name, "w");

	for (long off = 0; off < 64 * 4096; off += 16)
		fprintf(f, "%015ld\n", off);
	fclose(f);
}

static int open_at(const char *name, int flags, int want_fd)
{
	int fd = open(name, flags, 0644);

	if (fd < 0 || (fd != want_fd && (dup2(fd, want_fd) < 0 || close(fd))))
		exit(4);
	return want_fd;
}

static void report(void)
{
	const int fds[] = { 3, 4, 5, high_fd };
	char line[1024], rec[17] = "", cwd[512];
	int len, n;
	mode_t mask;

	n = read(3, rec, 16);
	rec[n > 0 ? n - 1 : 0] = 0;
	if (write(4, "x", 1) != 1)
		strcpy(rec, "write-failed");
	len = snprintf(line, sizeof(line), "report %d record=%s", getpid(), rec);
	for (unsigned i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
		len += snprintf(line + len, sizeof(line) - len, " %d:%lld:%o:%d", fds[i],
				(long long)lseek(fds[i], 0, SEEK_CUR), fcntl(fds[i], F_GETFL),
				fcntl(fds[i], F_GETFD));
	mask = umask(0);
	umask(mask);
	if (!getcwd(cwd, sizeof(cwd)))
		strcpy(cwd, "?");
	snprintf(line + len, sizeof(line) - len, " cwd=%s umask=%03o", cwd, mask);
	wl_log("%s", line);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
	char skip[4096 + 160];

	if (argc < 3) {
		fprintf(stderr, "usage: files LOG DIR [HIGH]\n");
		return 2;
	}
	if (argc > 3)
		high_fd = atoi(argv[3]);
	wl_open_log(argv[1]);
	if (wl_log_fd < 10) {	/* keep the log out of the fds under test */
		int high = fcntl(wl_log_fd, F_DUPFD_CLOEXEC, 10);

		close(wl_log_fd);
		wl_log_fd = high;
	}
	if (chdir(argv[2]))
		return 4;
	make_records("records");
	open_at("records", O_RDONLY, 3);
	if (read(3, skip, sizeof(skip)) != sizeof(skip))
		return 4;
	open_at("out", O_WRONLY | O_CREAT | O_TRUNC, 4);
	if (lseek(4, 1000, SEEK_SET) != 1000)
		return 4;
	open_at("both", O_RDWR | O_CREAT | O_APPEND | O_NONBLOCK, 5);
	fcntl(5, F_SETFD, FD_CLOEXEC);
	if (write(5, "hello\n", 6) != 6)
		return 4;
	open_at("/dev/null", O_WRONLY, high_fd);
	umask(027);
	sigaction(SIGUSR1, &sa, NULL);
	wl_log("ready %d", getpid());
	for (;;) {
		if (report_requested) {
			report_requested = 0;
			report();
		}
		wl_sleep_ms(10);
	}
}
