/* Checksums of image files and of page runs inside them (criu_py/images/integrity.py). */
#ifndef CRIU_PY_DIGEST_H
#define CRIU_PY_DIGEST_H
#include <stdint.h>
long cp_digest_file(int fd, uint64_t size, const uint64_t *runs, long nruns,
		    uint64_t *run_digests, uint64_t *file_digest, int nthreads);
long cp_digest_mem(const void *p, uint64_t len, uint64_t *digest);
void cp_crc_blocks(const void *data, uint64_t len, uint32_t *crcs);
int cp_crc_hw(void);
long cp_digest_crcs(const uint32_t *crcs, uint64_t size, const uint64_t *runs, long nruns,
		    uint64_t *run_digests, uint64_t *file_digest);
#endif
