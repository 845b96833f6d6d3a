/* `dump --page-server`'s data path (pagexfer.c). */
#ifndef CRIU_PY_PAGEXFER_H
#define CRIU_PY_PAGEXFER_H
#include <stdint.h>

/* One pagemap entry: [start, end) with its PE_* flags. */
/* In cp_ps_entry.flags, above the PE_* bits sent: read this one with process_vm_readv
 * rather than take it from the task's vmsplice (cp_ps_splice_pages). */
#define CP_PS_COPY (1ULL << 32)

struct cp_ps_entry {
	uint64_t start;
	uint64_t end;
	uint64_t flags;
};

long cp_ps_send_pages(int pid, int sock, const struct cp_ps_entry *ents, long nents,
		      uint32_t present, uint32_t data_flags, int send_crcs, void *bufs,
		      unsigned long bufsize, void *crc_bufs);
long cp_ps_recv_to_file(int sock, int pipe_r, int pipe_w, int fd, unsigned long n,
			unsigned long pipe_size);
long cp_ps_splice_pages(int pid, int sock, int pipe_r, const struct cp_ps_entry *ents,
			long nents, uint32_t present, uint32_t data_flags, uint64_t crc_remote,
			uint32_t *crcs, unsigned long chunk, void *buf, unsigned long bufsize,
			volatile int *stop);
#endif
