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
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

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

static volatile sig_atomic_t stop_flag;
static int epfd = -1;
static int lfd = -1;
static char listener_tag;
static long nconns;

static const char RESP_400[] = "HTTP/1.1 400 Bad Request\r\n"
                               "Content-Type: text/plain\r\n"
                               "Content-Length: 12\r\n"
                               "Connection: close\r\n"
                               "\r\n"
                               "bad request\n";

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

/* 1: all written, 0: would block, -1: broken. */
static int out_flush(struct conn *c)
{
    while (c->outoff < c->outlen) {
        ssize_t w = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
        if (w > 0)
            c->outoff += (size_t)w;
        else if (w < 0 && errno == EINTR)
            continue;
        else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        else
            return -1;
    }
    c->outoff = c->outlen = 0;
    return 1;
}

static int out_append(struct conn *c, const char *p, size_t n)
{
    if (c->outlen + n > sizeof c->out)
        return -1;
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
    return 0;
}

static int ci_contains(const char *s, size_t n, const char *word)
{
    size_t w = strlen(word);
    for (size_t i = 0; i + w <= n; i++)
        if (strncasecmp(s + i, word, w) == 0)
            return 1;
    return 0;
}

/* Parse one header block [p, p+n) ending in CRLFCRLF and queue its answer; -1 = malformed. */
static int answer(struct conn *c, const char *p, size_t n)
{
    const char *end = p + n, *eol = memmem(p, n, "\r\n", 2), *s = p, *path;
    size_t path_len, cl = 0;
    int minor, keep_alive = 0, close_hdr = 0;
    char head[160];

    if (!eol)
        return -1;
    while (s < eol && *s >= 'A' && *s <= 'Z')
        s++;
    if (s == p || s >= eol || *s != ' ' || s + 1 >= eol || s[1] != '/')
        return -1;
    path = ++s;
    while (s < eol && *s > ' ' && *s < 0x7f)
        s++;
    path_len = (size_t)(s - path);
    if (s >= eol || *s != ' ')
        return -1;
    s++;
    if (eol - s != 8 || memcmp(s, "HTTP/1.", 7) != 0 || s[7] < '0' || s[7] > '9')
        return -1;
    minor = s[7] - '0';
    for (s = eol + 2; s < end;) {
        const char *le = memmem(s, (size_t)(end - s), "\r\n", 2), *colon;
        if (!le || le == s)
            break;
        colon = memchr(s, ':', (size_t)(le - s));
        if (!colon)
            return -1;
        if ((size_t)(colon - s) == 10 && strncasecmp(s, "connection", 10) == 0) {
            close_hdr |= ci_contains(colon + 1, (size_t)(le - colon - 1), "close");
            keep_alive |= ci_contains(colon + 1, (size_t)(le - colon - 1), "keep-alive");
        } else if ((size_t)(colon - s) == 14 && strncasecmp(s, "content-length", 14) == 0) {
            const char *v = colon + 1;
            while (v < le && *v == ' ')
                v++;
            if (v == le)
                return -1;
            for (; v < le && *v != ' '; v++) {
                if (*v < '0' || *v > '9' || cl > (SIZE_MAX - 9) / 10)
                    return -1;
                cl = cl * 10 + (size_t)(*v - '0');
            }
        }
        s = le + 2;
    }
    if (close_hdr || (minor == 0 && !keep_alive))
        c->close_after_flush = 1;
    c->skip = cl;
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                     path_len + 1, c->close_after_flush ? "Connection: close\r\n" : "");
    if (out_append(c, head, (size_t)h) < 0 || out_append(c, path, path_len) < 0 ||
        out_append(c, "\n", 1) < 0)
        return -1;
    return 0;
}

/* Answer every complete request buffered in c->in. */
static void serve(struct conn *c)
{
    size_t off = 0;
    while (!c->close_after_flush) {
        const char *hdr_end;
        if (c->skip > 0) {
            size_t k = c->inlen - off < c->skip ? c->inlen - off : c->skip;
            off += k;
            c->skip -= k;
            if (c->skip > 0)
                break;
        }
        hdr_end = memmem(c->in + off, c->inlen - off, "\r\n\r\n", 4);
        if (!hdr_end) {
            if (off == 0 && c->inlen == sizeof c->in)
                goto bad; /* a header block larger than the buffer */
            break;
        }
        if (answer(c, c->in + off, (size_t)(hdr_end + 4 - (c->in + off))) < 0)
            goto bad;
        off = (size_t)(hdr_end + 4 - c->in);
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
        int r = out_flush(c);
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
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN, or EMFILE: the listener stays level-triggered */
        }
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

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    struct sockaddr_in addr = {.sin_family = AF_INET};
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    struct epoll_event events[MAXEVENTS];
    int one = 1;

    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

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
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        perror("static_server: epoll");
        return 1;
    }
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
