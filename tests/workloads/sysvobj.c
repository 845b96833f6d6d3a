/* SysV semaphore set (key argv[2], 3 semaphores set to 1 5 9) and message queue (key
 * argv[3], messages "alpha" type 1 and "beta" type 2) made by this process and left as
 * they are. Logs "ready <pid> <semid> <msqid>"; on SIGUSR1 "check <pid> sem=<values>
 * msg=<type:text,...>" after taking every message off the queue.
 * usage: sysvobj LOG SEMKEY MSGKEY */
#include "wl.h"
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>

static volatile sig_atomic_t check_requested;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

int main(int argc, char **argv)
{
	unsigned short vals[3] = { 1, 5, 9 };
	struct { long type; char text[64]; } m;
	int sem, q;

	if (argc < 4)
		return 2;
	wl_open_log(argv[1]);
	signal(SIGUSR1, on_usr1);
	sem = semget(strtol(argv[2], NULL, 0), 3, IPC_CREAT | 0640);
	q = msgget(strtol(argv[3], NULL, 0), IPC_CREAT | 0640);
	if (sem < 0 || q < 0 || semctl(sem, 0, SETALL, vals))
		return 4;
	m.type = 1;
	strcpy(m.text, "alpha");
	msgsnd(q, &m, 5, 0);
	m.type = 2;
	strcpy(m.text, "beta");
	msgsnd(q, &m, 4, 0);
	wl_log("ready %d %d %d", getpid(), sem, q);
	for (;;) {
		if (check_requested) {
			char msgs[256] = "";
			ssize_t n;

			check_requested = 0;
			semctl(sem, 0, GETALL, vals);
			while ((n = msgrcv(q, &m, sizeof(m.text) - 1, 0, IPC_NOWAIT)) >= 0) {
				size_t l = strlen(msgs);

				m.text[n] = 0;
				snprintf(msgs + l, sizeof(msgs) - l, "%ld:%s,", m.type, m.text);
			}
			wl_log("check %d sem=%d,%d,%d msg=%s", getpid(), vals[0], vals[1], vals[2], msgs);
		}
		wl_sleep_ms(10);
	}
}
