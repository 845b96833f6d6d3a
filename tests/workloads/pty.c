/* A program in a pseudo-terminal, the way script or a terminal multiplexer runs one.
 * The parent opens a pty (packet mode on, window 33x111) and a second one it leaves
 * locked; the child makes the first one's slave its controlling terminal in a session
 * of its own, turns echo off and reads lines from it. Every 200 ms the parent writes
 * "ping N" into the master; the child logs per line
 *   "got <pid> <line> rows=<r> cols=<c> echo=<0|1> fg=<1 if it is the foreground group>"
 * and the parent, on SIGUSR1, "pcheck <pid> pkt=<packet mode> locked=<lock of pty 2>".
 * Logs "ready <pid> <child pid> <index>" first.
 * usage: pty LOG */
#include "wl.h"
#include <sys/ioctl.h>
#include <termios.h>

static volatile sig_atomic_t check_requested;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static void child_main(int master)
{
	char line[256], name[64];
	struct termios t;
	int slave;
	FILE *in;

	snprintf(name, sizeof(name), "%s", ptsname(master));
	close(master);
	setsid();
	slave = open(name, O_RDWR);	/* becomes the controlling terminal */
	if (slave < 0)
		_exit(4);
	tcgetattr(slave, &t);
	t.c_lflag &= ~ECHO;
	tcsetattr(slave, TCSANOW, &t);
	dup2(slave, 0);
	dup2(slave, 1);
	if (slave > 1)
		close(slave);
	in = fdopen(0, "r");
	while (fgets(line, sizeof(line), in)) {
		struct winsize ws;

		line[strcspn(line, "\r\n")] = 0;
		ioctl(0, TIOCGWINSZ, &ws);
		tcgetattr(0, &t);
		wl_log("got %d %s rows=%d cols=%d echo=%d fg=%d", getpid(), line, ws.ws_row, ws.ws_col,
		       !!(t.c_lflag & ECHO), tcgetpgrp(0) == getpgrp());
	}
	wl_log("eof %d", getpid());
	_exit(0);
}

int main(int argc, char **argv)
{
	struct winsize ws = { .ws_row = 33, .ws_col = 111 };
	int master, locked, one = 1, index, n = 0;
	pid_t child;

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	signal(SIGUSR1, on_usr1);
	master = posix_openpt(O_RDWR | O_NOCTTY);
	if (master < 0 || grantpt(master) || unlockpt(master))
		return 4;
	ioctl(master, TIOCGPTN, &index);
	ioctl(master, TIOCSWINSZ, &ws);
	locked = posix_openpt(O_RDWR | O_NOCTTY);	/* never unlocked */
	child = fork();
	if (child == 0)
		child_main(master);
	wl_sleep_ms(100);
	ioctl(master, TIOCPKT, &one);
	fcntl(master, F_SETFL, O_NONBLOCK);
	wl_log("ready %d %d %d", getpid(), child, index);
	for (;;) {
		char buf[512], msg[64];
		int len;

		while (read(master, buf, sizeof(buf)) > 0)
			;			/* drain what the child's terminal outputs */
		len = snprintf(msg, sizeof(msg), "ping %d\n", ++n);
		if (write(master, msg, len) != len)
			wl_log("write failed %d", errno);
		if (check_requested) {
			int pkt = -1, lck = -1;

			check_requested = 0;
			ioctl(master, TIOCGPKT, &pkt);
			ioctl(locked, TIOCGPTLCK, &lck);
			wl_log("pcheck %d pkt=%d locked=%d", getpid(), pkt, lck);
		}
		wl_sleep_ms(200);
	}
}
