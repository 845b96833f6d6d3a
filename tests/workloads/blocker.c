/* A task that spends its life blocked in a syscall, to check that a restore resumes
 * the interrupted syscall correctly.
 *   blocker LOG read          blocks in read(2) on a pipe it made itself (both ends
 *                             open: "ready <pid> <read_fd> <write_fd>"); whatever
 *                             arrives is logged as "got <pid> <text>". A read that
 *                             fails is logged as "readerr <pid> ..." (never expected).
 *   blocker LOG sleep-abs MS  clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) on the
 *                             grid t0 + n*MS: "tick <pid> <n> <deadline_ns> <woke_ns>".
 *   blocker LOG sleep-rel MS  relative nanosleep(MS) in a loop, same log format with
 *                             deadline 0. */
#include "wl.h"

static int do_read(void)
{
	int fds[2];
	char buf[4096];

	if (pipe(fds))
		return 4;
	wl_log("ready %d %d %d", getpid(), fds[0], fds[1]);
	for (;;) {
		ssize_t n = read(fds[0], buf, sizeof(buf) - 1);

		if (n <= 0) {
			wl_log("readerr %d %zd %s", getpid(), n, n ? strerror(errno) : "eof");
			if (n == 0)
				return 1;
			continue;
		}
		while (n > 0 && buf[n - 1] == '\n')
			n--;
		buf[n] = 0;
		wl_log("got %d %s", getpid(), buf);
	}
}

static int do_sleep(int absolute, long period_ms)
{
	long long t0 = wl_now_ns(CLOCK_MONOTONIC), deadline = 0;

	wl_log("ready %d", getpid());
	for (long n = 1;; n++) {
		if (absolute) {
			struct timespec ts;

			deadline = t0 + n * period_ms * 1000000LL;
			ts.tv_sec = deadline / 1000000000LL;
			ts.tv_nsec = deadline % 1000000000LL;
			while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
				;
		} else {
			wl_sleep_ms(period_ms);
		}
		wl_log("tick %d %ld %lld %lld", getpid(), n, deadline, wl_now_ns(CLOCK_MONOTONIC));
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: blocker LOG read|sleep-abs MS|sleep-rel MS\n");
		return 2;
	}
	wl_open_log(argv[1]);
	if (!strcmp(argv[2], "read"))
		return do_read();
	if (argc > 3 && !strcmp(argv[2], "sleep-abs"))
		return do_sleep(1, atol(argv[3]));
	if (argc > 3 && !strcmp(argv[2], "sleep-rel"))
		return do_sleep(0, atol(argv[3]));
	fprintf(stderr, "unknown mode %s\n", argv[2]);
	return 2;
}
