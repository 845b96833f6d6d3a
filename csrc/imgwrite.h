/* Writing a batch of whole image files in one call (criu_py/images: ImageDir's writer). */
#ifndef CRIU_PY_IMGWRITE_H
#define CRIU_PY_IMGWRITE_H
#include <stdint.h>
long cp_write_files(int dirfd, long n, char **names, char **bufs, const uint64_t *lens,
		    long *failed);
#endif
