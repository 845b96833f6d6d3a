/* A task holding something criu-py cannot checkpoint yet, so that dump must refuse it
 * cleanly and leave the task running: "ready <pid> <fd>" then "beat <pid> <n>" every
 * 10 ms. usage: unsupported LOG socket|eventfd|thread */
#include "wl.h"
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

static void *idle_thread(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return NULL;
}

int main(int argc, char **argv)
{
	int fd = -1;

	if (argc < 3) {
		fprintf(stderr, "usage: unsupported LOG socket|eventfd|thread\n");
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
	} else if (!strcmp(argv[2], "thread")) {
		pthread_t t;

		if (pthread_create(&t, NULL, idle_thread, NULL))
			return 4;
	} else {
		fprintf(stderr, "unknown mode %s\n", argv[2]);
		return 2;
	}
	wl_log("ready %d %d", getpid(), fd);
	for (unsigned long n = 1;; n++) {
		wl_log("beat %d %lu", getpid(), n);
		wl_sleep_ms(10);
	}
}
