/* The end of the two-buffer hand-overs between a reading thread and a writing or
 * sending one (ptrace.c's copy to a file, pagexfer.c's send to a page server). */
#ifndef CRIU_PY_HANDOVER_H
#define CRIU_PY_HANDOVER_H
#include <pthread.h>

/* The reader is done (with err, or 0): tell the other thread, wait for it to finish
 * what it has, and return its error if it had one, else err, else total. */
static inline long cp_handover_end(pthread_mutex_t *lock, pthread_cond_t *cond, int *done,
				   int *shared_err, long err, pthread_t other, long total)
{
	pthread_mutex_lock(lock);
	*done = 1;
	if (err && !*shared_err)
		*shared_err = (int)err;
	pthread_cond_broadcast(cond);
	pthread_mutex_unlock(lock);
	pthread_join(other, NULL);
	return *shared_err ? *shared_err : total;
}
#endif
