/*
 * zoo_http.h: what every zoo target shares, so that each target's file holds only its
 * mechanism: listening, accepting (zh_accept_next, zh_conn_new), the epoll set-up and wait
 * (zh_epoll, zh_wait, and zh_run, the whole loop of the targets whose epoll data is a
 * pointer), and answering HTTP/1.1 GET requests on a non-blocking connection the way
 * targets/seed-fixed does (200 with the path as the body, 400 and close on a malformed
 * request, "Connection: close" and HTTP/1.0 honoured, EPOLLRDHUP means "answer what was
 * received, then close").
 *
 * A connection's owner calls zh_handle(c, events) when epoll reported it; the answer says what
 * to wait for next (ZH_READ, ZH_WRITE) or that the owner must now close it (ZH_CLOSE: the
 * peer is done with it or it broke; the graceful FIN has already been sent).
 */
#ifndef ZOO_HTTP_H
#define ZOO_HTTP_H

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../../common/http_parse.h"
#include "../../common/start.h"

#define ZH_BUFSZ 8192
#define ZH_ACCEPT_PAUSE_MS 100

struct zh_conn {
    int fd;
    char in[ZH_BUFSZ];
    size_t inlen;
    size_t skip; /* request-body bytes still to discard */
    char *out;
    size_t outlen, outoff, outcap;
    int peer_eof;          /* peer sent FIN: answer what we have, then close */
    int close_after_flush; /* answered 400 or "Connection: close" */
    unsigned long answered; /* requests answered so far */
};

enum zh_next { ZH_READ, ZH_WRITE, ZH_CLOSE };

static inline int64_t zh_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void zh_sleep_us(long us)
{
    struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR && !stop_flag)
        ;
}

static inline void zh_conn_init(struct zh_conn *c, int fd)
{
    memset(c, 0, sizeof *c);
    c->fd = fd;
}

/* Frees what the connection holds besides itself (not the fd: closing is the owner's). */
static inline void zh_conn_release(struct zh_conn *c)
{
    free(c->out);
    c->out = NULL;
    c->outlen = c->outoff = c->outcap = 0;
}

static inline int zh_out_append(struct zh_conn *c, const char *p, size_t n)
{
    return buf_append(&c->out, &c->outlen, &c->outcap, p, n);
}

static inline int zh_pending(const struct zh_conn *c)
{
    return c->outoff < c->outlen;
}

/* 1: all written, 0: would block, -1: connection broken. */
static inline int zh_flush(struct zh_conn *c)
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

/* Graceful end after the last answer: FIN first, then discard what the peer already sent,
 * so that close() does not turn into an RST that could destroy the answer in flight. */
static inline void zh_finish(struct zh_conn *c)
{
    char sink[4096];
    if (c->peer_eof)
        return;
    shutdown(c->fd, SHUT_WR);
    for (int i = 0; i < 16; i++) {
        ssize_t n = read(c->fd, sink, sizeof sink);
        if (n <= 0 && !(n < 0 && errno == EINTR))
            break;
    }
}

/* ---- HTTP ------------------------------------------------------------------------------- */

static inline int zh_answer(struct zh_conn *c, const struct request *rq)
{
    char head[160];
    int h = response_head(head, sizeof head, rq);
    if (zh_out_append(c, head, (size_t)h) < 0 || zh_out_append(c, rq->path, rq->path_len) < 0 ||
        zh_out_append(c, "\n", 1) < 0)
        return -1;
    c->answered++;
    return 0;
}

/* Answer every complete request in c->in into c->out.  -1: out of memory. */
static inline int zh_serve(struct zh_conn *c)
{
    size_t off = 0;
    int r = 0;

    while (!c->close_after_flush) {
        struct request rq;
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
            if (off == 0 && c->inlen == sizeof c->in) {
                c->close_after_flush = 1; /* header block larger than the buffer */
                r = zh_out_append(c, RESP_400, sizeof RESP_400 - 1);
            }
            break;
        }
        if (parse_request(c->in + off, (size_t)(hdr_end + 4 - (c->in + off)), &rq) < 0) {
            c->close_after_flush = 1;
            r = zh_out_append(c, RESP_400, sizeof RESP_400 - 1);
            break;
        }
        if (zh_answer(c, &rq) < 0) {
            r = -1;
            break;
        }
        off = (size_t)(hdr_end + 4 - c->in);
        c->skip = rq.content_length;
        if (rq.close)
            c->close_after_flush = 1;
    }
    if (r < 0 || c->close_after_flush)
        off = c->inlen;
    memmove(c->in, c->in + off, c->inlen - off);
    c->inlen -= off;
    return r;
}

/* Read what is there and answer it into c->out.  0: fine (c->peer_eof may now be set),
 * -1: the connection broke. */
static inline int zh_read_serve(struct zh_conn *c)
{
    while (!c->close_after_flush) {
        ssize_t n = read(c->fd, c->in + c->inlen, sizeof c->in - c->inlen);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n < 0)
            return -1;
        if (n == 0) {
            c->peer_eof = 1;
            break;
        }
        c->inlen += (size_t)n;
        if (zh_serve(c) < 0)
            return -1;
        if (c->outlen - c->outoff >= 64 * 1024) {
            /* the client pipelines faster than it reads: stop reading until it drains */
            int r = zh_flush(c);
            if (r < 0)
                return -1;
            if (r == 0)
                break;
        }
    }
    return 0;
}

/* What to do after the answers are queued: write them, then close or wait for more. */
static inline enum zh_next zh_settle(struct zh_conn *c)
{
    int r = zh_flush(c);
    if (r < 0)
        return ZH_CLOSE;
    if (r == 0)
        return ZH_WRITE;
    if (c->close_after_flush || c->peer_eof) {
        zh_finish(c);
        return ZH_CLOSE;
    }
    return ZH_READ;
}

static inline enum zh_next zh_handle(struct zh_conn *c, uint32_t events)
{
    if (events & (EPOLLERR | EPOLLHUP))
        return ZH_CLOSE; /* RST, or both directions shut: nothing can be delivered any more */
    if (events & EPOLLRDHUP)
        c->peer_eof = 1;
    if (zh_pending(c)) {
        int r = zh_flush(c);
        if (r < 0)
            return ZH_CLOSE;
        if (r == 0)
            return ZH_WRITE;
    }
    if (zh_read_serve(c) < 0)
        return ZH_CLOSE;
    return zh_settle(c);
}

/* ---- listening and accepting ------------------------------------------------------------ */

/* Parse the command line, install the signal handlers, listen (non-blocking).  Returns the
 * listening fd or exits. */
static inline int zh_start(int argc, char **argv)
{
    int fd;

    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        exit(2);
    }
    stop_on_signals();
    fd = listen_on(argv[0], argv[1], argv[2]);
    if (fd < 0)
        exit(1);
    return fd;
}

static inline void zh_ready(void)
{
    printf("READY\n");
    fflush(stdout);
}

/* One accept.  >= 0: the new (non-blocking) fd; -1: nothing more to accept now; -2: out of
 * fds or memory: the pending connection stays in the backlog, and a level-triggered listener
 * would wake the loop again at once, so the caller stops watching it for ZH_ACCEPT_PAUSE_MS. */
static inline int zh_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0)
            return fd;
        if (errno == EINTR || errno == ECONNABORTED)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINVAL || errno == EBADF)
            return -1;
        return -2;
    }
}

/* A listener registered in epoll that pauses itself while accept runs out of fds. */
struct zh_listener {
    int fd;
    int epfd;
    uint64_t data;
    int64_t paused_until; /* 0 = accepting */
};

static inline int zh_listener_add(struct zh_listener *l, int epfd, int fd, uint64_t data)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = data};
    l->fd = fd;
    l->epfd = epfd;
    l->data = data;
    l->paused_until = 0;
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

static inline void zh_listener_pause(struct zh_listener *l)
{
    struct epoll_event ev = {.events = 0, .data.u64 = l->data};
    epoll_ctl(l->epfd, EPOLL_CTL_MOD, l->fd, &ev);
    l->paused_until = zh_now_ms() + ZH_ACCEPT_PAUSE_MS;
}

/* The epoll_wait timeout to use (at most max_ms), resuming the listener when its pause ends. */
static inline int zh_listener_timeout(struct zh_listener *l, int max_ms)
{
    if (l->paused_until) {
        int64_t left = l->paused_until - zh_now_ms();
        if (left <= 0) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = l->data};
            l->paused_until = 0;
            epoll_ctl(l->epfd, EPOLL_CTL_MOD, l->fd, &ev);
        } else if (left < max_ms) {
            return (int)left;
        }
    }
    return max_ms;
}

/* The next connection to accept: its fd, or -1 when there is none now (out of fds, the
 * listener pauses itself: see zh_accept). */
static inline int zh_accept_next(struct zh_listener *l)
{
    int fd = zh_accept(l->fd);
    if (fd == -2)
        zh_listener_pause(l);
    return fd < 0 ? -1 : fd;
}

/* A zeroed connection object of `size` bytes whose first member is a struct zh_conn, for fd;
 * NULL (and fd closed) when fd is not below max_fd or memory is short. */
static inline void *zh_conn_new(int fd, size_t size, int max_fd)
{
    struct zh_conn *z = fd < max_fd ? calloc(1, size) : NULL;
    if (!z) {
        close(fd);
        return NULL;
    }
    zh_conn_init(z, fd);
    return z;
}

/* Runs the statement that follows once per connection accepted from l, with fd its number and
 * c (a pointer to the target's connection type, whose first member is a struct zh_conn) a new
 * object for it; connections zh_conn_new refuses are closed and skipped.  A macro, not a
 * callback, so that each target's accept loop compiles as if written out in place. */
#define ZH_EACH_ACCEPTED(l, fd, c, max_fd)                                                      \
    for (int fd; ((fd) = zh_accept_next(l)) >= 0;)                                             \
        if (((c) = zh_conn_new((fd), sizeof *(c), (max_fd))) != NULL)

static inline int zh_watch(int epfd, int op, int fd, uint32_t events, uint64_t data)
{
    struct epoll_event ev = {.events = events, .data.u64 = data};
    return epoll_ctl(epfd, op, fd, &ev);
}

/* An epoll instance watching the listener lfd (tagged data), or exits. */
static inline int zh_epoll(struct zh_listener *l, int lfd, uint64_t data)
{
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0 || zh_listener_add(l, epfd, lfd, data) < 0) {
        perror("epoll");
        exit(1);
    }
    return epfd;
}

/* One epoll_wait: the number of events (0 when a signal interrupted it), or -1 on an error
 * the loop cannot go on after (reported). */
static inline int zh_wait(int epfd, struct epoll_event *events, int max, int timeout_ms)
{
    int n = epoll_wait(epfd, events, max, timeout_ms);
    if (n >= 0 || errno == EINTR)
        return n < 0 ? 0 : n;
    perror("epoll_wait");
    return -1;
}

/* The peer sent its FIN or a reset (TCP state CLOSE_WAIT or CLOSE) and every byte it sent has
 * been read: the connection can only still owe it answers. */
static inline int zh_peer_gone(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof ti;
    int unread = 0;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
        return 0;
    if (ti.tcpi_state != TCP_CLOSE_WAIT && ti.tcpi_state != TCP_CLOSE)
        return 0;
    return ioctl(fd, FIONREAD, &unread) == 0 && unread == 0;
}

/* An eventfd that ends a wait on epfd (its events carry tag), or exits. */
static inline int zh_wake_fd(int epfd, uint64_t tag)
{
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0 || zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN, tag) < 0) {
        perror("eventfd");
        exit(1);
    }
    return fd;
}

/* The loop of the targets whose epoll data is a connection's pointer: each batch's events for
 * the listener (data == the listener's tag) go to accept, those for connections to dispatch;
 * data below ZH_TAGS (no pointer is that small) tags a wake-up, which only ends the wait.
 * before and after (optional) run before each wait and after each batch. */
#define ZH_TAGS 16
#define ZH_MAXEVENTS 256

struct zh_loop {
    int epfd;
    struct zh_listener *l;
    void (*accept)(struct zh_listener *l);
    void (*dispatch)(void *conn, uint32_t events);
    void (*before)(void);
    void (*after)(void);
};

static inline void zh_run(const struct zh_loop *lp)
{
    struct epoll_event events[ZH_MAXEVENTS];
    while (!stop_flag) {
        int n;
        if (lp->before)
            lp->before();
        n = zh_wait(lp->epfd, events, ZH_MAXEVENTS, zh_listener_timeout(lp->l, 300));
        if (n < 0)
            break;
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == lp->l->data)
                lp->accept(lp->l);
            else if (events[i].data.u64 >= ZH_TAGS)
                lp->dispatch(events[i].data.ptr, events[i].events);
        }
        if (lp->after)
            lp->after();
    }
}

#endif
