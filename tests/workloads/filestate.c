/* Files by path in every state a daemon leaves them: in DIR, a fifo with unread bytes
 * (both ends open), a deleted file (40 KiB with a hole, offset 7) and a deleted file
 * mapped privately (8 KiB), a file renamed since it was opened, and locked files: lk1
 * flock(LOCK_EX), lk2 a POSIX write lock on bytes 10..29, lk3 an OFD read lock from 100
 * to the end. Logs "ready <pid>"; on SIGUSR1 it checks and logs
 *   "check <pid> fifo=<unread fifo bytes> ghost=<5 bytes at the offset>@<offset>
 *    nlink=<links of the deleted file> map=<ok|bad> renamed=<fd 's path>".
 * usage: filestate LOG DIR [nolocks] */
#include "wl.h"
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>

static volatile sig_atomic_t check_requested;

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static void path(char *buf, const char *dir, const char *name)
{
	snprintf(buf, 4096, "%s/%s", dir, name);
}

int main(int argc, char **argv)
{
	static char p[4096], block[4096];
	int rd, wr, gone, gmap, ren, i;
	unsigned char *map;

	if (argc < 3)
		return 2;
	wl_open_log(argv[1]);
	signal(SIGUSR1, on_usr1);

	path(p, argv[2], "fifo");
	mkfifo(p, 0640);
	rd = open(p, O_RDONLY | O_NONBLOCK);
	wr = open(p, O_WRONLY);
	if (rd < 0 || wr < 0 || write(wr, "queued-before-dump", 18) != 18)
		return 4;

	path(p, argv[2], "gone");
	gone = open(p, O_RDWR | O_CREAT | O_TRUNC, 0640);
	for (i = 0; i < 4096; i++)
		block[i] = 'a' + i % 26;
	memcpy(block, "0123456ghost!", 13);
	if (pwrite(gone, block, 4096, 0) != 4096 || pwrite(gone, block, 4096, 36864) != 4096)
		return 4;		/* 40 KiB, a hole in the middle */
	lseek(gone, 7, SEEK_SET);
	unlink(p);

	path(p, argv[2], "gonemap");
	gmap = open(p, O_RDWR | O_CREAT | O_TRUNC, 0600);
	memset(block, 'm', sizeof(block));
	if (write(gmap, block, 4096) != 4096 || write(gmap, block, 4096) != 4096)
		return 4;
	map = mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, gmap, 0);
	close(gmap);
	unlink(p);

	path(p, argv[2], "orig");
	ren = open(p, O_RDONLY | O_CREAT, 0644);
	{
		static char q[4096];

		path(q, argv[2], "renamed");
		rename(p, q);
	}

	if (argc < 4 || strcmp(argv[3], "nolocks")) {
		struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 20 };
		struct flock fo = { .l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 0 };
		int l1, l2, l3;

		path(p, argv[2], "lk1");
		l1 = open(p, O_RDWR | O_CREAT, 0644);
		path(p, argv[2], "lk2");
		l2 = open(p, O_RDWR | O_CREAT, 0644);
		path(p, argv[2], "lk3");
		l3 = open(p, O_RDWR | O_CREAT, 0644);
		if (flock(l1, LOCK_EX) || fcntl(l2, F_SETLK, &fl) || fcntl(l3, F_OFD_SETLK, &fo))
			return 5;
	}
	wl_log("ready %d", getpid());
	for (;;) {
		if (check_requested) {
			char fifo[64] = "", ghost[8] = "", link[4096] = "", lp[64];
			struct stat st;
			off_t pos = lseek(gone, 0, SEEK_CUR);
			ssize_t n;
			int ok = 1;

			check_requested = 0;
			n = read(rd, fifo, sizeof(fifo) - 1);
			fifo[n > 0 ? n : 0] = 0;
			if (pread(gone, ghost, 5, pos) != 5)
				strcpy(ghost, "?");
			fstat(gone, &st);
			for (i = 0; i < 8192; i++)
				ok &= map[i] == 'm';
			snprintf(lp, sizeof(lp), "/proc/self/fd/%d", ren);
			n = readlink(lp, link, sizeof(link) - 1);
			link[n > 0 ? n : 0] = 0;
			wl_log("check %d fifo=%s ghost=%s@%lld nlink=%lu map=%s renamed=%s", getpid(),
			       fifo, ghost, (long long)pos, (unsigned long)st.st_nlink, ok ? "ok" : "bad",
			       link);
		}
		wl_sleep_ms(10);
	}
}
