/* A batch of whole image files written in one call: created (or truncated) 0600 in the
 * images dir, written, closed. A dump makes hundreds of small images, and creating a
 * file costs far more than the Python that builds it; the ImageDir's writer thread
 * calls this without the GIL (cffi drops it around the call), so the files are made
 * while the dump's Python goes on. A Python loop of os.open/os.write/os.close would
 * need the GIL back between every two of those calls. */
#include "imgwrite.h"
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

/* 0, or -errno with *failed the index of the file that failed (the ones before it are
 * written; the ones after it are not touched). */
long cp_write_files(int dirfd, long n, char **names, char **bufs, const uint64_t *lens,
		    long *failed)
{
	for (long i = 0; i < n; i++) {
		uint64_t done = 0;
		int fd, err;

		*failed = i;
		/* never through a symlink someone left under that name */
		fd = openat(dirfd, names[i], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
			    0600);
		if (fd < 0)
			return -errno;
		/* an existing file keeps its mode through O_TRUNC, a new one loses the umask */
		if (fchmod(fd, 0600) < 0)
			goto fail;
		while (done < lens[i]) {
			ssize_t w = write(fd, bufs[i] + done, lens[i] - done);

			if (w < 0) {
				if (errno == EINTR)
					continue;
				goto fail;
			}
			done += (uint64_t)w;
		}
		if (close(fd) < 0 && errno != EINTR)
			return -errno;
		continue;
fail:
		err = errno;
		close(fd);
		return -err;
	}
	*failed = n;
	return 0;
}
