/*
 * seed-fixed: the seed-buggy architecture done right.
 *
 *   usage: seed_fixed HOST PORT      (prints READY on stdout once listening)
 *
 * Same shape as seed-buggy: an epoll thread (epoll_wait(epfd, events, 256, 300)) that accepts
 * and queues events to 4 workers, and a separate error thread that answers malformed requests
 * with "400 Bad Request" and closes.  What changed:
 *
 *   - One owner per connection at any time.  Registration is EPOLLONESHOT, so once an event
 *     was delivered nothing else can name the connection until someone re-arms it; whoever
 *     holds it (a worker, or the error thread after a hand-over) is the only thread that may
 *     touch it, and it stops touching it the moment it re-arms.  The worker that hands a
 *     connection to the error thread does NOT re-arm; the error thread re-arms (or closes)
 *     when it is done.
 *   - EPOLLRDHUP is registered and looked at first: EPOLLERR/EPOLLHUP close at once,
 *     EPOLLRDHUP means "serve what was already received, then close".
 *   - Closing is EPOLL_CTL_DEL, then close(), then free(), all by the single owner: with the
 *     registration disarmed and deleted no event can be pending for the struct, and the fd
 *     number is released only after epoll forgot it.
 *   - Output is buffered per connection; a client that does not read gets EPOLLOUT
 *     back-pressure instead of blocking a worker.
 *   - EMFILE/ENFILE on accept pauses the (level-triggered) listener for 100 ms instead of
 *     spinning on it.
 *   - All live connections are kept in a list so SIGTERM can tear them down (and so
 *     LeakSanitizer sees no leak at exit).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>

#include "../seed-common/seed_server.h"

#define ACCEPT_PAUSE_MS 100

struct conn {
    int fd;
    char in[BUFSZ];
    size_t inlen;
    size_t skip;           /* request-body bytes still to discard */
    char *out;
    size_t outlen, outoff, outcap;
    int peer_eof;          /* peer sent FIN: answer what we have, then close */
    int close_after_flush; /* answered 400 or "Connection: close" */
    struct conn *prev, *next;
};

static pthread_mutex_t conns_mu = PTHREAD_MUTEX_INITIALIZER;
static struct conn *conns;

/* ---- connection lifetime ---------------------------------------------------------------- */

static struct conn *conn_new(int fd)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->fd = fd;
    pthread_mutex_lock(&conns_mu);
    c->next = conns;
    if (conns)
        conns->prev = c;
    conns = c;
    pthread_mutex_unlock(&conns_mu);
    return c;
}

/* Only the owner calls this; afterwards nothing may touch c. */
static void conn_close(struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    pthread_mutex_lock(&conns_mu);
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&conns_mu);
    free(c->out);
    free(c);
}

/* Graceful end after the last response: FIN first, then discard what the peer already sent
 * so that close() does not turn into an RST that could destroy the response in flight. */
static void conn_finish(struct conn *c)
{
    char sink[4096];
    if (!c->peer_eof) {
        shutdown(c->fd, SHUT_WR);
        for (int i = 0; i < 16; i++) {
            ssize_t n = read(c->fd, sink, sizeof sink);
            if (n <= 0 && !(n < 0 && errno == EINTR))
                break;
        }
    }
    conn_close(c);
}

/* Hand the connection back to epoll.  Afterwards nothing may touch c. */
static void conn_arm(struct conn *c, uint32_t what)
{
    struct epoll_event ev = {.events = what | EPOLLRDHUP | EPOLLONESHOT | EPOLLET,
                             .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        conn_close(c);
}

static int out_append(struct conn *c, const char *p, size_t n)
{
    if (c->outlen + n > c->outcap) {
        size_t ncap = c->outcap ? c->outcap : 4096;
        char *no;
        while (ncap < c->outlen + n)
            ncap *= 2;
        no = realloc(c->out, ncap);
        if (!no)
            return -1;
        c->out = no;
        c->outcap = ncap;
    }
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
    return 0;
}

/* 1: all written, 0: would block, -1: connection broken. */
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

/* The owner is done for now: write what is pending, then close or wait for more. */
static void conn_settle(struct conn *c)
{
    int r = out_flush(c);
    if (r < 0)
        conn_close(c);
    else if (r == 0)
        conn_arm(c, EPOLLOUT);
    else if (c->close_after_flush || c->peer_eof)
        conn_finish(c);
    else
        conn_arm(c, EPOLLIN);
}

/* ---- HTTP ------------------------------------------------------------------------------- */

static int queue_response(struct conn *c, const struct request *rq)
{
    char head[160];
    int h = response_head(head, sizeof head, rq);
    if (out_append(c, head, (size_t)h) < 0 || out_append(c, rq->path, rq->path_len) < 0 ||
        out_append(c, "\n", 1) < 0)
        return -1;
    return 0;
}

enum serve_result { SERVE_OK, SERVE_BAD, SERVE_FAIL };

/* Answer every complete request in c->in into c->out. */
static enum serve_result serve(struct conn *c)
{
    size_t off = 0;
    enum serve_result r = SERVE_OK;

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
            if (off == 0 && c->inlen == sizeof c->in)
                r = SERVE_BAD; /* header block larger than the buffer */
            break;
        }
        if (parse_request(c->in + off, (size_t)(hdr_end + 4 - (c->in + off)), &rq) < 0) {
            r = SERVE_BAD;
            break;
        }
        if (queue_response(c, &rq) < 0) {
            r = SERVE_FAIL;
            break;
        }
        off = (size_t)(hdr_end + 4 - c->in);
        c->skip = rq.content_length;
        if (rq.close)
            c->close_after_flush = 1;
    }
    if (r != SERVE_OK || c->close_after_flush)
        off = c->inlen;
    memmove(c->in, c->in + off, c->inlen - off);
    c->inlen -= off;
    return r;
}

/* ---- the error thread ------------------------------------------------------------------- */

static void *error_main(void *arg)
{
    struct item it;
    (void)arg;
    /* The error thread owns each connection it pops: the worker did not re-arm. */
    while (queue_pop(&error_q, &it)) {
        struct conn *c = it.c;
        c->close_after_flush = 1;
        if (out_append(c, RESP_400, sizeof RESP_400 - 1) < 0)
            conn_close(c);
        else
            conn_settle(c);
    }
    return NULL;
}

/* ---- workers ---------------------------------------------------------------------------- */

static void handle(struct conn *c, uint32_t events)
{
    if (events & (EPOLLERR | EPOLLHUP)) {
        /* RST, or both directions shut: nothing can be delivered any more */
        conn_close(c);
        return;
    }
    if (events & EPOLLRDHUP)
        c->peer_eof = 1;

    if (c->outoff < c->outlen) {
        int r = out_flush(c);
        if (r < 0) {
            conn_close(c);
            return;
        }
        if (r == 0) {
            conn_arm(c, EPOLLOUT);
            return;
        }
        if (c->close_after_flush) {
            conn_finish(c);
            return;
        }
    }

    for (;;) {
        ssize_t n;
        enum serve_result sr;

        if (c->close_after_flush)
            break;
        n = read(c->fd, c->in + c->inlen, sizeof c->in - c->inlen);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n < 0) {
            conn_close(c);
            return;
        }
        if (n == 0) {
            c->peer_eof = 1;
            break;
        }
        c->inlen += (size_t)n;
        sr = serve(c);
        if (sr == SERVE_FAIL) {
            conn_close(c);
            return;
        }
        if (sr == SERVE_BAD) {
            /* Hand over ownership: the error thread answers, then re-arms or closes.
             * The worker must not re-arm and must not touch c after the push. */
            if (queue_push(&error_q, c, 0) < 0)
                conn_close(c);
            return;
        }
        if (c->outlen - c->outoff >= 64 * 1024) {
            /* the client pipelines faster than it reads: stop reading until it drains */
            int r = out_flush(c);
            if (r < 0) {
                conn_close(c);
                return;
            }
            if (r == 0) {
                conn_arm(c, EPOLLOUT);
                return;
            }
        }
    }
    conn_settle(c);
}

static void *worker_main(void *arg)
{
    struct item it;
    (void)arg;
    while (queue_pop(&work_q, &it))
        handle(it.c, it.events);
    return NULL;
}

/* ---- the epoll thread ------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t accept_paused_until; /* 0 = accepting */
static int warned_accept;

static void listener_arm(uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = &listener_tag};
    epoll_ctl(epfd, EPOLL_CTL_MOD, lfd, &ev);
}

static void accept_all(void)
{
    for (;;) {
        struct conn *c;
        struct epoll_event ev;
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            /* EMFILE, ENFILE, ENOBUFS, ENOMEM...: the pending connection stays in the
             * backlog and the level-triggered listener would wake epoll_wait again at once,
             * so stop watching it for a while instead of spinning. */
            if (!warned_accept) {
                warned_accept = 1;
                fprintf(stderr, "seed_fixed: accept: %s; pausing accepts for %d ms\n",
                        strerror(errno), ACCEPT_PAUSE_MS);
            }
            listener_arm(0);
            accept_paused_until = now_ms() + ACCEPT_PAUSE_MS;
            return;
        }
        c = conn_new(fd);
        if (!c) {
            close(fd);
            continue;
        }
        ev.events = EPOLLIN | EPOLLRDHUP | EPOLLONESHOT | EPOLLET;
        ev.data.ptr = c;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            conn_close(c);
    }
}

static void *epoll_main(void *arg)
{
    struct epoll_event events[MAXEVENTS];
    (void)arg;
    while (!stop_flag) {
        int timeout = 300;
        int n;
        if (accept_paused_until) {
            int64_t left = accept_paused_until - now_ms();
            if (left <= 0) {
                accept_paused_until = 0;
                listener_arm(EPOLLIN);
            } else if (left < timeout) {
                timeout = (int)left;
            }
        }
        n = epoll_wait(epfd, events, MAXEVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == &listener_tag) {
                accept_all();
            } else if (queue_push(&work_q, events[i].data.ptr, events[i].events) < 0) {
                /* cannot queue it: the epoll thread is the owner now */
                conn_close(events[i].data.ptr);
            }
        }
    }
    queue_close(&work_q);
    queue_close(&error_q);
    return NULL;
}

/* ---- main ------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    struct seed_threads t = {
        .worker_main = worker_main, .error_main = error_main, .epoll_main = epoll_main};
    int status = seed_serve(argc, argv, "seed_fixed", &t);

    if (status != 0)
        return status;
    for (int i = 0; i < NWORKERS; i++)
        pthread_join(t.workers[i], NULL);
    pthread_join(t.error_thread, NULL);

    /* Every thread is gone, so whatever is still listed (idle, queued or mid-hand-over when
     * the queues closed) has no other owner. */
    while (conns)
        conn_close(conns);
    free(work_q.items);
    free(error_q.items);
    close(epfd);
    close(lfd);
    return 0;
}
