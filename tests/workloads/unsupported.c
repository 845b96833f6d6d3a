/* A task holding something criu-py cannot checkpoint yet, so that dump must refuse it
 * cleanly and leave the task running: "ready <pid> <fd>" then "beat <pid> <n>" every
 * 10 ms. "socket" is a packet socket (AF_PACKET; unix and inet sockets are supported).
 * With "grandchild" the socket is held by a grandchild: the root forks a child
 * that forks it; all three beat, and the root logs "ready <pid> <fd> <grandchild pid>".
 * io_uring, perf_event and bpf-map hold an io_uring instance, a perf event counter and
 * a BPF array map.
 * usage: unsupported LOG socket|io_uring|perf_event|bpf-map|grandchild */
#include "wl.h"
#include <linux/bpf.h>
#include <linux/io_uring.h>
#include <linux/perf_event.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/syscall.h>

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
		fprintf(stderr, "usage: unsupported LOG socket|io_uring|perf_event|bpf-map|grandchild\n");
		return 2;
	}
	wl_open_log(argv[1]);
	if (!strcmp(argv[2], "socket")) {
		fd = socket(AF_PACKET, SOCK_DGRAM, 0);
	} else if (!strcmp(argv[2], "io_uring")) {
		struct io_uring_params p;

		memset(&p, 0, sizeof(p));
		fd = syscall(__NR_io_uring_setup, 4, &p);
	} else if (!strcmp(argv[2], "perf_event")) {
		struct perf_event_attr attr;

		memset(&attr, 0, sizeof(attr));
		attr.size = sizeof(attr);
		attr.type = PERF_TYPE_SOFTWARE;
		attr.config = PERF_COUNT_SW_TASK_CLOCK;
		fd = syscall(__NR_perf_event_open, &attr, 0, -1, -1, 0);
	} else if (!strcmp(argv[2], "bpf-map")) {
		union bpf_attr attr;

		memset(&attr, 0, sizeof(attr));
		attr.map_type = BPF_MAP_TYPE_ARRAY;
		attr.key_size = 4;
		attr.value_size = 8;
		attr.max_entries = 4;
		fd = syscall(__NR_bpf, BPF_MAP_CREATE, &attr, sizeof(attr));
	} else if (!strcmp(argv[2], "grandchild")) {
		int sk, ready[2];
		pid_t gc = 0;

		sk = socket(AF_PACKET, SOCK_DGRAM, 0);
		if (sk < 0 || pipe(ready))
			return 4;
		if (fork() == 0) {
			if (fork() == 0) {
				gc = getpid();
				if (write(ready[1], &gc, sizeof(gc)) != sizeof(gc))
					_exit(5);
				beat();
			}
			close(sk);
			beat();
		}
		close(sk);
		if (read(ready[0], &gc, sizeof(gc)) != sizeof(gc))
			return 5;
		wl_log("ready %d %d %d", getpid(), sk, gc);
		beat();
	} else {
		fprintf(stderr, "unknown mode %s\n", argv[2]);
		return 2;
	}
	if (fd < 0) {
		perror(argv[2]);
		return 4;
	}
	wl_log("ready %d %d", getpid(), fd);
	beat();
}
