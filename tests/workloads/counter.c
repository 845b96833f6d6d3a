/* The sample process: appends "<pid> <count>" to a log every 10 ms; the
 * count lives only in memory, so after a restore the next line must be the dumped
 * count + 1 from the same PID. SIGTERM makes it log "<pid> exit" and exit with
 * status 5 (to check that `restore` without -d exits with the task's status). */
#include "wl.h"
#include <signal.h>

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
	(void)sig;
	stop = 1;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_term };
	long period_ms = argc > 2 ? atol(argv[2]) : 10;
	unsigned long count = 0;

	if (argc < 2) {
		fprintf(stderr, "usage: counter LOG [PERIOD_MS]\n");
		return 2;
	}
	wl_open_log(argv[1]);
	sigaction(SIGTERM, &sa, NULL);
	while (!stop) {
		count++;
		wl_log("%d %lu", getpid(), count);
		wl_sleep_ms(period_ms);
	}
	wl_log("%d exit", getpid());
	return 5;
}
