/* Prototypes of csrc/kdat.c, for the cffi preamble (a 64-bit return must not be implicit int). */
#ifndef CRIU_PY_KDAT_H
#define CRIU_PY_KDAT_H
#include <stdint.h>
void criu_py_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
uint64_t criu_py_xgetbv(uint32_t index);
#endif
