/* inotify and fanotify, for checkpoints of file watchers. In DIR it makes files a, b, c
 * and watches them and DIR itself with one inotify instance (IN_NONBLOCK), leaving a
 * hole in the watch numbers (a watch added and removed between b and c); every EXTRA
 * path gets a watch too. With MNT (a mount point), a fanotify group (FAN_CLASS_NOTIF)
 * marks that mount for FAN_MODIFY | FAN_CLOSE_WRITE, ignores FAN_MODIFY of MNT/quiet
 * (an inode mark with an ignored mask), and marks DIR/a for FAN_MODIFY. It logs
 * "wds a=A b=B c=C dir=D extra=E..." and "ready PID", then one line per event:
 * "inotify wd=W mask=M name=N" and "fanotify mask=M path=P".
 * usage: notifier LOG DIR MNT|- [EXTRA...] */
#include "wl.h"
#include <poll.h>
#include <sys/fanotify.h>
#include <sys/inotify.h>

static void touch(const char *dir, const char *name)
{
	char path[4096];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_WRONLY | O_CREAT, 0644);
	if (fd < 0) {
		perror(path);
		exit(4);
	}
	close(fd);
}

static int watch(int in, const char *dir, const char *name, uint32_t mask)
{
	char path[4096];
	int wd;

	if (name)
		snprintf(path, sizeof(path), "%s/%s", dir, name);
	else
		snprintf(path, sizeof(path), "%s", dir);
	wd = inotify_add_watch(in, path, mask);
	if (wd < 0) {
		perror(path);
		exit(4);
	}
	return wd;
}

int main(int argc, char **argv)
{
	const uint32_t fmask = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE;
	char line[4096], *p;
	int in, fan = -1, wa, wb, wc, wd, tmp, n;

	if (argc < 4) {
		fprintf(stderr, "usage: notifier LOG DIR MNT|- [EXTRA...]\n");
		return 2;
	}
	wl_open_log(argv[1]);
	touch(argv[2], "a");
	touch(argv[2], "b");
	touch(argv[2], "c");
	in = inotify_init1(IN_NONBLOCK);
	wa = watch(in, argv[2], "a", fmask);
	wb = watch(in, argv[2], "b", fmask);
	tmp = watch(in, argv[2], NULL, IN_ONLYDIR | IN_ACCESS);
	inotify_rm_watch(in, tmp);			/* a hole in the numbers */
	wc = watch(in, argv[2], "c", fmask | IN_EXCL_UNLINK);
	wd = watch(in, argv[2], NULL, IN_CREATE | IN_DELETE | IN_MOVED_TO);
	p = line + snprintf(line, sizeof(line), "wds a=%d b=%d c=%d dir=%d extra=", wa, wb, wc, wd);
	for (int i = 4; i < argc; i++)
		p += snprintf(p, line + sizeof(line) - p, "%s%d", i > 4 ? "," : "",
			      watch(in, argv[i], NULL, fmask));
	wl_log("%s", line);
	if (strcmp(argv[3], "-")) {
		char quiet[4096], a[4096];

		snprintf(quiet, sizeof(quiet), "%s/quiet", argv[3]);
		snprintf(a, sizeof(a), "%s/a", argv[2]);
		touch(argv[3], "quiet");
		fan = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK | FAN_CLOEXEC, O_RDONLY | O_LARGEFILE);
		if (fan < 0 ||
		    fanotify_mark(fan, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_MODIFY | FAN_CLOSE_WRITE,
				  AT_FDCWD, argv[3]) ||
		    fanotify_mark(fan, FAN_MARK_ADD | FAN_MARK_IGNORED_MASK | FAN_MARK_IGNORED_SURV_MODIFY,
				  FAN_MODIFY, AT_FDCWD, quiet) ||
		    fanotify_mark(fan, FAN_MARK_ADD, FAN_MODIFY, AT_FDCWD, a)) {
			perror("fanotify");
			return 4;
		}
	}
	wl_log("ready %d", getpid());
	for (;;) {
		struct pollfd pfd[2] = { { in, POLLIN, 0 }, { fan, POLLIN, 0 } };
		char buf[8192] __attribute__((aligned(8)));

		if (poll(pfd, fan >= 0 ? 2 : 1, 1000) < 0 && errno != EINTR)
			return 5;
		while ((n = read(in, buf, sizeof(buf))) > 0) {
			for (char *q = buf; q < buf + n;) {
				struct inotify_event *ev = (struct inotify_event *)q;

				wl_log("inotify wd=%d mask=%#x name=%s", ev->wd, ev->mask,
				       ev->len ? ev->name : "");
				q += sizeof(*ev) + ev->len;
			}
		}
		while (fan >= 0 && (n = read(fan, buf, sizeof(buf))) > 0) {
			struct fanotify_event_metadata *m = (struct fanotify_event_metadata *)buf;

			for (; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
				char link[64], path[4096] = "";
				ssize_t k;

				if (m->fd >= 0) {
					snprintf(link, sizeof(link), "/proc/self/fd/%d", m->fd);
					k = readlink(link, path, sizeof(path) - 1);
					path[k > 0 ? k : 0] = 0;
					close(m->fd);
				}
				wl_log("fanotify mask=%#llx path=%s", (unsigned long long)m->mask, path);
			}
		}
	}
}
