/* Placeholder so the extension always has at least one source; real wrappers live in
 * csrc/<topic>.c with their csrc/<topic>.cdef. */
#include "sys.h"

long criu_py_raw_syscall6(long nr, long a, long b, long c, long d, long e, long f)
{
	long r = syscall(nr, a, b, c, d, e, f);
	return r < 0 ? -errno : r;
}
