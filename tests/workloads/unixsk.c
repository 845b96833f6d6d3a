/* Unix sockets of every shape criu-py restores, each checked by the program itself once
 * the file GO exists ("check <pid> <name> ok" or "check <pid> <name> bad <what>"), then
 * "done <pid>" and "beat <pid> <n>" every 50 ms:
 *   bound-dgram  a datagram server bound to DIR/dgram.sock (mode 0640), a client
 *                connected to it; three datagrams of 1, 300 and 5000 bytes wait in the
 *                server; after GO the client sends a fourth;
 *   abstract     a stream listener on an abstract name (backlog 5) with a connection
 *                from a client of the same process that is not accepted yet;
 *   orphan-dgram a datagram socket whose peer was closed, two datagrams queued;
 *   seqpacket    a seqpacket pair: "last words" queued, then the writer shut down;
 *   passcred     SO_PASSCRED on one end of a stream pair, 65536/8192 buffer sizes;
 *   deleted      a datagram server bound to DIR/gone.sock, then unlinked; a client
 *                connected to it sends after GO;
 *   semi-closed  a stream pair whose writer sent "bye" and closed;
 *   relative     a datagram socket bound to the relative name "rel.sock" in DIR (the
 *                test sends it "from-outside" after GO);
 *   shutdown-rd  a stream pair with one end shut down for reading.
 * usage: unixsk LOG DIR GO */
#include "wl.h"
#include <sys/socket.h>
#include <sys/stat.h>
#include <stddef.h>
#include <sys/un.h>

static int ok = 1;

static void check(const char *name, int good, const char *what)
{
	if (good)
		wl_log("check %d %s ok", getpid(), name);
	else {
		wl_log("check %d %s bad %s", getpid(), name, what);
		ok = 0;
	}
}

static socklen_t addr_of(struct sockaddr_un *a, const char *path, int abstract)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	if (abstract) {
		strncpy(a->sun_path + 1, path, sizeof(a->sun_path) - 2);
		return offsetof(struct sockaddr_un, sun_path) + 1 + strlen(path);
	}
	strncpy(a->sun_path, path, sizeof(a->sun_path) - 1);
	return sizeof(*a);
}

static int bound(int type, const char *path, int abstract)
{
	struct sockaddr_un a;
	socklen_t len = addr_of(&a, path, abstract);
	int fd = socket(AF_UNIX, type, 0);

	if (!abstract)
		unlink(path);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, len))
		exit(10);
	return fd;
}

static int connected(int type, const char *path, int abstract)
{
	struct sockaddr_un a;
	socklen_t len = addr_of(&a, path, abstract);
	int fd = socket(AF_UNIX, type, 0);

	if (fd < 0 || connect(fd, (struct sockaddr *)&a, len))
		exit(11);
	return fd;
}

static int recv_is(int fd, const char *want, size_t n)
{
	char buf[8192];
	ssize_t got = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);

	return got == (ssize_t)n && !memcmp(buf, want, n);
}

static int getopt_int(int fd, int opt)
{
	int v = -1;
	socklen_t l = sizeof(v);

	getsockopt(fd, SOL_SOCKET, opt, &v, &l);
	return v;
}

int main(int argc, char **argv)
{
	char path[4096], big[5000], gopath[4096], abs_name[64];
	int dsrv, dcli, lst, pend, orph[2], sq[2], pc[2], gsrv, gcli, semi[2], rel, rd[2];
	struct stat st;

	if (argc < 4)
		return 2;
	wl_open_log(argv[1]);
	memset(big, 'b', sizeof(big));

	/* bound-dgram */
	snprintf(path, sizeof(path), "%s/dgram.sock", argv[2]);
	dsrv = bound(SOCK_DGRAM, path, 0);
	chmod(path, 0640);
	dcli = connected(SOCK_DGRAM, path, 0);
	if (send(dcli, "1", 1, 0) != 1 || send(dcli, big, 300, 0) != 300 || send(dcli, big, 5000, 0) != 5000)
		return 12;

	/* abstract */
	snprintf(abs_name, sizeof(abs_name), "criu-py-test-%d", getpid());
	lst = bound(SOCK_STREAM, abs_name, 1);
	if (listen(lst, 5))
		return 13;
	pend = connected(SOCK_STREAM, abs_name, 1);

	/* orphan-dgram */
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, orph))
		return 14;
	if (send(orph[1], "first", 5, 0) != 5 || send(orph[1], "second!", 7, 0) != 7)
		return 14;
	close(orph[1]);

	/* seqpacket */
	if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sq) || send(sq[1], "last words", 10, 0) != 10 ||
	    shutdown(sq[1], SHUT_WR))
		return 15;

	/* passcred */
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, pc))
		return 16;
	int one = 1, sz = 65536, rsz = 8192;
	setsockopt(pc[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
	setsockopt(pc[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	setsockopt(pc[0], SOL_SOCKET, SO_RCVBUF, &rsz, sizeof(rsz));
	int sndbuf = getopt_int(pc[0], SO_SNDBUF), rcvbuf = getopt_int(pc[0], SO_RCVBUF);

	/* deleted */
	snprintf(gopath, sizeof(gopath), "%s/gone.sock", argv[2]);
	gsrv = bound(SOCK_DGRAM, gopath, 0);
	gcli = connected(SOCK_DGRAM, gopath, 0);
	unlink(gopath);

	/* semi-closed */
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, semi) || send(semi[1], "bye", 3, 0) != 3)
		return 17;
	close(semi[1]);

	/* relative */
	if (chdir(argv[2]))
		return 18;
	rel = bound(SOCK_DGRAM, "rel.sock", 0);
	if (chdir("/"))
		return 18;

	/* shutdown-rd */
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, rd) || shutdown(rd[0], SHUT_RD))
		return 19;

	wl_log("ready %d", getpid());
	while (stat(argv[3], &st))
		wl_sleep_ms(10);

	/* the checks */
	{
		int a = recv_is(dsrv, "1", 1), b = recv_is(dsrv, big, 300), c = recv_is(dsrv, big, 5000);
		int d = send(dcli, "4th", 3, 0) == 3 && recv_is(dsrv, "4th", 3);

		stat(path, &st);
		check("bound-dgram", a && b && c && d && S_ISSOCK(st.st_mode) &&
		      (st.st_mode & 0777) == 0640, "queue, boundaries or mode");
	}
	{
		struct sockaddr_un a;
		socklen_t l = sizeof(a);
		int acc = accept(lst, NULL, NULL);
		int named = !getsockname(lst, (struct sockaddr *)&a, &l) && a.sun_path[0] == 0 &&
			    !memcmp(a.sun_path + 1, abs_name, strlen(abs_name));
		int talk = acc >= 0 && send(pend, "x", 1, 0) == 1 && (wl_sleep_ms(10), recv_is(acc, "x", 1));

		check("abstract", named && talk, "name or pending connection");
	}
	check("orphan-dgram", recv_is(orph[0], "first", 5) && recv_is(orph[0], "second!", 7) &&
	      recv(orph[0], big, 1, MSG_DONTWAIT) < 0, "queued datagrams");
	{
		char buf[32];
		int a = recv_is(sq[0], "last words", 10);
		ssize_t eof = recv(sq[0], buf, sizeof(buf), MSG_DONTWAIT);

		check("seqpacket", a && eof == 0, "record or end");
	}
	check("passcred", getopt_int(pc[0], SO_PASSCRED) == 1 && getopt_int(pc[1], SO_PASSCRED) == 0 &&
	      getopt_int(pc[0], SO_SNDBUF) == sndbuf && getopt_int(pc[0], SO_RCVBUF) == rcvbuf,
	      "options");
	{
		struct sockaddr_un a;
		socklen_t l = sizeof(a);
		int named = !getsockname(gsrv, (struct sockaddr *)&a, &l) && !strcmp(a.sun_path, gopath);
		int talk = send(gcli, "to-ghost", 8, 0) == 8 && recv_is(gsrv, "to-ghost", 8);

		check("deleted", named && talk && stat(gopath, &st) && errno == ENOENT, "name, path or data");
	}
	{
		char buf[8];
		int a = recv_is(semi[0], "bye", 3);
		ssize_t eof = recv(semi[0], buf, sizeof(buf), MSG_DONTWAIT);

		check("semi-closed", a && eof == 0, "data or end");
	}
	{
		struct sockaddr_un a;
		socklen_t l = sizeof(a);
		int named = !getsockname(rel, (struct sockaddr *)&a, &l) && !strcmp(a.sun_path, "rel.sock");

		for (int i = 0; i < 500 && recv(rel, big, sizeof(big), MSG_DONTWAIT | MSG_PEEK) < 0; i++)
			wl_sleep_ms(10);
		check("relative", named && recv_is(rel, "from-outside", 12), "name or datagram");
	}
	{
		char buf[8];
		int wr = send(rd[1], "z", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
		ssize_t r = recv(rd[0], buf, sizeof(buf), MSG_DONTWAIT);

		check("shutdown-rd", wr < 0 && errno == EPIPE && r == 0, "shutdown state");
	}
	wl_log("done %d %s", getpid(), ok ? "all-ok" : "some-bad");
	for (unsigned long n = 1;; n++) {
		wl_log("beat %d %lu", getpid(), n);
		wl_sleep_ms(50);
	}
}
