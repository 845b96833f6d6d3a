/* Common includes for the thin syscall wrappers (not used by the freestanding restorer). */
#ifndef CRIU_PY_SYS_H
#define CRIU_PY_SYS_H
#include <stdint.h>
#include <stddef.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/types.h>
#endif
