/* Two processes talking over unix sockets, each with its kernel buffers full of data
 * the other has not read yet: a parent and its child share a stream socketpair, a
 * seqpacket socketpair, a datagram socketpair, and a unix stream connection (the child
 * connects to PATH, where the parent listens, and the parent accepts). Each side fills
 * every channel without blocking until the kernel refuses more: the stream channels
 * carry 32-bit little-endian counters 0, 1, 2, ... (cut anywhere), the message channels
 * messages of 1 + (i * 37) % 200 bytes whose first four bytes are i and the rest
 * (i + j) & 0xff. Each logs "queued <pid> <chan> <count>" (bytes for streams, messages
 * otherwise) and the parent "ready <pid> <child>". Once the file GO exists both drain
 * every channel with poll(), finish their last counter, send a terminator (0xffffffff
 * and the count), and check that every byte and message arrived, in order, with its
 * boundaries: "ok <pid> <chan> <count received>" or "bad <pid> <chan> <what>", then
 * "done <pid>", then "beat <pid> <n>" every 50 ms.
 * usage: sockpair LOG PATH GO */
#include "wl.h"
#include <poll.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

enum { STREAM, UNIX, SEQPACKET, DGRAM, NCHAN };
static const char *names[NCHAN] = { "stream", "unix", "seqpacket", "dgram" };

struct chan {
	int fd;
	int msgs;		/* message boundaries matter */
	uint64_t sent;		/* bytes (stream) or messages written */
	int term_sent;		/* the terminator is out */
	unsigned char out[16];	/* the end of the last counter and the terminator */
	size_t nout, outoff;
	/* reading */
	uint64_t got;		/* words (stream) or messages received */
	unsigned char part[4];
	int npart;
	int term_state;		/* stream: 0 none, 1 marker seen (count next), 2 done */
	uint64_t peer_count;
	int bad;
};

static struct chan ch[NCHAN];

static unsigned char stream_byte(uint64_t off)
{
	uint32_t word = (uint32_t)(off / 4);

	return (word >> (8 * (off % 4))) & 0xff;
}

static size_t msg_len(uint64_t i)
{
	return 1 + (i * 37) % 200;
}

static void make_msg(uint64_t i, unsigned char *buf)
{
	uint32_t w = (uint32_t)i;
	size_t n = msg_len(i);

	for (size_t j = 0; j < n; j++)
		buf[j] = (i + j) & 0xff;
	memcpy(buf, &w, n < 4 ? n : 4);
}

/* Write as much as the kernel takes; 0 once it refuses (EAGAIN). */
static int fill_some(struct chan *c)
{
	unsigned char buf[4096];

	if (c->msgs) {
		make_msg(c->sent, buf);
		if (send(c->fd, buf, msg_len(c->sent), MSG_DONTWAIT) < 0)
			return 0;
		c->sent++;
		return 1;
	}
	for (size_t j = 0; j < sizeof(buf); j++)
		buf[j] = stream_byte(c->sent + j);
	ssize_t n = send(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
	if (n <= 0)
		return 0;
	c->sent += n;
	return 1;
}

/* Finish the current counter and queue the terminator (0xffffffff, count) in out[];
 * then push out[] without blocking; 1 once all of it is out. */
static int send_terminator(struct chan *c)
{
	if (!c->nout) {
		uint32_t t[2];

		if (!c->msgs)
			while ((c->sent + c->nout) % 4)
				c->out[c->nout] = stream_byte(c->sent + c->nout), c->nout++;
		t[0] = 0xffffffffu;
		t[1] = c->msgs ? (uint32_t)c->sent : (uint32_t)((c->sent + c->nout) / 4);
		memcpy(c->out + c->nout, t, sizeof(t));
		c->nout += sizeof(t);
	}
	while (c->outoff < c->nout) {
		ssize_t w = send(c->fd, c->out + c->outoff, c->nout - c->outoff, MSG_DONTWAIT);

		if (w <= 0)
			return 0;
		if (c->msgs && (size_t)w != c->nout)
			return 0;
		c->outoff += w;
	}
	return 1;
}

static void take_word(struct chan *c, uint32_t w)
{
	if (c->term_state == 1) {
		c->peer_count = w;
		c->term_state = 2;
		return;
	}
	if (c->term_state == 2) {
		c->bad = 1;
		return;
	}
	if (w == 0xffffffffu) {
		c->term_state = 1;
		return;
	}
	if (w != (uint32_t)c->got && !c->bad) {
		wl_log("bad %d %s word %llu is %u", getpid(), names[c - ch],
		       (unsigned long long)c->got, w);
		c->bad = 1;
	}
	c->got++;
}

static void read_some(struct chan *c)
{
	unsigned char buf[65536];

	for (;;) {
		ssize_t n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);

		if (n < 0)
			return;
		if (!c->msgs) {
			if (n == 0)
				return;
			for (ssize_t k = 0; k < n; k++) {
				c->part[c->npart++] = buf[k];
				if (c->npart == 4) {
					uint32_t w;

					memcpy(&w, c->part, 4);
					take_word(c, w);
					c->npart = 0;
				}
			}
			continue;
		}
		uint32_t head[2];

		if (n == 8 && (memcpy(head, buf, 8), head[0] == 0xffffffffu) && c->term_state == 0) {
			c->peer_count = head[1];
			c->term_state = 2;
			continue;
		}
		unsigned char want[256];

		make_msg(c->got, want);
		if ((size_t)n != msg_len(c->got) || memcmp(buf, want, n)) {
			if (!c->bad)
				wl_log("bad %d %s message %llu: %zd bytes", getpid(), names[c - ch],
				       (unsigned long long)c->got, n);
			c->bad = 1;
		}
		c->got++;
	}
}

static void fill(void)
{
	int more;

	do {
		more = 0;
		for (int i = 0; i < NCHAN; i++)
			while (fill_some(&ch[i]))
				more = 1;
	} while (more);
	for (int i = 0; i < NCHAN; i++)
		wl_log("queued %d %s %llu", getpid(), names[i], (unsigned long long)ch[i].sent);
}

static void drain(void)
{
	for (;;) {
		struct pollfd p[NCHAN];
		int pending = 0;

		for (int i = 0; i < NCHAN; i++) {
			p[i].fd = ch[i].fd;
			p[i].events = POLLIN | (ch[i].term_sent ? 0 : POLLOUT);
			if (!ch[i].term_sent || ch[i].term_state != 2)
				pending++;
		}
		if (!pending)
			break;
		poll(p, NCHAN, 100);
		for (int i = 0; i < NCHAN; i++) {
			read_some(&ch[i]);
			if (!ch[i].term_sent && (p[i].revents & POLLOUT))
				ch[i].term_sent = send_terminator(&ch[i]);
		}
	}
	for (int i = 0; i < NCHAN; i++) {
		struct chan *c = &ch[i];

		if (c->bad)
			continue;
		if (c->peer_count != c->got)
			wl_log("bad %d %s got %llu of %llu", getpid(), names[i],
			       (unsigned long long)c->got, (unsigned long long)c->peer_count);
		else
			wl_log("ok %d %s %llu", getpid(), names[i], (unsigned long long)c->got);
	}
	wl_log("done %d", getpid());
}

static void wait_go(const char *go)
{
	struct stat st;

	while (stat(go, &st))
		wl_sleep_ms(10);
}

int main(int argc, char **argv)
{
	int sp[2], sq[2], dg[2], ready[2], lfd, cfd;
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	pid_t child;
	char c;

	if (argc < 4)
		return 2;
	wl_open_log(argv[1]);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sq) ||
	    socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) || pipe(ready))
		return 3;
	strncpy(addr.sun_path, argv[2], sizeof(addr.sun_path) - 1);
	unlink(argv[2]);
	lfd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 4))
		return 4;
	child = fork();
	if (child < 0)
		return 5;
	if (child == 0) {
		close(lfd);
		cfd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (cfd < 0 || connect(cfd, (struct sockaddr *)&addr, sizeof(addr)))
			_exit(6);
		ch[STREAM].fd = sp[1];
		ch[UNIX].fd = cfd;
		ch[SEQPACKET].fd = sq[1];
		ch[DGRAM].fd = dg[1];
		close(sp[0]), close(sq[0]), close(dg[0]);
	} else {
		cfd = accept(lfd, NULL, NULL);
		if (cfd < 0)
			return 7;
		ch[STREAM].fd = sp[0];
		ch[UNIX].fd = cfd;
		ch[SEQPACKET].fd = sq[0];
		ch[DGRAM].fd = dg[0];
		close(sp[1]), close(sq[1]), close(dg[1]);
	}
	ch[SEQPACKET].msgs = ch[DGRAM].msgs = 1;
	fill();
	if (child == 0) {
		if (write(ready[1], "x", 1) != 1)
			_exit(8);
	} else {
		if (read(ready[0], &c, 1) != 1)
			return 8;
		wl_log("ready %d %d", getpid(), child);
	}
	wait_go(argv[3]);
	drain();
	for (unsigned long n = 1;; n++) {
		wl_log("beat %d %lu", getpid(), n);
		wl_sleep_ms(50);
	}
}
