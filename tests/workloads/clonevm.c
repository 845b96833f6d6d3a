/* A child made with clone(CLONE_VM | CLONE_SIGHAND): it runs in its parent's memory
 * and shares its signal handlers, both running at once (as LinuxThreads did). The root
 * R forks P; P clones K. P and K each count in the shared memory and log "tick PID N"
 * every 50 ms; on SIGUSR2 K installs a handler for SIGURG (which P then has too) and
 * logs "installed K". R logs "ready R P K". */
#include "wl.h"
#include <sched.h>

static volatile unsigned long counts[2];
static volatile sig_atomic_t install;
static char kstack[1 << 16];

static void on_usr2(int sig)
{
	(void)sig;
	install = 1;
}

static void on_urg(int sig)
{
	(void)sig;
}

static int k_main(void *arg)
{
	(void)arg;
	for (;;) {
		if (install) {
			struct sigaction sa = { .sa_handler = on_urg };

			install = 0;
			sigaction(SIGURG, &sa, NULL);
			wl_log("installed %d", getpid());
		}
		wl_log("tick %d %lu", getpid(), ++counts[1]);
		wl_sleep_ms(50);
	}
	return 0;
}

int main(int argc, char **argv)
{
	int p[2];
	pid_t pp, k;

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	if (pipe(p))
		return 3;
	pp = fork();
	if (pp == 0) {
		struct sigaction sa = { .sa_handler = on_usr2 };

		sigaction(SIGUSR2, &sa, NULL);
		k = clone(k_main, kstack + sizeof(kstack), CLONE_VM | CLONE_SIGHAND | SIGCHLD, NULL);
		if (k < 0 || write(p[1], &k, sizeof(k)) != sizeof(k))
			_exit(4);
		for (;;) {
			wl_log("tick %d %lu", getpid(), ++counts[0]);
			wl_sleep_ms(50);
		}
	}
	if (read(p[0], &k, sizeof(k)) != sizeof(k))
		return 5;
	wl_sleep_ms(120);
	wl_log("ready %d %d %d", getpid(), pp, k);
	for (;;)
		pause();
}
