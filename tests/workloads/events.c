/* Event fds, the way event loops hold them: an epoll ("outer") watching another epoll
 * ("inner") that watches an eventfd (added under an fd number since closed: the file
 * lives on in a dup), a pipe, a periodic timerfd and a signalfd for SIGUSR2; besides
 * them a semaphore eventfd holding 5, a one-shot timerfd that fired and was never read,
 * a one-shot CLOCK_BOOTTIME_ALARM timerfd 60 s away and an ABSTIME CLOCK_REALTIME one
 * 40 s away. A forked child blocks reading an eventfd it inherited; a CLONE_FILES child
 * waits in its own epoll (in the shared fd table) on another eventfd.
 * Logs "ready <pid> k=v ..." (fd numbers), then per event:
 *   "tick <pid> <expirations> <monotonic ms>" for the periodic timerfd (every 200 ms),
 *   "pipe <pid> <data hex> <text>", "efd <pid> <data hex> <count>",
 *   "child <pid> <count>" and "cfchild <pid> <data hex> <count>",
 * and on SIGUSR2 (through the signalfd) "check <pid> <data hex> sem=<reads of the
 * semaphore eventfd> fired=<ticks of the fired timer> alarm=<ms left> abs=<ms left>".
 * usage: events LOG */
#define _GNU_SOURCE
#include "wl.h"
#include <sched.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <sys/wait.h>

static int cf_epoll_efd;

static long long left_ms(int fd)
{
	struct itimerspec its;

	timerfd_gettime(fd, &its);
	return its.it_value.tv_sec * 1000LL + its.it_value.tv_nsec / 1000000;
}

static int cf_child(void *arg)
{
	int ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 0xcf };

	(void)arg;
	epoll_ctl(ep, EPOLL_CTL_ADD, cf_epoll_efd, &ev);
	wl_log("cfready %d %d", getpid(), ep);
	for (;;) {
		struct epoll_event got;
		uint64_t n;

		if (epoll_wait(ep, &got, 1, -1) != 1)
			continue;
		if (read(cf_epoll_efd, &n, 8) == 8)
			wl_log("cfchild %d %llx %llu", getpid(), (unsigned long long)got.data.u64,
			       (unsigned long long)n);
	}
	return 0;
}

int main(int argc, char **argv)
{
	int sem, efd, efd_dup, p[2], tick, fired, alarm_fd, abs_fd, sfd, inner, outer;
	int child_efd, cf_efd;
	struct epoll_event ev;
	struct itimerspec its = { 0 };
	struct timespec now;
	sigset_t mask;
	pid_t child, cf;
	static char stack[64 * 1024];

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	sem = eventfd(5, EFD_SEMAPHORE | EFD_NONBLOCK);
	efd = eventfd(0, EFD_NONBLOCK);
	if (pipe2(p, O_NONBLOCK))
		return 4;
	tick = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	its.it_value.tv_nsec = its.it_interval.tv_nsec = 200000000;
	timerfd_settime(tick, 0, &its, NULL);
	fired = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	memset(&its, 0, sizeof(its));
	its.it_value.tv_nsec = 1000000;
	timerfd_settime(fired, 0, &its, NULL);
	alarm_fd = timerfd_create(CLOCK_BOOTTIME_ALARM, TFD_NONBLOCK);
	memset(&its, 0, sizeof(its));
	its.it_value.tv_sec = 60;
	timerfd_settime(alarm_fd, 0, &its, NULL);
	abs_fd = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
	clock_gettime(CLOCK_REALTIME, &now);
	memset(&its, 0, sizeof(its));
	its.it_value.tv_sec = now.tv_sec + 40;
	its.it_value.tv_nsec = now.tv_nsec;
	timerfd_settime(abs_fd, TFD_TIMER_ABSTIME, &its, NULL);
	sigemptyset(&mask);
	sigaddset(&mask, SIGUSR2);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);

	inner = epoll_create1(0);
	ev.events = EPOLLIN;
	ev.data.u64 = 0xe1;
	epoll_ctl(inner, EPOLL_CTL_ADD, efd, &ev);
	efd_dup = dup(efd);		/* the item keeps the old number: closed below */
	close(efd);
	ev.data.u64 = 0x91;
	epoll_ctl(inner, EPOLL_CTL_ADD, p[0], &ev);
	ev.data.u64 = 0x71;
	epoll_ctl(inner, EPOLL_CTL_ADD, tick, &ev);
	ev.data.u64 = 0x5f;
	epoll_ctl(inner, EPOLL_CTL_ADD, sfd, &ev);
	outer = epoll_create1(EPOLL_CLOEXEC);
	ev.data.u64 = 0x0e;
	epoll_ctl(outer, EPOLL_CTL_ADD, inner, &ev);

	child_efd = eventfd(0, 0);
	child = fork();
	if (child == 0) {
		for (;;) {
			uint64_t n;

			if (read(child_efd, &n, 8) == 8)
				wl_log("child %d %llu", getpid(), (unsigned long long)n);
		}
	}
	cf_efd = eventfd(0, EFD_NONBLOCK);
	cf_epoll_efd = cf_efd;
	cf = clone(cf_child, stack + sizeof(stack), CLONE_FILES | SIGCHLD, NULL);
	if (cf < 0)
		return 5;
	wl_sleep_ms(50);
	wl_log("ready %d sem=%d efd=%d efdclosed=%d pipe=%d tick=%d fired=%d alarm=%d abs=%d "
	       "sfd=%d inner=%d outer=%d child=%d childefd=%d cf=%d cfefd=%d", getpid(), sem,
	       efd_dup, efd, p[1], tick, fired, alarm_fd, abs_fd, sfd, inner, outer, child,
	       child_efd, cf, cf_efd);
	for (;;) {
		struct epoll_event o, in[8];
		int n, i;

		if (epoll_wait(outer, &o, 1, -1) != 1)
			continue;
		n = epoll_wait(inner, in, 8, 0);
		for (i = 0; i < n; i++) {
			unsigned long long data = in[i].data.u64;
			uint64_t v;
			char buf[256];
			ssize_t got;

			if (data == 0x71 && read(tick, &v, 8) == 8) {
				wl_log("tick %d %llu %lld", getpid(), (unsigned long long)v,
				       wl_now_ns(CLOCK_MONOTONIC) / 1000000);
			} else if (data == 0xe1 && read(efd_dup, &v, 8) == 8) {
				wl_log("efd %d %llx %llu", getpid(), data, (unsigned long long)v);
			} else if (data == 0x91 && (got = read(p[0], buf, sizeof(buf) - 1)) > 0) {
				buf[got] = 0;
				wl_log("pipe %d %llx %s", getpid(), data, buf);
			} else if (data == 0x5f) {
				struct signalfd_siginfo si;
				char sems[64] = "";
				uint64_t ticks = 0;

				if (read(sfd, &si, sizeof(si)) != sizeof(si))
					continue;
				for (;;) {
					size_t l = strlen(sems);

					if (read(sem, &v, 8) != 8) {
						snprintf(sems + l, sizeof(sems) - l, "EAGAIN");
						break;
					}
					snprintf(sems + l, sizeof(sems) - l, "%llu,", (unsigned long long)v);
				}
				if (read(fired, &ticks, 8) != 8)
					ticks = 0;
				wl_log("check %d %llx sig=%u sem=%s fired=%llu alarm=%lld abs=%lld", getpid(),
				       data, si.ssi_signo, sems, (unsigned long long)ticks,
				       left_ms(alarm_fd), left_ms(abs_fd));
			}
		}
	}
}
