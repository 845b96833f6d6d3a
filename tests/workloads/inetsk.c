/* TCP and UDP sockets over IPv4 and IPv6 with options, and an established TCP
 * connection inside the process whose buffers are full both ways (sent, unacknowledged
 * and never sent data; 32-bit counters as in sockpair.c). Logs "ready <pid> <tcp4 port>
 * <tcp6 port> <udp4 port> <bound port> <bytes c->s> <bytes s->c>". Once the file GO
 * exists it checks ("check <pid> <name> ok|bad <what>"):
 *   options     every option below reads back the same;
 *   names       every socket has its address and port;
 *   tcp4, tcp6  the listeners (backlog 7, IPv6-only) accept the test's connection and
 *               answer "hi" with "hi back";
 *   udp4        the bound UDP socket answers the test's datagram "udp-hello";
 *   udp6        a connected IPv6 UDP socket reaches its bound peer;
 *   established every byte queued in the connection arrives, in order, both ways, and
 *               the connection goes on ("ping"/"pong");
 *   bound       the bound, not listening TCP socket listens when told to;
 * then "done <pid> all-ok|some-bad" and "beat <pid> <n>" every 50 ms.
 * usage: inetsk LOG GO */
#include "wl.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>

static int all_ok = 1;

static void check(const char *name, int good, const char *what)
{
	if (good) {
		wl_log("check %d %s ok", getpid(), name);
	} else {
		wl_log("check %d %s bad %s", getpid(), name, what);
		all_ok = 0;
	}
}

static int opt(int fd, int level, int name)
{
	int v = -12345;
	socklen_t l = sizeof(v);

	getsockopt(fd, level, name, &v, &l);
	return v;
}

static void set(int fd, int level, int name, int v)
{
	if (setsockopt(fd, level, name, &v, sizeof(v)))
		exit(20);
}

static int port_of(int fd)
{
	struct sockaddr_storage a;
	socklen_t l = sizeof(a);

	if (getsockname(fd, (struct sockaddr *)&a, &l))
		return -1;
	return ntohs(a.ss_family == AF_INET ? ((struct sockaddr_in *)&a)->sin_port
					    : ((struct sockaddr_in6 *)&a)->sin6_port);
}

static int sock4(int type, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	int fd = socket(AF_INET, type, 0);

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)))
		exit(21);
	return fd;
}

static int sock6(int type, int port)
{
	struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_LOOPBACK_INIT };
	int fd = socket(AF_INET6, type, 0);

	if (fd < 0)
		exit(22);
	set(fd, IPPROTO_IPV6, IPV6_V6ONLY, 1);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)))
		exit(22);
	return fd;
}

static unsigned char stream_byte(uint64_t off)
{
	return ((uint32_t)(off / 4) >> (8 * (off % 4))) & 0xff;
}

struct flow {
	int fd;
	uint64_t sent, got;
	int bad;
};

static void fill(struct flow *f)
{
	unsigned char buf[16384];

	for (;;) {
		for (size_t j = 0; j < sizeof(buf); j++)
			buf[j] = stream_byte(f->sent + j);
		ssize_t n = send(f->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n <= 0)
			return;
		f->sent += n;
	}
}

/* Read until `want` bytes came, checking each against the counter stream. */
static int drain(struct flow *f, uint64_t want)
{
	unsigned char buf[65536];

	while (f->got < want) {
		struct pollfd p = { .fd = f->fd, .events = POLLIN };

		if (poll(&p, 1, 20000) <= 0)
			return 0;
		ssize_t n = recv(f->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n <= 0)
			return 0;
		for (ssize_t k = 0; k < n; k++)
			if (buf[k] != stream_byte(f->got + k))
				f->bad = 1;
		f->got += n;
	}
	return !f->bad && f->got == want;
}

static int answer_hi(int lst)
{
	char buf[16];
	int c = accept(lst, NULL, NULL);

	if (c < 0)
		return 0;
	ssize_t n = recv(c, buf, sizeof(buf), 0);
	int good = n == 2 && !memcmp(buf, "hi", 2) && send(c, "hi back", 7, 0) == 7;
	close(c);
	return good;
}

int main(int argc, char **argv)
{
	int l4, l6, u4, u6s, u6c, c, s, b4, t0;
	struct stat st;
	struct linger lg = { 1, 3 }, lg2;
	struct timeval tv = { 2, 500000 }, tv2;
	socklen_t len;

	if (argc < 3)
		return 2;
	wl_open_log(argv[1]);

	l4 = socket(AF_INET, SOCK_STREAM, 0);
	set(l4, SOL_SOCKET, SO_REUSEADDR, 1);
	{
		struct sockaddr_in a = { .sin_family = AF_INET };

		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (bind(l4, (struct sockaddr *)&a, sizeof(a)) || listen(l4, 7))
			return 3;
	}
	l6 = sock6(SOCK_STREAM, 0);
	if (listen(l6, 3))
		return 4;
	u4 = socket(AF_INET, SOCK_DGRAM, 0);
	set(u4, SOL_SOCKET, SO_REUSEPORT, 1);
	set(u4, IPPROTO_IP, IP_TOS, 0x10);
	set(u4, SOL_SOCKET, SO_RCVBUF, 100000);
	{
		struct sockaddr_in a = { .sin_family = AF_INET };

		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (bind(u4, (struct sockaddr *)&a, sizeof(a)))
			return 5;
	}
	u6s = sock6(SOCK_DGRAM, 0);
	u6c = socket(AF_INET6, SOCK_DGRAM, 0);
	{
		struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons(port_of(u6s)),
					  .sin6_addr = IN6ADDR_LOOPBACK_INIT };

		if (connect(u6c, (struct sockaddr *)&a, sizeof(a)))
			return 6;
	}
	/* the established connection */
	c = socket(AF_INET, SOCK_STREAM, 0);
	{
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port_of(l4)) };

		a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (connect(c, (struct sockaddr *)&a, sizeof(a)))
			return 7;
	}
	s = accept(l4, NULL, NULL);
	if (s < 0)
		return 8;
	set(c, IPPROTO_TCP, TCP_NODELAY, 1);
	if (setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)))
		return 9;
	set(s, SOL_SOCKET, SO_KEEPALIVE, 1);
	set(s, IPPROTO_TCP, TCP_KEEPIDLE, 77);
	set(s, IPPROTO_TCP, TCP_KEEPINTVL, 11);
	set(s, IPPROTO_TCP, TCP_KEEPCNT, 5);
	if (setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)))
		return 10;
	struct flow cs = { .fd = c }, sc = { .fd = s }, rs = { .fd = s }, rc = { .fd = c };
	fill(&cs);
	fill(&sc);
	b4 = sock4(SOCK_STREAM, 0);
	t0 = socket(AF_INET, SOCK_STREAM, 0);
	int keep[9] = { l4, l6, u4, u6s, u6c, c, s, b4, t0 };
	int ports[9];
	for (int i = 0; i < 9; i++)
		ports[i] = port_of(keep[i]);
	int rcvbuf = opt(u4, SOL_SOCKET, SO_RCVBUF);

	wl_log("ready %d %d %d %d %d %llu %llu", getpid(), ports[0], ports[1], ports[2], ports[7],
	       (unsigned long long)cs.sent, (unsigned long long)sc.sent);
	while (stat(argv[2], &st))
		wl_sleep_ms(10);

	len = sizeof(lg2);
	getsockopt(c, SOL_SOCKET, SO_LINGER, &lg2, &len);
	len = sizeof(tv2);
	getsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv2, &len);
	check("options", opt(l4, SOL_SOCKET, SO_REUSEADDR) == 1 && opt(l6, IPPROTO_IPV6, IPV6_V6ONLY) == 1 &&
	      opt(u4, SOL_SOCKET, SO_REUSEPORT) == 1 && opt(u4, IPPROTO_IP, IP_TOS) == 0x10 &&
	      opt(u4, SOL_SOCKET, SO_RCVBUF) == rcvbuf && opt(c, IPPROTO_TCP, TCP_NODELAY) == 1 &&
	      lg2.l_onoff == 1 && lg2.l_linger == 3 && opt(s, SOL_SOCKET, SO_KEEPALIVE) == 1 &&
	      opt(s, IPPROTO_TCP, TCP_KEEPIDLE) == 77 && opt(s, IPPROTO_TCP, TCP_KEEPINTVL) == 11 &&
	      opt(s, IPPROTO_TCP, TCP_KEEPCNT) == 5 && tv2.tv_sec == 2 && tv2.tv_usec == 500000 &&
	      opt(u6s, SOL_SOCKET, SO_REUSEADDR) == 0 && opt(c, SOL_SOCKET, SO_REUSEADDR) == 0,
	      "an option changed");
	{
		int same = 1;

		for (int i = 0; i < 9; i++)
			if (port_of(keep[i]) != ports[i])
				same = 0;
		check("names", same, "a port changed");
	}
	check("established", drain(&rs, cs.sent) && drain(&rc, sc.sent) && send(c, "ping", 4, 0) == 4,
	      "queued data lost or reordered");
	{
		char buf[8];
		ssize_t n = recv(s, buf, sizeof(buf), 0);
		int good = n == 4 && !memcmp(buf, "ping", 4) && send(s, "pong", 4, 0) == 4 &&
			   recv(c, buf, sizeof(buf), 0) == 4 && !memcmp(buf, "pong", 4);
		check("ping-pong", good, "the connection does not go on");
	}
	{
		char buf[32];
		struct sockaddr_in6 from;
		socklen_t fl = sizeof(from);
		int good = send(u6c, "v6 dgram", 8, 0) == 8 &&
			   recvfrom(u6s, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl) == 8 &&
			   !memcmp(buf, "v6 dgram", 8) && ntohs(from.sin6_port) == ports[4];
		check("udp6", good, "datagram lost or sender changed");
	}
	check("bound", listen(b4, 2) == 0 && port_of(b4) == ports[7], "cannot listen");
	check("tcp4", answer_hi(l4), "listener");
	check("tcp6", answer_hi(l6), "listener");
	{
		char buf[32];
		struct sockaddr_in from;
		socklen_t fl = sizeof(from);
		ssize_t n = recvfrom(u4, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
		int good = n == 9 && !memcmp(buf, "udp-hello", 9) &&
			   sendto(u4, "udp-back", 8, 0, (struct sockaddr *)&from, fl) == 8;
		check("udp4", good, "datagram");
	}
	wl_log("done %d %s", getpid(), all_ok ? "all-ok" : "some-bad");
	for (unsigned long n = 1;; n++) {
		wl_log("beat %d %lu", getpid(), n);
		wl_sleep_ms(50);
	}
}
