/* Vector registers across a checkpoint: one asm block loads known values into every
 * zmm register (ymm0-15 when built without USE_ZMM), the opmask registers k1-k7 and the
 * callee-saved GPRs, then loops (a busy spin, then a raw nanosleep syscall, which
 * preserves all of them) until SIGUSR1 sets `stop`; then it stores the registers and
 * compares. Logs "ready <pid>" before the loop and "OK <pid> iterations N" or
 * "BAD <pid> <register> ..." after it, then exits 0.
 * Build: gcc -O2 -mavx512f -DUSE_ZMM (AVX-512 machines) or gcc -O2 -mavx. */
#include "wl.h"
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

struct regstate {
	uint64_t zexp[32][8];		/*    0 */
	uint64_t zact[32][8];		/* 2048 */
	uint16_t kexp[8];		/* 4096 */
	uint16_t kact[8];		/* 4112 */
	uint64_t gexp[5];		/* 4128: rbx r12 r13 r14 r15 */
	uint64_t gact[5];		/* 4168 */
	struct timespec ts;		/* 4208 */
	volatile int32_t stop;		/* 4224 */
	int32_t pad;
	uint64_t iterations;		/* 4232 */
} __attribute__((aligned(64)));

_Static_assert(offsetof(struct regstate, zact) == 2048, "layout");
_Static_assert(offsetof(struct regstate, kexp) == 4096, "layout");
_Static_assert(offsetof(struct regstate, kact) == 4112, "layout");
_Static_assert(offsetof(struct regstate, gexp) == 4128, "layout");
_Static_assert(offsetof(struct regstate, gact) == 4168, "layout");
_Static_assert(offsetof(struct regstate, ts) == 4208, "layout");
_Static_assert(offsetof(struct regstate, stop) == 4224, "layout");
_Static_assert(offsetof(struct regstate, iterations) == 4232, "layout");

static struct regstate st;

static void on_usr1(int sig)
{
	(void)sig;
	st.stop = 1;
}

#ifdef USE_ZMM
#define NREGS 32
#define LANES 8
#define REGNAME "zmm"
#define LD(i) "vmovdqu64 64*" #i "(%[p]), %%zmm" #i "\n\t"
#define ST(i) "vmovdqu64 %%zmm" #i ", 2048+64*" #i "(%[p])\n\t"
#define KLD(i) "kmovw 4096+2*" #i "(%[p]), %%k" #i "\n\t"
#define KST(i) "kmovw %%k" #i ", 4112+2*" #i "(%[p])\n\t"
#define KLOAD KLD(1) KLD(2) KLD(3) KLD(4) KLD(5) KLD(6) KLD(7)
#define KSTORE KST(1) KST(2) KST(3) KST(4) KST(5) KST(6) KST(7)
#define HI_LD LD(16) LD(17) LD(18) LD(19) LD(20) LD(21) LD(22) LD(23) \
	LD(24) LD(25) LD(26) LD(27) LD(28) LD(29) LD(30) LD(31)
#define HI_ST ST(16) ST(17) ST(18) ST(19) ST(20) ST(21) ST(22) ST(23) \
	ST(24) ST(25) ST(26) ST(27) ST(28) ST(29) ST(30) ST(31)
#define EXTRA_CLOBBERS , "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", \
	"xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", \
	"k1", "k2", "k3", "k4", "k5", "k6", "k7"
#else
#define NREGS 16
#define LANES 4
#define REGNAME "ymm"
#define LD(i) "vmovdqu 64*" #i "(%[p]), %%ymm" #i "\n\t"
#define ST(i) "vmovdqu %%ymm" #i ", 2048+64*" #i "(%[p])\n\t"
#define KLOAD ""
#define KSTORE ""
#define HI_LD ""
#define HI_ST ""
#define EXTRA_CLOBBERS
#endif
#define LO_LD LD(0) LD(1) LD(2) LD(3) LD(4) LD(5) LD(6) LD(7) \
	LD(8) LD(9) LD(10) LD(11) LD(12) LD(13) LD(14) LD(15)
#define LO_ST ST(0) ST(1) ST(2) ST(3) ST(4) ST(5) ST(6) ST(7) \
	ST(8) ST(9) ST(10) ST(11) ST(12) ST(13) ST(14) ST(15)

static void hold_registers(struct regstate *p)
{
	asm volatile(
		LO_LD HI_LD KLOAD
		"mov 4128(%[p]), %%rbx\n\t"
		"mov 4136(%[p]), %%r12\n\t"
		"mov 4144(%[p]), %%r13\n\t"
		"mov 4152(%[p]), %%r14\n\t"
		"mov 4160(%[p]), %%r15\n\t"
		"1:\n\t"
		"mov $300000, %%edx\n\t"
		"2: dec %%edx\n\t"
		"jnz 2b\n\t"
		"mov $35, %%eax\n\t"		/* nanosleep(&p->ts, NULL) */
		"lea 4208(%[p]), %%rdi\n\t"
		"xor %%esi, %%esi\n\t"
		"syscall\n\t"
		"incq 4232(%[p])\n\t"
		"cmpl $0, 4224(%[p])\n\t"
		"je 1b\n\t"
		LO_ST HI_ST KSTORE
		"mov %%rbx, 4168(%[p])\n\t"
		"mov %%r12, 4176(%[p])\n\t"
		"mov %%r13, 4184(%[p])\n\t"
		"mov %%r14, 4192(%[p])\n\t"
		"mov %%r15, 4200(%[p])\n\t"
		:
		: [p] "r"(p)
		: "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r11", "r12", "r13", "r14", "r15",
		  "memory", "cc",
		  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
		  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
		  EXTRA_CLOBBERS);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_usr1 };
	static const char *gpr_names[5] = { "rbx", "r12", "r13", "r14", "r15" };
	uint64_t base;

	if (argc < 2) {
		fprintf(stderr, "usage: vecregs LOG\n");
		return 2;
	}
	wl_open_log(argv[1]);
	base = 0x0000123456789abcULL ^ ((uint64_t)getpid() << 8);
	for (int i = 0; i < 32; i++)
		for (int j = 0; j < 8; j++)
			st.zexp[i][j] = ((uint64_t)(i + 1) << 56) | ((uint64_t)(j + 1) << 48) | base;
	for (int i = 0; i < 8; i++)
		st.kexp[i] = (uint16_t)(0xa500 | (i * 17));
	for (int i = 0; i < 5; i++)
		st.gexp[i] = 0xfeed000000000000ULL | ((uint64_t)i << 40) | base;
	st.ts.tv_nsec = 1000000;
	sigaction(SIGUSR1, &sa, NULL);

	wl_log("ready %d " REGNAME, getpid());
	hold_registers(&st);

	for (int i = 0; i < NREGS; i++)
		for (int j = 0; j < LANES; j++)
			if (st.zact[i][j] != st.zexp[i][j]) {
				wl_log("BAD %d " REGNAME "%d lane %d got %016llx want %016llx", getpid(),
				       i, j, (unsigned long long)st.zact[i][j],
				       (unsigned long long)st.zexp[i][j]);
				return 1;
			}
#ifdef USE_ZMM
	for (int i = 1; i < 8; i++)
		if (st.kact[i] != st.kexp[i]) {
			wl_log("BAD %d k%d got %04x want %04x", getpid(), i, st.kact[i], st.kexp[i]);
			return 1;
		}
#endif
	for (int i = 0; i < 5; i++)
		if (st.gact[i] != st.gexp[i]) {
			wl_log("BAD %d %s got %016llx want %016llx", getpid(), gpr_names[i],
			       (unsigned long long)st.gact[i], (unsigned long long)st.gexp[i]);
			return 1;
		}
	wl_log("OK %d iterations %llu", getpid(), (unsigned long long)st.iterations);
	return 0;
}
