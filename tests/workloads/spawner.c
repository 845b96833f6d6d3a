/* A tree for the benchmarks: N processes (the root and N-1 children), each with T
 * threads, all sleeping 10 ms at a time and counting. The root logs "ready PID" once
 * every process has its threads. usage: spawner LOG N T */
#include "wl.h"
#include <pthread.h>

static volatile unsigned long count;

static void *spin(void *arg)
{
	(void)arg;
	for (;;) {
		count++;
		wl_sleep_ms(10);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int n, t, ready[2];
	char c;

	if (argc < 4)
		return 2;
	wl_open_log(argv[1]);
	n = atoi(argv[2]);
	t = atoi(argv[3]);
	if (pipe(ready))
		return 3;
	for (int i = 1; i < n; i++) {
		if (fork() == 0) {
			for (int k = 1; k < t; k++) {
				pthread_t th;

				pthread_create(&th, NULL, spin, NULL);
			}
			if (write(ready[1], "x", 1) != 1)
				return 4;
			spin(NULL);
		}
	}
	for (int k = 1; k < t; k++) {
		pthread_t th;

		pthread_create(&th, NULL, spin, NULL);
	}
	for (int i = 1; i < n; i++)
		if (read(ready[0], &c, 1) != 1)
			return 5;
	wl_log("ready %d", getpid());
	spin(NULL);
}
