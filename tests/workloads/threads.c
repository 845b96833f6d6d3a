/* Eight worker threads, each incrementing its own counter in a shared anonymous
 * mapping, each blocked in a different way most of the time: 0-1 spin in user code,
 * 2-3 wait on a futex the main thread bumps, 4-5 block in read(2) on a pipe the main
 * thread writes to, 6-7 sleep in nanosleep. Each thread also has state of its own: a
 * name, a __thread value, a signal mask, an alternate signal stack (odd threads), a
 * nice value and a robust futex list. The main thread logs
 *   "tids PID t0 .. t7" once, then every 20 ms "tick PID c0 .. c7";
 * on SIGUSR1 every thread checks its own state (TID, name, TLS value, mask, altstack,
 * nice, robust list) and the main thread logs "OK PID" or "BAD PID <what>". */
#include "wl.h"
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#define NTHREADS 8

struct shared {
	atomic_ulong count[NTHREADS];
	atomic_int tid[NTHREADS];
	atomic_int futex_word;
	atomic_int check_gen;			/* bumped by SIGUSR1 */
	atomic_int checked[NTHREADS];		/* = check_gen once thread i checked */
	char bad[NTHREADS][128];
};

static struct shared *sh;
static int pipes[NTHREADS][2];
static __thread long tls_tag;
static char altstacks[NTHREADS][16384];

static void on_usr1(int sig)
{
	(void)sig;
	atomic_fetch_add(&sh->check_gen, 1);
}

static sigset_t thread_mask(int i)
{
	sigset_t set;

	sigemptyset(&set);
	sigaddset(&set, SIGRTMIN + i);
	sigaddset(&set, SIGUSR1);
	return set;
}

static void check_self(int i, int gen)
{
	char *bad = sh->bad[i], name[32], want[16], path[64];
	sigset_t cur, expect = thread_mask(i);
	stack_t ss;
	struct robust_list_head *head;
	size_t len;
	int fd, n;

	bad[0] = 0;
	snprintf(want, sizeof(want), "w%d", i);
	snprintf(path, sizeof(path), "/proc/self/task/%ld/comm", (long)syscall(SYS_gettid));
	fd = open(path, O_RDONLY);
	n = fd >= 0 ? read(fd, name, sizeof(name) - 1) : -1;
	if (fd >= 0)
		close(fd);
	name[n > 0 ? n - 1 : 0] = 0;
	pthread_sigmask(SIG_BLOCK, NULL, &cur);
	sigaltstack(NULL, &ss);
	syscall(SYS_get_robust_list, 0, &head, &len);
	if (syscall(SYS_gettid) != sh->tid[i])
		snprintf(bad, 128, "thread %d tid %ld want %d", i, (long)syscall(SYS_gettid), sh->tid[i]);
	else if (strcmp(name, want))
		snprintf(bad, 128, "thread %d name %s", i, name);
	else if (tls_tag != 1000 + i)
		snprintf(bad, 128, "thread %d tls %ld", i, tls_tag);
	else if (sigismember(&cur, SIGRTMIN + i) != 1 || sigismember(&cur, SIGRTMIN + (i + 1) % NTHREADS) != 0)
		snprintf(bad, 128, "thread %d signal mask", i);
	else if ((i & 1) && (ss.ss_sp != altstacks[i] || ss.ss_size != sizeof(altstacks[i])))
		snprintf(bad, 128, "thread %d altstack %p", i, ss.ss_sp);
	else if (!(i & 1) && !(ss.ss_flags & SS_DISABLE))
		snprintf(bad, 128, "thread %d altstack enabled", i);
	else if (getpriority(PRIO_PROCESS, syscall(SYS_gettid)) != i % 5)
		snprintf(bad, 128, "thread %d nice %d", i, getpriority(PRIO_PROCESS, syscall(SYS_gettid)));
	else if (head == NULL)
		snprintf(bad, 128, "thread %d robust list gone", i);
	atomic_store(&sh->checked[i], gen);
}

static void *worker(void *arg)
{
	int i = (int)(long)arg, seen = atomic_load(&sh->check_gen);
	sigset_t mask = thread_mask(i);
	char name[16];

	tls_tag = 1000 + i;
	snprintf(name, sizeof(name), "w%d", i);
	prctl(PR_SET_NAME, name);
	pthread_sigmask(SIG_SETMASK, &mask, NULL);
	if (i & 1) {
		stack_t ss = { .ss_sp = altstacks[i], .ss_size = sizeof(altstacks[i]) };
		sigaltstack(&ss, NULL);
	}
	setpriority(PRIO_PROCESS, syscall(SYS_gettid), i % 5);
	atomic_store(&sh->tid[i], syscall(SYS_gettid));
	for (;;) {
		int gen = atomic_load(&sh->check_gen);
		char c;

		if (gen != seen) {
			seen = gen;
			check_self(i, gen);
		}
		switch (i / 2) {
		case 0:		/* spin */
			for (volatile int k = 0; k < 100000; k++)
				;
			break;
		case 1: {	/* futex wait */
			int v = atomic_load(&sh->futex_word);

			syscall(SYS_futex, &sh->futex_word, FUTEX_WAIT, v, NULL, NULL, 0);
			break;
		}
		case 2:		/* read */
			if (read(pipes[i][0], &c, 1) != 1 && errno != EINTR)
				return NULL;
			break;
		default:
			wl_sleep_ms(5);
		}
		atomic_fetch_add(&sh->count[i], 1);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	pthread_t th[NTHREADS];
	int i, last_gen = 0;

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		return 4;
	sigaction(SIGUSR1, &sa, NULL);
	for (i = 0; i < NTHREADS; i++) {
		if (pipe(pipes[i]))
			return 5;
		pthread_create(&th[i], NULL, worker, (void *)(long)i);
	}
	for (i = 0; i < NTHREADS; i++)
		while (!atomic_load(&sh->tid[i]))
			wl_sleep_ms(1);
	wl_log("tids %d %d %d %d %d %d %d %d %d", getpid(), sh->tid[0], sh->tid[1], sh->tid[2],
	       sh->tid[3], sh->tid[4], sh->tid[5], sh->tid[6], sh->tid[7]);
	for (;;) {
		int gen = atomic_load(&sh->check_gen);

		for (int k = 0; k < 2; k++) {
			atomic_fetch_add(&sh->futex_word, 1);
			syscall(SYS_futex, &sh->futex_word, FUTEX_WAKE, NTHREADS, NULL, NULL, 0);
			for (i = 4; i < 6; i++)
				if (write(pipes[i][1], "x", 1) != 1)
					return 6;
			wl_sleep_ms(10);
		}
		wl_log("tick %d %lu %lu %lu %lu %lu %lu %lu %lu", getpid(), sh->count[0], sh->count[1],
		       sh->count[2], sh->count[3], sh->count[4], sh->count[5], sh->count[6], sh->count[7]);
		if (gen != last_gen) {
			int done = 1;

			for (i = 0; i < NTHREADS; i++)
				done &= atomic_load(&sh->checked[i]) == gen;
			if (done) {
				const char *bad = NULL;

				for (i = 0; i < NTHREADS && !bad; i++)
					if (sh->bad[i][0])
						bad = sh->bad[i];
				if (bad)
					wl_log("BAD %d %s", getpid(), bad);
				else
					wl_log("OK %d", getpid());
				last_gen = gen;
			}
		}
	}
}
