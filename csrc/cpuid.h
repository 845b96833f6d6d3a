/* CPUID for the xsave layout (leaf 0xD gives each component's offset and size). */
#ifndef CRIU_PY_CPUID_H
#define CRIU_PY_CPUID_H
void cp_cpuid(unsigned int leaf, unsigned int subleaf, unsigned int *out4);
#endif
