/* A task holding something criu-py cannot checkpoint yet, so that dump must refuse it
 * cleanly and leave the task running: "ready <pid> <fd>" then "beat <pid> <n>" every
 * 10 ms. With "grandchild" the socket is held by a grandchild: the root forks a child
 * that forks it; all three beat, and the root logs "ready <pid> <fd> <grandchild pid>".
 * usage: unsupported LOG socket|eventfd|grandchild */
#include "wl.h"
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

static void __attribute__((noreturn)) beat(void)
{
	for (unsigned long n = 1;; n++) {
		wl_log("beat %d %lu", getpid(), n);
		wl_sleep_ms(10);
	}
}

int main(int argc, char **argv)
{
	int fd = -1;

	if (argc < 3) {
		fprintf(stderr, "usage: unsupported LOG socket|eventfd|grandchild\n");
		return 2;
	}
	wl_open_log(argv[1]);
	if (!strcmp(argv[2], "socket")) {
		int sv[2];

		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
			return 4;
		fd = sv[0];
	} else if (!strcmp(argv[2], "eventfd")) {
		fd = eventfd(3, 0);
	} else if (!strcmp(argv[2], "grandchild")) {
		int sv[2], ready[2];
		pid_t gc = 0;

		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pipe(ready))
			return 4;
		if (fork() == 0) {
			if (fork() == 0) {
				gc = getpid();
				if (write(ready[1], &gc, sizeof(gc)) != sizeof(gc))
					_exit(5);
				beat();
			}
			close(sv[0]);
			close(sv[1]);
			beat();
		}
		close(sv[0]);
		close(sv[1]);
		if (read(ready[0], &gc, sizeof(gc)) != sizeof(gc))
			return 5;
		wl_log("ready %d %d %d", getpid(), sv[0], gc);
		beat();
	} else {
		fprintf(stderr, "unknown mode %s\n", argv[2]);
		return 2;
	}
	wl_log("ready %d %d", getpid(), fd);
	beat();
}
