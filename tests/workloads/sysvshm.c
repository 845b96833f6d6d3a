/* SysV shared memory: segment A (IPC_PRIVATE, 3 pages + 100 bytes, a pattern) removed
 * with IPC_RMID while attached, so it ends with its users; segment B (key argv[2], two
 * pages) that outlives them, attached by this process and, inherited, by a child.
 * Logs "ready <pid> <child> <A id> <A addr hex> <B id> <B addr hex>"; on SIGUSR1 each
 * process logs "check <pid> A=<ok|bad> B=<first bytes of B>" and then writes
 * "B written by <pid>" into B.
 * usage: sysvshm LOG KEY */
#include "wl.h"
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define A_SIZE (3 * 4096 + 100)

static volatile sig_atomic_t check_requested;
static unsigned char *a, *b;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static void serve(void)
{
	for (;;) {
		if (check_requested) {
			int i, ok = 1;

			check_requested = 0;
			for (i = 0; i < A_SIZE; i++)
				ok &= a[i] == (unsigned char)(i * 7 + 3);
			wl_log("check %d A=%s B=%.24s", getpid(), ok ? "ok" : "bad", (char *)b);
			snprintf((char *)b, 64, "B written by %d", getpid());
		}
		wl_sleep_ms(10);
	}
}

int main(int argc, char **argv)
{
	int ida, idb, i;
	pid_t child;

	if (argc < 3)
		return 2;
	wl_open_log(argv[1]);
	signal(SIGUSR1, on_usr1);
	ida = shmget(IPC_PRIVATE, A_SIZE, IPC_CREAT | 0600);
	idb = shmget(strtol(argv[2], NULL, 0), 8192, IPC_CREAT | 0640);
	if (ida < 0 || idb < 0)
		return 4;
	a = shmat(ida, NULL, 0);
	b = shmat(idb, NULL, 0);
	if (a == (void *)-1 || b == (void *)-1)
		return 5;
	for (i = 0; i < A_SIZE; i++)
		a[i] = (unsigned char)(i * 7 + 3);
	strcpy((char *)b, "B before the dump");
	shmctl(ida, IPC_RMID, NULL);
	child = fork();
	if (child == 0)
		serve();
	wl_log("ready %d %d %d %lx %d %lx", getpid(), child, ida, (unsigned long)a, idb,
	       (unsigned long)b);
	serve();
}
