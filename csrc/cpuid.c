/* CPUID from Python: the dump and the restorer need the XSAVE component layout
 * (CPUID leaf 0xD), which only the instruction itself reports. */
#include "cpuid.h"

void cp_cpuid(unsigned int leaf, unsigned int subleaf, unsigned int *out4)
{
	unsigned int a, b, c, d;
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(subleaf));
	out4[0] = a;
	out4[1] = b;
	out4[2] = c;
	out4[3] = d;
}
