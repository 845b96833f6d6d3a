/* A tree whose tasks hold different credentials, as servers with unprivileged
 * workers do: the root stays root; worker U drops to uid 1000/1001/1002, gid
 * 2000/2001/2002 with groups 100 and 200 (losing every capability, like nginx's workers);
 * worker C stays uid 0 but keeps only a few capabilities, drops CAP_SYS_ADMIN from its
 * bounding set, sets SECBIT_NOROOT and no_new_privs, makes itself non-dumpable and
 * runs with the ADDR_NO_RANDOMIZE personality; worker T is root with a second thread that
 * alone switched to uid 3000 (credentials are per thread). All log "tick PID N" every
 * 50 ms; the root logs "ready R U C T TT" once all are set up. */
#include "wl.h"
#include <grp.h>
#include <linux/capability.h>
#include <pthread.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

static int ready_pipe[2];

static void __attribute__((noreturn)) tick(void)
{
	for (unsigned long n = 1;; n++) {
		wl_log("tick %d %lu", getpid(), n);
		wl_sleep_ms(50);
	}
}

/* role 0..3 = U, C, T, T's second thread */
static void say(long role, long v)
{
	long msg[2] = { role, v };

	if (write(ready_pipe[1], msg, sizeof(msg)) != sizeof(msg))
		exit(9);
}

static void *other_thread(void *arg)
{
	(void)arg;
	/* raw syscalls: glibc's setresuid would change every thread */
	if (syscall(SYS_setresuid, 3000, 3000, 3000))
		exit(8);
	say(3, syscall(SYS_gettid));
	for (;;)
		pause();
	return NULL;
}

int main(int argc, char **argv)
{
	long ids[4];

	if (argc < 2)
		return 2;
	wl_open_log(argv[1]);
	if (pipe(ready_pipe))
		return 3;
	if (fork() == 0) {			/* U */
		gid_t groups[] = { 100, 200 };

		if (setgroups(2, groups) || setresgid(2000, 2001, 2002) || setresuid(1000, 1001, 1002))
			exit(4);
		say(0, getpid());
		tick();
	}
	if (fork() == 0) {			/* C */
		struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
		struct __user_cap_data_struct data[2] = { { 0 } };
		unsigned keep = (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_SETUID) | (1 << CAP_CHOWN);

		if (prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0))
			exit(5);
		data[0].effective = data[0].permitted = keep;
		data[0].inheritable = 1 << CAP_CHOWN;
		if (prctl(PR_SET_SECUREBITS, 1 << 0 /* SECBIT_NOROOT */, 0, 0, 0) ||
		    syscall(SYS_capset, &hdr, data) ||
		    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) ||
		    personality(ADDR_NO_RANDOMIZE) < 0)
			exit(6);
		say(1, getpid());
		tick();
	}
	if (fork() == 0) {			/* T */
		pthread_t th;

		say(2, getpid());
		pthread_create(&th, NULL, other_thread, NULL);
		tick();
	}
	for (int i = 0; i < 4; i++) {
		long msg[2];

		if (read(ready_pipe[0], msg, sizeof(msg)) != sizeof(msg) || msg[0] < 0 || msg[0] > 3)
			return 7;
		ids[msg[0]] = msg[1];
	}
	wl_log("ready %d %ld %ld %ld %ld", getpid(), ids[0], ids[1], ids[2], ids[3]);
	tick();
}
