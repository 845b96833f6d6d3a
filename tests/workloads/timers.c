/* POSIX timers and interval timers (timer ids start at 1: timer 0 is deleted again):
 *   1: CLOCK_MONOTONIC, every 100 ms, SIGRTMIN+1 to the process with sigev_value 0xabc;
 *   2: CLOCK_MONOTONIC, every 300 ms, SIGRTMIN+2 to one worker thread (SIGEV_THREAD_ID);
 *   3: CLOCK_REALTIME, once in 30 s (SIGEV_NONE); 4: CLOCK_BOOTTIME, once in 50 s (SIGEV_NONE);
 *   ITIMER_REAL every 150 ms (SIGALRM), ITIMER_VIRTUAL 200 s and ITIMER_PROF 100 s away.
 * Logs "ready <pid> <worker tid>", "rt <pid> <count> <sival hex>" every 5th timer-1
 * signal, "thread <tid> <count>" per timer-2 signal, "alrm <pid> <count>" every 5th
 * SIGALRM, and on SIGUSR1 "check <pid> t3=<ms left> t4=<ms left> virt=<s> prof=<s>
 * ids=<timer ids that timer_gettime accepts>".
 * usage: timers LOG */
#define _GNU_SOURCE
#include "wl.h"
#include <pthread.h>
#include <sys/syscall.h>
#include <sys/time.h>

static volatile sig_atomic_t rt_count, alrm_count, check_requested;
static volatile long rt_sival;
static timer_t timers[5];
static volatile pid_t worker_tid;

static void on_rt(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	rt_count++;
	rt_sival = (long)si->si_value.sival_ptr;
}

static void on_alrm(int sig)
{
	(void)sig;
	alrm_count++;
}

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static long long left_ms(timer_t t)
{
	struct itimerspec its;

	if (timer_gettime(t, &its))
		return -1;
	return its.it_value.tv_sec * 1000LL + its.it_value.tv_nsec / 1000000;
}

static void *worker(void *arg)
{
	sigset_t set;
	int n = 0;

	(void)arg;
	worker_tid = syscall(SYS_gettid);
	sigemptyset(&set);
	sigaddset(&set, SIGRTMIN + 2);
	for (;;) {
		siginfo_t si;

		if (sigwaitinfo(&set, &si) == SIGRTMIN + 2)
			wl_log("thread %ld %d", (long)syscall(SYS_gettid), ++n);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { 0 };
	struct sigevent sev = { 0 };
	struct itimerspec its = { 0 };
	struct itimerval itv = { 0 };
	pthread_t th;
	sigset_t set;
	pid_t wtid = 0;
	int last_rt = 0, last_alrm = 0;

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	sigemptyset(&set);
	sigaddset(&set, SIGRTMIN + 2);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	pthread_create(&th, NULL, worker, NULL);
	while (!(wtid = worker_tid))
		wl_sleep_ms(1);
	sa.sa_sigaction = on_rt;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGRTMIN + 1, &sa, NULL);
	signal(SIGALRM, on_alrm);
	signal(SIGUSR1, on_usr1);

	sev.sigev_notify = SIGEV_NONE;
	timer_create(CLOCK_MONOTONIC, &sev, &timers[0]);
	sev.sigev_notify = SIGEV_SIGNAL;
	sev.sigev_signo = SIGRTMIN + 1;
	sev.sigev_value.sival_ptr = (void *)0xabc;
	timer_create(CLOCK_MONOTONIC, &sev, &timers[1]);
	sev.sigev_notify = SIGEV_THREAD_ID;
	sev.sigev_signo = SIGRTMIN + 2;
	sev._sigev_un._tid = wtid;
	timer_create(CLOCK_MONOTONIC, &sev, &timers[2]);
	sev.sigev_notify = SIGEV_NONE;
	timer_create(CLOCK_REALTIME, &sev, &timers[3]);
	timer_create(CLOCK_BOOTTIME, &sev, &timers[4]);
	timer_delete(timers[0]);

	its.it_value.tv_nsec = its.it_interval.tv_nsec = 100000000;
	timer_settime(timers[1], 0, &its, NULL);
	its.it_value.tv_nsec = its.it_interval.tv_nsec = 300000000;
	timer_settime(timers[2], 0, &its, NULL);
	memset(&its, 0, sizeof(its));
	its.it_value.tv_sec = 30;
	timer_settime(timers[3], 0, &its, NULL);
	its.it_value.tv_sec = 50;
	timer_settime(timers[4], 0, &its, NULL);
	itv.it_value.tv_usec = itv.it_interval.tv_usec = 150000;
	setitimer(ITIMER_REAL, &itv, NULL);
	memset(&itv, 0, sizeof(itv));
	itv.it_value.tv_sec = 200;
	setitimer(ITIMER_VIRTUAL, &itv, NULL);
	itv.it_value.tv_sec = 100;
	setitimer(ITIMER_PROF, &itv, NULL);
	wl_log("ready %d %d", getpid(), wtid);
	for (;;) {
		if (rt_count >= last_rt + 5) {
			last_rt = rt_count;
			wl_log("rt %d %d %lx", getpid(), last_rt, rt_sival);
		}
		if (alrm_count >= last_alrm + 5) {
			last_alrm = alrm_count;
			wl_log("alrm %d %d", getpid(), last_alrm);
		}
		if (check_requested) {
			struct itimerval v, p;
			char ids[64] = "";
			int i;

			check_requested = 0;
			getitimer(ITIMER_VIRTUAL, &v);
			getitimer(ITIMER_PROF, &p);
			for (i = 0; i < 6; i++) {
				struct itimerspec x;
				size_t l = strlen(ids);

				if (syscall(SYS_timer_gettime, i, &x) == 0)
					snprintf(ids + l, sizeof(ids) - l, "%d,", i);
			}
			wl_log("check %d t3=%lld t4=%lld virt=%ld prof=%ld ids=%s", getpid(),
			       left_ms(timers[3]), left_ms(timers[4]), (long)v.it_value.tv_sec,
			       (long)p.it_value.tv_sec, ids);
		}
		wl_sleep_ms(10);
	}
}
