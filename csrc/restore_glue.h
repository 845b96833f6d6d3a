/* Prototypes of csrc/restore_glue.c for the cffi preamble (the cdef twin is restore_glue.cdef). */
#ifndef CRIU_PY_RESTORE_GLUE_H
#define CRIU_PY_RESTORE_GLUE_H
#include <stdint.h>
long criu_py_clone3_set_tid(int32_t pid);
uint64_t criu_py_pie_blob_start(void);
uint64_t criu_py_pie_blob_end(void);
uint64_t criu_py_pie_entry(void);
uint64_t criu_py_glibc_rseq_addr(void);
uint32_t criu_py_glibc_rseq_size(void);
void criu_py_enter_restorer(uint64_t entry, uint64_t args, uint64_t stack_top);
int64_t criu_py_restore_syscall(int64_t nr, int64_t a, int64_t b, int64_t c, int64_t d, int64_t e, int64_t f);
uint64_t criu_py_xcr0(void);
long criu_py_clone3_flags(int32_t pid, uint64_t flags);
long criu_py_clone3_batch(const char *pids, const char *flags, int32_t n, int32_t *made);
long criu_py_futex_wait(uint64_t addr, uint32_t val, int64_t timeout_ns);
long criu_py_futex_wake(uint64_t addr);
uint32_t criu_py_atomic_add(uint64_t addr, int32_t delta);
uint32_t criu_py_atomic_load(uint64_t addr);
void criu_py_atomic_store(uint64_t addr, uint32_t val);
long criu_py_fill_pages(int fd, uint64_t off, uint64_t dst, uint64_t len, int compare);
#endif
