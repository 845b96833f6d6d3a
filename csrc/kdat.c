/* CPU feature instructions for the kernel-facts probes (criu_py/kerndat): Python has no
 * way to execute cpuid or xgetbv, and the xsave layout the kernel uses comes from them. */
#include "kdat.h"

void criu_py_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
	uint32_t a, b, c, d;

	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(subleaf));
	out[0] = a;
	out[1] = b;
	out[2] = c;
	out[3] = d;
}

/* Only valid when CPUID.1:ECX.OSXSAVE[bit 27] is set; the caller checks that first. */
uint64_t criu_py_xgetbv(uint32_t index)
{
	uint32_t lo, hi;

	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(index));
	return ((uint64_t)hi << 32) | lo;
}
