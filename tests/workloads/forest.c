/* A process tree with everything a tree restore must rebuild: 3 levels below the root,
 * more than 20 processes, several process groups, a second session, a zombie, a
 * session whose leader has exited and a process group whose leader has exited (both
 * orphaned: their members were reparented to the root, a child subreaper).
 *
 *   root R (session and group leader, child subreaper)
 *   |- A1 (R's group): B1a, B1b, each with two children (C); zombie Z (exit 7, unreaped)
 *   |- A2 (own group): B2a, B2b in A2's group, B2c in a group of its own, B2c's child
 *   |- A3 (setsid: a second session): B3a, B3b, B3b's child
 *   |- A4: its child X made group X, forked Y1, Y2 into it and exited (A4 reaped it):
 *   |      Y1, Y2 now children of R, in group X which has no leader
 *   `- L (setsid, then exited; R reaped it): M1, M2 now children of R, session L
 *
 * Every live process logs "tick PID N" every 100 ms (N counts in its memory). R logs
 * "ready R" once everything is set up. On SIGUSR2, A1 reaps its zombie and logs
 * "reaped ZPID STATUS". */
#include "wl.h"
#include <sys/prctl.h>
#include <sys/wait.h>

static volatile sig_atomic_t reap_request;
static pid_t zombie;

static void on_usr2(int sig)
{
	(void)sig;
	reap_request = 1;
}

static void __attribute__((noreturn)) live(void)
{
	unsigned long n = 0;

	for (;;) {
		if (reap_request && zombie) {
			int st = 0;
			pid_t r;

			reap_request = 0;
			r = waitpid(zombie, &st, 0);
			wl_log("reaped %d %d", (int)r, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
		}
		wl_log("tick %d %lu", getpid(), ++n);
		wl_sleep_ms(100);
	}
}

/* fork a child that runs fn (if any) then lives */
static pid_t spawn(void (*fn)(void))
{
	pid_t p = fork();

	if (p < 0)
		exit(10);
	if (p == 0) {
		if (fn)
			fn();
		live();
	}
	return p;
}

static void with_two_children(void)
{
	spawn(NULL);
	spawn(NULL);
}

static void own_group_with_child(void)
{
	setpgid(0, 0);
	spawn(NULL);
}

static void a1(void)
{
	struct sigaction sa = { .sa_handler = on_usr2 };

	sigaction(SIGUSR2, &sa, NULL);
	spawn(with_two_children);
	spawn(with_two_children);
	zombie = fork();
	if (zombie == 0)
		_exit(7);
}

static void a2(void)
{
	setpgid(0, 0);
	spawn(NULL);
	spawn(NULL);
	spawn(own_group_with_child);
}

static void a3(void)
{
	setsid();
	spawn(NULL);
	spawn(with_two_children);
}

static void a4(void)
{
	pid_t x = fork();

	if (x == 0) {
		setpgid(0, 0);
		spawn(NULL);
		spawn(NULL);
		_exit(0);
	}
	waitpid(x, NULL, 0);
}

int main(int argc, char **argv)
{
	pid_t l;

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	spawn(a1);
	spawn(a2);
	spawn(a3);
	spawn(a4);
	l = fork();
	if (l == 0) {
		setsid();
		spawn(NULL);
		spawn(NULL);
		_exit(0);
	}
	waitpid(l, NULL, 0);
	wl_sleep_ms(300);		/* everyone forked and settled */
	/* the orphans came to us: reap nothing else (Z is A1's, kept) */
	wl_log("ready %d", getpid());
	live();
}
