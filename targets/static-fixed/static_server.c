/*
 * static-fixed / static-buggy: a single-threaded epoll HTTP/1.1 server, linked statically.
 *
 *   usage: static_server HOST PORT      (prints READY on stdout once listening)
 *
 * Built twice from this one file (see the two target.toml): static-fixed as is, static-buggy
 * with -DAFTERCLOSE_BUG.  Being a static binary, the LD_PRELOAD shim cannot see any of its
 * syscalls: this is the eBPF tracer's target (--tracer=ebpf, picked by --tracer=auto).
 *
 * One loop: epoll_wait(epfd, events, 64, 300); the listener is level-triggered, connections
 * are non-blocking, registered EPOLLIN|EPOLLRDHUP with data.ptr = a malloc'd struct conn.
 * A request is answered with its path as the body; "Connection: close" or a malformed request
 * (400) closes after the answer; a peer's EOF or an error closes at once.
 *
 * THE BUG (AFTERCLOSE_BUG only): a read or write error (ECONNRESET from a client's RST, EPIPE)
 * goes through conn_fail(), which closes the socket "to free it early" -- and then the common
 * teardown conn_close() deletes the registration and closes the same number again, with a raw
 * syscall(SYS_close) as some libraries do.  The DEL and the second close fail with EBADF
 * (use-after-close); had another thread accepted in between, they would have hit a stranger.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/syscall.h>

#include "../seed-common/http_server.h"

#define MAXEVENTS 64
#define BUFSZ 8192

struct conn {
    int fd;
    int failed; /* a read or write error: tear down now */
    char in[BUFSZ];
    size_t inlen;
    size_t skip; /* request-body bytes still to discard */
    char out[BUFSZ];
    size_t outlen, outoff;
    int close_after_flush; /* answered 400 or "Connection: close" */
    int peer_eof;          /* the peer sent FIN: answer what came, then close */
    int want_out;          /* registered for EPOLLOUT */
};

static int epfd = -1;
static int lfd = -1;
static char listener_tag;
static long nconns;

static void conn_close(struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
#ifdef AFTERCLOSE_BUG
    syscall(SYS_close, c->fd); /* raw: libraries do it, the shim never sees it */
#else
    close(c->fd);
#endif
    free(c);
    nconns--;
}

static void conn_fail(struct conn *c)
{
    c->failed = 1;
#ifdef AFTERCLOSE_BUG
    close(c->fd); /* "free the socket early": conn_close() will close it again */
#endif
}

static int out_append(struct conn *c, const char *p, size_t n)
{
    if (c->outlen + n > sizeof c->out)
        return -1;
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
    return 0;
}

/* Queue the answer to rq; -1 if it does not fit in the output buffer. */
static int answer(struct conn *c, const struct request *rq)
{
    char out[BUFSZ + 256];
    int n = format_response(out, sizeof out, rq);

    if (rq->close)
        c->close_after_flush = 1;
    return n < 0 ? -1 : out_append(c, out, (size_t)n);
}

/* Answer every complete request buffered in c->in. */
static void serve(struct conn *c)
{
    size_t off = 0;
    while (!c->close_after_flush) {
        struct request rq;
        int got = next_request(c->in, c->inlen, sizeof c->in, &off, &c->skip, &rq);
        if (got == 0)
            break;
        if (got < 0 || answer(c, &rq) < 0)
            goto bad;
    }
    if (c->close_after_flush)
        off = c->inlen;
    memmove(c->in, c->in + off, c->inlen - off);
    c->inlen -= off;
    return;
bad:
    c->outlen = c->outoff = 0;
    out_append(c, RESP_400, sizeof RESP_400 - 1);
    c->close_after_flush = 1;
    c->inlen = 0;
}

/* Registered for input until the peer's EOF, and for output while an answer waits. */
static void rearm(struct conn *c, int want_out)
{
    struct epoll_event ev = {.events = (c->peer_eof ? 0 : EPOLLIN | EPOLLRDHUP) |
                                       (want_out ? EPOLLOUT : 0),
                             .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        conn_fail(c);
    c->want_out = want_out;
}

static void handle(struct conn *c, uint32_t events)
{
    int done = 0;
    if (!c->peer_eof && (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
        for (;;) {
            ssize_t n;
            if (c->inlen == sizeof c->in)
                break;
            n = read(c->fd, c->in + c->inlen, sizeof c->in - c->inlen);
            if (n > 0) {
                c->inlen += (size_t)n;
                continue;
            }
            if (n == 0)
                c->peer_eof = 1;
            else if (errno == EINTR)
                continue;
            else if (errno != EAGAIN && errno != EWOULDBLOCK)
                conn_fail(c); /* ECONNRESET: the client's RST */
            break;
        }
    }
    if (!c->failed) {
        if (c->inlen)
            serve(c);
        int r = send_pending(c->fd, c->out, &c->outoff, &c->outlen);
        if (r < 0)
            conn_fail(c);
        else if (r > 0 && (c->close_after_flush || c->peer_eof))
            done = 1; /* answered everything the peer will ever get */
        else if ((r == 0) != c->want_out || (c->peer_eof && !(events & EPOLLOUT)))
            rearm(c, r == 0);
    }
    if (c->failed || done)
        conn_close(c);
}

static void accept_all(void)
{
    for (;;) {
        int fd = accept_conn(lfd);
        if (fd < 0)
            return; /* EAGAIN, or EMFILE: the listener stays level-triggered */
        struct conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c);
            continue;
        }
        nconns++;
    }
}

int main(int argc, char **argv)
{
    struct sockaddr_in addr = {.sin_family = AF_INET};
    struct epoll_event events[MAXEVENTS];
    int one = 1;

    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    stop_on_signals();
    /* IPv4 by hand rather than listen_on(): getaddrinfo in a static binary wants glibc's
     * shared NSS modules at run time. */
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "static_server: %s: not an IPv4 address\n", argv[1]);
        return 1;
    }
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        perror("static_server: listen");
        return 1;
    }
    epfd = epoll_watching("static_server: epoll", lfd, (epoll_data_t){.ptr = &listener_tag});
    if (epfd < 0)
        return 1;
    printf("READY\n");
    fflush(stdout);

    while (!stop_flag) {
        int n = epoll_wait(epfd, events, MAXEVENTS, 300);
        if (n < 0 && errno != EINTR) {
            perror("static_server: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == &listener_tag)
                accept_all();
            else
                handle(events[i].data.ptr, events[i].events);
        }
    }
    close(epfd);
    close(lfd);
    return 0;
}
