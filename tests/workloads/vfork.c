/* A vfork()ed child: the root R forks H, H vfork()s V. V runs in H's memory, on H's
 * stack, while H sleeps in vfork() until V exits; V logs "tick PID N" every 50 ms (N in
 * the memory V shares with H) and exits with status 3 on SIGUSR1; H then logs
 * "back H V STATUS". R logs "ready R H V" once V ticks, then ticks itself. */
#include "wl.h"
#include <sys/wait.h>

static volatile sig_atomic_t quit;
static volatile unsigned long v_count;

static void on_usr1(int sig)
{
	(void)sig;
	quit = 1;
}

int main(int argc, char **argv)
{
	int p[2];
	pid_t h, v;

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	if (pipe(p))
		return 3;
	h = fork();
	if (h == 0) {
		int st = 0;

		close(p[0]);
		v = vfork();
		if (v == 0) {
			struct sigaction sa = { .sa_handler = on_usr1 };
			pid_t me = getpid();

			sigaction(SIGUSR1, &sa, NULL);
			if (write(p[1], &me, sizeof(me)) != sizeof(me))
				_exit(9);
			while (!quit) {
				wl_log("tick %d %lu", (int)me, ++v_count);
				wl_sleep_ms(50);
			}
			_exit(3);
		}
		waitpid(v, &st, 0);
		wl_log("back %d %d %d", getpid(), (int)v, WEXITSTATUS(st));
		for (;;)
			pause();
	}
	close(p[1]);
	if (read(p[0], &v, sizeof(v)) != sizeof(v))
		return 4;
	wl_sleep_ms(120);
	wl_log("ready %d %d %d", getpid(), (int)h, (int)v);
	for (unsigned long n = 1;; n++) {
		wl_log("tick %d %lu", getpid(), n);
		wl_sleep_ms(50);
	}
}
