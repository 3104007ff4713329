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

#include "../seed-common/seed_server.h"
#include "../common/list.h"

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
    LIST_PUSH(conns, c);
    pthread_mutex_unlock(&conns_mu);
    return c;
}

/* Only the owner calls this; afterwards nothing may touch c. */
static void conn_close(struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    pthread_mutex_lock(&conns_mu);
    LIST_UNLINK(conns, c);
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
    return buf_append(&c->out, &c->outlen, &c->outcap, p, n);
}

/* Write what is pending.  1: c is gone (closed, or handed back to epoll until it can take
 * more), 0: all written. */
static int conn_flush(struct conn *c)
{
    int r = send_pending(c->fd, c->out, &c->outoff, &c->outlen);
    if (r < 0)
        conn_close(c);
    else if (r == 0)
        conn_arm(c, EPOLLOUT);
    return r <= 0;
}

/* The owner is done for now: write what is pending, then close or wait for more. */
static void conn_settle(struct conn *c)
{
    if (conn_flush(c))
        return;
    if (c->close_after_flush || c->peer_eof)
        conn_finish(c);
    else
        conn_arm(c, EPOLLIN);
}

/* ---- HTTP ------------------------------------------------------------------------------- */

static int queue_response(struct conn *c, const struct request *rq)
{
    char out[BUFSZ + 256];
    int n = format_response(out, sizeof out, rq);
    return n < 0 ? -1 : out_append(c, out, (size_t)n);
}

enum serve_result { SERVE_OK, SERVE_BAD, SERVE_FAIL };

/* Answer every complete request in c->in into c->out. */
static enum serve_result serve(struct conn *c)
{
    size_t off = 0;
    enum serve_result r = SERVE_OK;

    while (!c->close_after_flush) {
        struct request rq;
        int got = next_request(c->in, c->inlen, sizeof c->in, &off, &c->skip, &rq);

        if (got == 0)
            break;
        if (got < 0) {
            r = SERVE_BAD;
            break;
        }
        if (queue_response(c, &rq) < 0) {
            r = SERVE_FAIL;
            break;
        }
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
        if (conn_flush(c))
            return;
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
        /* the client pipelines faster than it reads: stop reading until it drains */
        if (c->outlen - c->outoff >= 64 * 1024 && conn_flush(c))
            return;
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

static int64_t accept_paused_until; /* 0 = accepting */
static int warned_accept;

#define LISTENER_DATA ((epoll_data_t){.ptr = &listener_tag})

static void accept_all(void)
{
    for (;;) {
        struct conn *c;
        struct epoll_event ev;
        int fd = accept_conn(lfd);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (!warned_accept) {
                warned_accept = 1;
                fprintf(stderr, "seed_fixed: accept: %s; pausing accepts for %d ms\n",
                        strerror(errno), ACCEPT_PAUSE_MS);
            }
            listener_pause(epfd, lfd, LISTENER_DATA, &accept_paused_until, ACCEPT_PAUSE_MS);
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

/* epoll_wait wakes up for the end of an accept pause. */
static int shorten_for_pause(int timeout)
{
    return listener_pause_timeout(epfd, lfd, LISTENER_DATA, &accept_paused_until, timeout);
}

/* An event that could not be queued: the epoll thread is the owner now. */
static void close_unqueued(void *c)
{
    conn_close(c);
}

static void *epoll_main(void *arg)
{
    (void)arg;
    seed_epoll_loop(accept_all, shorten_for_pause, close_unqueued);
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
