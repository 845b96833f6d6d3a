/* Small helpers shared by the test workloads: a log opened O_APPEND that gets whole
 * lines in one write(2) each (so a reader never sees half a line), and a sleep that
 * survives EINTR (a restore may turn an interrupted sleep into EINTR). */
#ifndef WL_H
#define WL_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int wl_log_fd __attribute__((unused)) = -1;

static inline void wl_open_log(const char *path)
{
	wl_log_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
	if (wl_log_fd < 0) {
		perror(path);
		exit(2);
	}
}

__attribute__((format(printf, 1, 2)))
static inline void wl_log(const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	if (write(wl_log_fd, buf, n) != n)
		exit(3);
}

static inline void wl_sleep_ms(long ms)
{
	struct timespec req = { ms / 1000, (ms % 1000) * 1000000L }, rem;

	for (;;) {
		rem = req; /* if a restore reports EINTR without filling rem, sleep again in full */
		if (nanosleep(&req, &rem) == 0 || errno != EINTR)
			return;
		req = rem;
	}
}

static inline long long wl_now_ns(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The self-check loop of the workloads that verify their own state: whenever a signal
 * handler has set *requested, run check() and log "OK pid" or "BAD pid <what>". */
static inline void __attribute__((noreturn))
wl_serve_checks(volatile sig_atomic_t *requested, const char *(*check)(void))
{
	for (;;) {
		if (*requested) {
			const char *bad;

			*requested = 0;
			bad = check();
			if (bad)
				wl_log("BAD %d %s", getpid(), bad);
			else
				wl_log("OK %d", getpid());
		}
		wl_sleep_ms(10);
	}
}
#endif
