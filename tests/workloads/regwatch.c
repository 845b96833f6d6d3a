/* A task that checks its own registers and signal mask while dumpers are killed around
 * it (tests/test_injection_kill.py). It alternates an asm loop that holds known values in
 * fourteen general registers and compares them on every iteration (a task stopped in
 * user code), a 1 ms sleep (a task stopped in a syscall, which must be restarted), and a
 * check that its signal mask still blocks exactly SIGUSR2. Every 20 rounds it logs
 * "tick <pid> <n> ok"; any mismatch logs "BAD <pid> <what>" and exits 1. With "catch"
 * it handles SIGURG, SIGWINCH and SIGCHLD (counting them), which leaves the dumper no
 * signal to end free-running blobs with: its injection then steps from syscall to
 * syscall; a handler that runs logs "BAD <pid> signal <n>" (no one sends them).
 * usage: regwatch LOG [catch] */
#include "wl.h"
#include <signal.h>

static int registers_hold(long iterations)
{
	long bad;

	__asm__ volatile(
		"mov $0x1111111, %%rax\n\t" "mov $0x2222222, %%rbx\n\t"
		"mov $0x3333333, %%rdx\n\t" "mov $0x4444444, %%rsi\n\t"
		"mov $0x5555555, %%rdi\n\t" "mov $0x6666666, %%r8\n\t"
		"mov $0x7777777, %%r9\n\t"  "mov $-0x1234567, %%r10\n\t"
		"mov $-0x2345678, %%r11\n\t" "mov $-0x3456789, %%r12\n\t"
		"mov $-0x4567890, %%r13\n\t" "mov $-0x5678901, %%r14\n\t"
		"mov $-0x6789012, %%r15\n\t"
		"mov %[n], %%rcx\n"
		"1:\n\t"
		"cmp $0x1111111, %%rax\n\t" "jne 2f\n\t" "cmp $0x2222222, %%rbx\n\t" "jne 2f\n\t"
		"cmp $0x3333333, %%rdx\n\t" "jne 2f\n\t" "cmp $0x4444444, %%rsi\n\t" "jne 2f\n\t"
		"cmp $0x5555555, %%rdi\n\t" "jne 2f\n\t" "cmp $0x6666666, %%r8\n\t"  "jne 2f\n\t"
		"cmp $0x7777777, %%r9\n\t"  "jne 2f\n\t" "cmp $-0x1234567, %%r10\n\t" "jne 2f\n\t"
		"cmp $-0x2345678, %%r11\n\t" "jne 2f\n\t" "cmp $-0x3456789, %%r12\n\t" "jne 2f\n\t"
		"cmp $-0x4567890, %%r13\n\t" "jne 2f\n\t" "cmp $-0x5678901, %%r14\n\t" "jne 2f\n\t"
		"cmp $-0x6789012, %%r15\n\t" "jne 2f\n\t"
		"dec %%rcx\n\t" "jnz 1b\n\t"
		"xor %%eax, %%eax\n\t" "jmp 3f\n"
		"2:\n\t" "mov $1, %%eax\n"
		"3:\n\t" "mov %%rax, %[bad]\n\t"
		: [bad] "=m"(bad)
		: [n] "m"(iterations)
		: "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
		  "r13", "r14", "r15", "cc", "memory");
	return bad == 0;
}

static volatile sig_atomic_t caught_signal;

static void on_signal(int sig)
{
	caught_signal = sig;
}

int main(int argc, char **argv)
{
	sigset_t want, now;

	if (argc < 2) {
		fprintf(stderr, "usage: regwatch LOG [catch]\n");
		return 2;
	}
	wl_open_log(argv[1]);
	if (argc > 2 && !strcmp(argv[2], "catch")) {
		struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };

		sigaction(SIGURG, &sa, NULL);
		sigaction(SIGWINCH, &sa, NULL);
		sigaction(SIGCHLD, &sa, NULL);
	}
	sigemptyset(&want);
	sigaddset(&want, SIGUSR2);
	sigprocmask(SIG_SETMASK, &want, NULL);
	wl_log("ready %d", getpid());
	for (unsigned long n = 1;; n++) {
		if (!registers_hold(300000)) {
			wl_log("BAD %d registers", getpid());
			return 1;
		}
		wl_sleep_ms(1);
		sigprocmask(SIG_BLOCK, NULL, &now);
		for (int sig = 1; sig < 65; sig++) {
			if (sigismember(&now, sig) != sigismember(&want, sig)) {
				wl_log("BAD %d sigmask signal %d", getpid(), sig);
				return 1;
			}
		}
		if (caught_signal) {
			wl_log("BAD %d signal %d", getpid(), (int)caught_signal);
			return 1;
		}
		if (n % 20 == 0)
			wl_log("tick %d %lu ok", getpid(), n);
	}
}
