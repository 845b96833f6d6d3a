/* Common includes for the thin syscall wrappers (not used by the freestanding restorer). */
#ifndef CRIU_PY_SYS_H
#define CRIU_PY_SYS_H
#include <stdint.h>
#include <stddef.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/types.h>
/* Declared here so the cffi glue does not assume an int result (mmap addresses!). */
long criu_py_raw_syscall6(long nr, long a, long b, long c, long d, long e, long f);
#endif
