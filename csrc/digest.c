/* The digest criu-py keeps of every image file and of every run of pages in a pages
 * file, fast enough to check 1 GiB before a restore starts: the file is cut in 4 KiB
 * blocks, each block gets its CRC-32C (the SSE4.2 instruction, three blocks at once so
 * the instruction's latency is hidden; a table when the CPU lacks it), and a digest is
 * the 64-bit sum of a mixed (block CRC, block index) per block plus the mixed length.
 * A sum can be split among threads and a run's digest is the same sum over the blocks
 * of the run, so one pass over the file gives both. Any change inside one block changes
 * its CRC and so the digest; this guards against damage, not against someone who can
 * also rewrite the checksum image. The file is read through a private mapping. */
#include "digest.h"
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include "cpuid.h"

#define BLOCK 4096u

static uint32_t crc_table[256];
static int have_sse42 = -1;

static void crc_init(void)
{
	unsigned int r4[4];

	for (uint32_t i = 0; i < 256; i++) {
		uint32_t r = i;
		for (int k = 0; k < 8; k++)
			r = r & 1 ? (r >> 1) ^ 0x82F63B78u : r >> 1;
		crc_table[i] = r;
	}
	cp_cpuid(1, 0, r4);
	have_sse42 = !!(r4[2] & (1u << 20));		/* ecx bit 20: SSE4.2 */
}

static uint32_t crc_soft(const uint8_t *p, uint64_t n)
{
	uint32_t crc = ~0u;

	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

__attribute__((target("sse4.2")))
static uint32_t crc_hw(const uint8_t *p, uint64_t n)
{
	uint64_t crc = ~0u;
	uint64_t w;

	for (; n >= 8; n -= 8, p += 8) {
		__builtin_memcpy(&w, p, 8);
		crc = __builtin_ia32_crc32di(crc, w);
	}
	while (n--)
		crc = __builtin_ia32_crc32qi((uint32_t)crc, *p++);
	return ~(uint32_t)crc;
}

/* Three whole blocks at once: independent dependency chains. */
__attribute__((target("sse4.2")))
static void crc_hw3(const uint8_t *a, uint32_t *out)
{
	const uint8_t *b = a + BLOCK, *c = b + BLOCK;
	uint64_t x = ~0u, y = ~0u, z = ~0u, u, v, w;

	for (unsigned i = 0; i < BLOCK; i += 8) {
		__builtin_memcpy(&u, a + i, 8);
		__builtin_memcpy(&v, b + i, 8);
		__builtin_memcpy(&w, c + i, 8);
		x = __builtin_ia32_crc32di(x, u);
		y = __builtin_ia32_crc32di(y, v);
		z = __builtin_ia32_crc32di(z, w);
	}
	out[0] = ~(uint32_t)x;
	out[1] = ~(uint32_t)y;
	out[2] = ~(uint32_t)z;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

struct digest_job {
	const uint8_t *map;
	uint64_t size, first, last;		/* blocks [first, last) */
	const uint64_t *runs;
	long nruns;
	uint64_t *run_sums;			/* nruns, this thread's part */
	uint64_t file_sum;
};

static uint32_t block_crc(const uint8_t *map, uint64_t size, uint64_t blk)
{
	uint64_t off = blk * BLOCK, n = size - off < BLOCK ? size - off : BLOCK;

	return have_sse42 ? crc_hw(map + off, n) : crc_soft(map + off, n);
}

static void *digest_part(void *arg)
{
	struct digest_job *j = arg;
	long r = 0;
	uint32_t crc[3];

	/* the first run that may hold block `first` */
	while (r < j->nruns && (j->runs[2 * r] + j->runs[2 * r + 1]) / BLOCK <= j->first)
		r++;
	for (uint64_t blk = j->first; blk < j->last;) {
		int n = 1;
		if (have_sse42 && blk + 3 <= j->last && (blk + 3) * BLOCK <= j->size) {
			crc_hw3(j->map + blk * BLOCK, crc);
			n = 3;
		} else {
			crc[0] = block_crc(j->map, j->size, blk);
		}
		for (int k = 0; k < n; k++, blk++) {
			j->file_sum += mix((uint64_t)crc[k] | blk << 32);
			while (r < j->nruns && (j->runs[2 * r] + j->runs[2 * r + 1]) / BLOCK <= blk)
				r++;
			if (r < j->nruns && j->runs[2 * r] / BLOCK <= blk)
				j->run_sums[r] += mix((uint64_t)crc[k] | (blk - j->runs[2 * r] / BLOCK) << 32);
		}
	}
	return NULL;
}

/* Digest of the whole file (`size` bytes of fd) into *file_digest and of each run
 * runs[2i] (offset) .. + runs[2i+1] (length) into run_digests[i]. Runs must be sorted,
 * not overlap, and start and end on block boundaries. Returns 0 or -errno. */
long cp_digest_file(int fd, uint64_t size, const uint64_t *runs, long nruns,
		    uint64_t *run_digests, uint64_t *file_digest, int nthreads)
{
	struct digest_job jobs[8];
	pthread_t tids[8];
	const uint8_t *map = NULL;
	uint64_t nblocks = (size + BLOCK - 1) / BLOCK;
	uint64_t *sums;
	long ret = 0;
	int started = 0;

	if (have_sse42 < 0)
		crc_init();
	for (long i = 0; i < nruns; i++)
		if (runs[2 * i] % BLOCK || runs[2 * i + 1] % BLOCK || runs[2 * i] + runs[2 * i + 1] > size ||
		    (i && runs[2 * i] < runs[2 * i - 2] + runs[2 * i - 1]))
			return -EINVAL;
	if (nthreads < 1 || nblocks < 1024)
		nthreads = 1;
	if (nthreads > 8)
		nthreads = 8;
	sums = calloc((size_t)(nruns ? nruns : 1) * nthreads, sizeof(*sums));
	if (!sums)
		return -ENOMEM;
	if (size) {
		map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
		if (map == MAP_FAILED) {
			free(sums);
			return -errno;
		}
		madvise((void *)map, size, MADV_SEQUENTIAL);
	}
	for (int t = 0; t < nthreads; t++) {
		jobs[t] = (struct digest_job){ map, size, nblocks * t / nthreads,
					       nblocks * (t + 1) / nthreads, runs, nruns,
					       sums + (size_t)t * (nruns ? nruns : 1), 0 };
		if (t == 0 || pthread_create(&tids[t], NULL, digest_part, &jobs[t]) != 0) {
			if (t)
				digest_part(&jobs[t]);	/* no thread: do it here */
			else
				continue;
		} else {
			started |= 1 << t;
		}
	}
	digest_part(&jobs[0]);
	for (int t = 1; t < nthreads; t++)
		if (started & (1 << t))
			pthread_join(tids[t], NULL);
	*file_digest = mix(size ^ 0x6372697570792d31ull);
	for (int t = 0; t < nthreads; t++)
		*file_digest += jobs[t].file_sum;
	for (long i = 0; i < nruns; i++) {
		run_digests[i] = mix(runs[2 * i + 1] ^ 0x7061676573ull);
		for (int t = 0; t < nthreads; t++)
			run_digests[i] += sums[(size_t)t * nruns + i];
	}
	if (map)
		munmap((void *)map, size);
	free(sums);
	return ret;
}

/* The digest a run of `len` bytes at p gets in cp_digest_file (blocks numbered from the
 * run's start): what a lazy-pages daemon checks page data against before it hands a
 * piece of a pages file (or of a page server's answer) to a task. */
long cp_digest_mem(const void *p, uint64_t len, uint64_t *digest)
{
	const uint8_t *map = p;
	uint64_t nblocks = (len + BLOCK - 1) / BLOCK, sum;
	uint32_t crc[3];

	if (have_sse42 < 0)
		crc_init();
	if (len % BLOCK)
		return -EINVAL;
	sum = mix(len ^ 0x7061676573ull);
	for (uint64_t blk = 0; blk < nblocks;) {
		int n = 1;

		if (have_sse42 && blk + 3 <= nblocks) {
			crc_hw3(map + blk * BLOCK, crc);
			n = 3;
		} else {
			crc[0] = block_crc(map, len, blk);
		}
		for (int k = 0; k < n; k++, blk++)
			sum += mix((uint64_t)crc[k] | blk << 32);
	}
	*digest = sum;
	return 0;
}

/* The CRC of each 4 KiB block of data[0, len) (the last may be short) into crcs[]: the
 * dump computes them while it writes pages, so the pages file need not be read again. */
void cp_crc_blocks(const void *data, uint64_t len, uint32_t *crcs)
{
	const uint8_t *p = data;
	uint64_t nblocks = (len + BLOCK - 1) / BLOCK, blk = 0;

	if (have_sse42 < 0)
		crc_init();
	while (blk < nblocks) {
		if (have_sse42 && (blk + 3) * BLOCK <= len) {
			crc_hw3(p + blk * BLOCK, crcs + blk);
			blk += 3;
		} else {
			crcs[blk] = block_crc(p, len, blk);
			blk++;
		}
	}
}

/* cp_digest_file's digests of a file of `size` bytes from the CRCs of its blocks. */
long cp_digest_crcs(const uint32_t *crcs, uint64_t size, const uint64_t *runs, long nruns,
		    uint64_t *run_digests, uint64_t *file_digest)
{
	uint64_t nblocks = (size + BLOCK - 1) / BLOCK, sum = 0;
	long r = 0;

	for (long i = 0; i < nruns; i++) {
		if (runs[2 * i] % BLOCK || runs[2 * i + 1] % BLOCK || runs[2 * i] + runs[2 * i + 1] > size ||
		    (i && runs[2 * i] < runs[2 * i - 2] + runs[2 * i - 1]))
			return -EINVAL;
		run_digests[i] = mix(runs[2 * i + 1] ^ 0x7061676573ull);
	}
	for (uint64_t blk = 0; blk < nblocks; blk++) {
		sum += mix((uint64_t)crcs[blk] | blk << 32);
		while (r < nruns && (runs[2 * r] + runs[2 * r + 1]) / BLOCK <= blk)
			r++;
		if (r < nruns && runs[2 * r] / BLOCK <= blk)
			run_digests[r] += mix((uint64_t)crcs[blk] | (blk - runs[2 * r] / BLOCK) << 32);
	}
	*file_digest = mix(size ^ 0x6372697570792d31ull) + sum;
	return 0;
}

/* Whether this CPU has the CRC-32C instruction (code that runs in a task may use it). */
int cp_crc_hw(void)
{
	if (have_sse42 < 0)
		crc_init();
	return have_sse42;
}
