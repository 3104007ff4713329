/*
 * loop: a small epoll HTTP server -- one event thread plus an access-logger thread -- with one
 * selectable, deliberate fd-lifecycle bug.  tests/test_lifecycle_rules.py runs it under the
 * LD_PRELOAD tracer to prove that each traced rule fires on a real server, and that MODE=none
 * is reported for nothing.
 *
 *   usage: loop HOST PORT MODE       (prints READY on stdout once listening)
 *
 * It answers "GET /path HTTP/1.x" with 200 and body "/path\n" (keep-alive, pipelining,
 * "Connection: close"); a malformed request gets 400 and the connection is closed.
 * SIGTERM/SIGINT exit 0.
 *
 * Design (every mode):
 *   - the event thread E accepts (the listener is in the epoll set) and registers each connection
 *     EPOLLIN|EPOLLRDHUP, level-triggered, data.ptr = its struct client;
 *   - the access logger L logs every connection when it ends.  It wants the peer address and a
 *     reference that outlives the event loop's close, so E gives it a dup() of the connection at
 *     accept (c->logfd).  L works in batches (it sleeps LOG_BATCH_US after being woken), closes
 *     logfd and hands the client back to E, which frees it: E owns client memory;
 *   - E ends a connection itself on EOF, on a read/write error and after a 400: conn_end() =
 *     EPOLL_CTL_DEL, close(fd), hand the client to L;
 *   - after answering "Connection: close" the close is a "lingering close" done by L: E marks the
 *     client closing and hands it over still registered; L closes logfd, then fd -- the last
 *     reference to the file, which removes the registration -- and hands the client back;
 *   - E skips events for clients that are closing or not in its registry of live clients (a
 *     pointer set: membership is checked without touching the memory, so a mode that frees a
 *     client early cannot crash this test server -- the tracer is what must notice); after a
 *     batch with nothing but such events it backs off for SKIP_BACKOFF_US rather than spin.
 *
 * MODE (one bug each):
 *   none                    correct
 *   event-after-close       conn_end() closes without EPOLL_CTL_DEL.  The logger's dup keeps the
 *                           open file, so the registration survives the close (epoll(7), Q6);
 *                           the peer is gone, the fd stays readable, and E keeps getting events
 *                           for the closed fd until L closes its dup
 *   use-after-close         on a read/write error the helper closes the fd and the caller closes
 *                           it again: EBADF (nothing else creates fds meanwhile)
 *   fd-leak                 on EOF the fd is removed from epoll but never closed (CLOSE_WAIT)
 *   event-for-freed-data    on EOF, E frees the client at once and leaves close (and so the
 *                           unregistration) to L; the EOF keeps the fd readable, so E gets events
 *                           carrying the freed pointer until L closes it.  (Its cause, the free of
 *                           a registered pointer, is reported as freed-while-registered too.)
 *   freed-while-registered  the lingering close frees the client before closing its fd: for a
 *                           moment the registration is armed, E sits in epoll_wait, and an event
 *                           (a late RST, say) would hand it a freed pointer
 */
#define _GNU_SOURCE
#include <stdlib.h>

#define BUFSZ 8192
#include "../servers/common.h"

#define LIVE_SLOTS 16384   /* power of two; at most LIVE_MAX live clients */
#define LIVE_MAX 8192
#define LOG_BATCH_US 500
#define SKIP_BACKOFF_US 200

enum mode { M_NONE, M_EVENT_AFTER_CLOSE, M_USE_AFTER_CLOSE, M_FD_LEAK, M_EVENT_FOR_FREED,
            M_FREED_WHILE_REGISTERED };

static const char *const MODES[] = {
    [M_NONE] = "none",
    [M_EVENT_AFTER_CLOSE] = "event-after-close",
    [M_USE_AFTER_CLOSE] = "use-after-close",
    [M_FD_LEAK] = "fd-leak",
    [M_EVENT_FOR_FREED] = "event-for-freed-data",
    [M_FREED_WHILE_REGISTERED] = "freed-while-registered",
};

struct client {
    int fd;
    int logfd;        /* the logger's dup of fd */
    int closing;      /* handed to the logger: E ignores its events */
    unsigned long requests;
    size_t len;
    char buf[BUFSZ];
};

/* What the logger does with one ended connection.  c may be NULL (already freed); fd >= 0 when
 * the logger closes the connection itself (lingering close). */
struct job {
    struct client *c;
    int logfd;
    int fd;
    unsigned long requests;
};

static enum mode mode;
static int epfd, lfd;
static char listener_tag;

/* ---- registry of live clients (E's guard against its own modes' early frees) ---------------- */

static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;
static struct client *live_tab[LIVE_SLOTS];
static size_t live_n;

static size_t live_slot(const struct client *c)
{
    uint64_t x = (uint64_t)(uintptr_t)c;
    x ^= x >> 29;
    x *= 0x9e3779b97f4a7c15ull;
    return (size_t)(x >> 40) & (LIVE_SLOTS - 1);
}

static int live_add(struct client *c)
{
    size_t i;
    pthread_mutex_lock(&live_mu);
    if (live_n >= LIVE_MAX) {
        pthread_mutex_unlock(&live_mu);
        return -1;
    }
    for (i = live_slot(c); live_tab[i]; i = (i + 1) & (LIVE_SLOTS - 1))
        ;
    live_tab[i] = c;
    live_n++;
    pthread_mutex_unlock(&live_mu);
    return 0;
}

static void live_remove(struct client *c)
{
    size_t i, j;
    pthread_mutex_lock(&live_mu);
    for (i = live_slot(c); live_tab[i] != c; i = (i + 1) & (LIVE_SLOTS - 1)) {
        if (!live_tab[i]) {
            pthread_mutex_unlock(&live_mu);
            return;
        }
    }
    live_tab[i] = NULL;
    live_n--;
    /* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
    for (j = (i + 1) & (LIVE_SLOTS - 1); live_tab[j]; j = (j + 1) & (LIVE_SLOTS - 1)) {
        size_t k = live_slot(live_tab[j]);
        if ((j > i && (k <= i || k > j)) || (j < i && k <= i && k > j)) {
            live_tab[i] = live_tab[j];
            live_tab[j] = NULL;
            i = j;
        }
    }
    pthread_mutex_unlock(&live_mu);
}

/* Whether an event for c may be handled: c is live and not closing. */
static int live_usable(const struct client *c)
{
    size_t i;
    int ok = 0;
    pthread_mutex_lock(&live_mu);
    for (i = live_slot(c); live_tab[i]; i = (i + 1) & (LIVE_SLOTS - 1)) {
        if (live_tab[i] == c) {
            ok = !c->closing;
            break;
        }
    }
    pthread_mutex_unlock(&live_mu);
    return ok;
}

static void client_free(struct client *c)
{
    live_remove(c);
    free(c);
}

/* ---- the logger thread ---------------------------------------------------------------------- */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t log_cv = PTHREAD_COND_INITIALIZER;
static struct job *jobs;
static size_t jobs_n, jobs_cap;
static struct client **done;      /* clients the logger handed back, freed by E */
static size_t done_n, done_cap;
static char log_ring[1 << 16];    /* the "access log" */
static size_t log_pos;

static void *grow(void *p, size_t *cap, size_t size)
{
    size_t ncap = *cap ? *cap * 2 : 64;
    void *np = realloc(p, ncap * size);
    if (!np) {
        perror("realloc");
        exit(1);
    }
    *cap = ncap;
    return np;
}

static void log_push(struct client *c, int logfd, int fd, unsigned long requests)
{
    pthread_mutex_lock(&log_mu);
    if (jobs_n == jobs_cap)
        jobs = grow(jobs, &jobs_cap, sizeof *jobs);
    jobs[jobs_n++] = (struct job){c, logfd, fd, requests};
    pthread_cond_signal(&log_cv);
    pthread_mutex_unlock(&log_mu);
}

static void log_line(const struct job *j)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char host[64] = "?", serv[16] = "?", line[160];
    int n;
    if (getpeername(j->logfd, (struct sockaddr *)&ss, &sl) == 0)
        getnameinfo((struct sockaddr *)&ss, sl, host, sizeof host, serv, sizeof serv,
                    NI_NUMERICHOST | NI_NUMERICSERV);
    n = snprintf(line, sizeof line, "%s:%s requests=%lu\n", host, serv, j->requests);
    if (n > 0 && (size_t)n < sizeof line) {
        if (log_pos + (size_t)n > sizeof log_ring)
            log_pos = 0;
        memcpy(log_ring + log_pos, line, (size_t)n);
        log_pos += (size_t)n;
    }
}

static void log_finish(struct job *j)
{
    log_line(j);
    if (mode == M_FREED_WHILE_REGISTERED && j->fd >= 0 && j->c) {
        /* BUG (freed-while-registered): the client is released first, "we only need its fd
         * from here on" -- but the fd is still open and registered, armed, and E sits in
         * epoll_wait on it: any event now would hand E a freed pointer. */
        client_free(j->c);
        j->c = NULL;
    }
    close(j->logfd);
    if (j->fd >= 0)
        close(j->fd); /* the last reference: this removes the registration */
    if (j->c) {
        pthread_mutex_lock(&log_mu);
        if (done_n == done_cap)
            done = grow(done, &done_cap, sizeof *done);
        done[done_n++] = j->c;
        pthread_mutex_unlock(&log_mu);
    }
}

static void *logger_main(void *arg)
{
    struct job *batch = NULL;
    size_t cap = 0;
    (void)arg;
    for (;;) {
        size_t n;
        pthread_mutex_lock(&log_mu);
        while (jobs_n == 0)
            pthread_cond_wait(&log_cv, &log_mu);
        pthread_mutex_unlock(&log_mu);
        usleep(LOG_BATCH_US); /* let a batch build up */
        pthread_mutex_lock(&log_mu);
        while (cap < jobs_n)
            batch = grow(batch, &cap, sizeof *batch);
        n = jobs_n;
        memcpy(batch, jobs, n * sizeof *batch);
        jobs_n = 0;
        pthread_mutex_unlock(&log_mu);
        for (size_t i = 0; i < n; i++)
            log_finish(&batch[i]);
    }
    return NULL;
}

/* E frees the clients the logger is done with (at the top of its loop: no event of the batch
 * before can still refer to them, and the logger closed their last fd before handing them back,
 * so no later epoll_wait can return them). */
static void free_done(void)
{
    struct client *batch[256];
    size_t n;
    do {
        pthread_mutex_lock(&log_mu);
        n = done_n < 256 ? done_n : 256;
        done_n -= n;
        if (n)
            memcpy(batch, done + done_n, n * sizeof *batch);
        pthread_mutex_unlock(&log_mu);
        for (size_t i = 0; i < n; i++)
            client_free(batch[i]);
    } while (n == 256);
}

/* ---- connections ---------------------------------------------------------------------------- */

/* E ends a connection: unregister, close, and let the logger log it. */
static void conn_end(struct client *c)
{
    c->closing = 1;
    if (mode != M_EVENT_AFTER_CLOSE)
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    /* BUG (event-after-close): without the DEL, close() below does not remove the registration:
     * it belongs to the open file, and c->logfd, the logger's dup, keeps that file open. */
    close(c->fd);
    log_push(c, c->logfd, -1, c->requests);
}

/* The peer sent FIN. */
static void conn_eof(struct client *c)
{
    if (mode == M_FD_LEAK) {
        /* BUG (fd-leak): stops watching the fd but never closes it. */
        c->closing = 1;
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        log_push(c, c->logfd, -1, c->requests);
        return;
    }
    if (mode == M_EVENT_FOR_FREED) {
        /* BUG (event-for-freed-data): the client goes now, the fd later (the logger closes it
         * after its batch delay) -- and nothing unregistered it: the EOF keeps it readable. */
        int fd = c->fd, logfd = c->logfd;
        unsigned long requests = c->requests;
        client_free(c);
        log_push(NULL, logfd, fd, requests);
        return;
    }
    conn_end(c);
}

/* A read or write failed (ECONNRESET, EPIPE ...). */
static void conn_error(struct client *c)
{
    int fd = c->fd;
    conn_end(c);
    if (mode == M_USE_AFTER_CLOSE)
        close(fd); /* BUG (use-after-close): "make sure it is released" -- conn_end() did it */
}

/* After "Connection: close": the logger closes it (lingering close), still registered. */
static void conn_linger(struct client *c)
{
    c->closing = 1;
    log_push(c, c->logfd, c->fd, c->requests);
}

/* Answer the complete requests in c->buf; returns 1 when the connection is gone. */
static int serve(struct client *c)
{
    size_t off = 0;
    for (;;) {
        struct request rq;
        int got = next_request(c->buf, c->len, sizeof c->buf, &off, NULL, &rq);
        if (got == 0)
            break;
        if (got < 0) {
            write_all(c->fd, RESP_400, sizeof RESP_400 - 1);
            conn_end(c);
            return 1;
        }
        c->requests++;
        if (respond(c->fd, &rq) < 0) {
            conn_error(c);
            return 1;
        }
        if (rq.close) {
            conn_linger(c);
            return 1;
        }
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

static void on_readable(struct client *c)
{
    ssize_t n = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
    if (n > 0) {
        c->len += (size_t)n;
        serve(c);
    } else if (n == 0) {
        conn_eof(c);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        conn_error(c);
    }
}

static void on_accept(void)
{
    for (;;) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP};
        struct client *c;
        int fd = accept_conn(lfd);
        if (fd < 0)
            return;
        c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->logfd = dup(fd);
        if (c->logfd < 0 || live_add(c) < 0) {
            if (c->logfd >= 0)
                close(c->logfd);
            close(fd);
            free(c);
            continue;
        }
        ev.data.ptr = c;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(c->logfd);
            close(fd);
            client_free(c);
        }
    }
}

int main(int argc, char **argv)
{
    int m, status = test_server_start(argc, argv, "loop", MODES, COUNT_OF(MODES), &m, &lfd);

    if (status != 0)
        return status;
    mode = (enum mode)m;
    epfd = epoll_watching("epoll", lfd, (epoll_data_t){.ptr = &listener_tag});
    if (epfd < 0 || start_signal_free_thread(logger_main) < 0)
        return 1;
    printf("READY\n");
    fflush(stdout);

    while (!stop_flag) {
        struct epoll_event events[64];
        int n, handled = 0;
        free_done();
        n = epoll_wait(epfd, events, 64, 300);
        for (int k = 0; k < n; k++) {
            struct client *c = events[k].data.ptr;
            if (events[k].data.ptr == &listener_tag) {
                on_accept();
                handled++;
            } else if (live_usable(c)) {
                on_readable(c);
                handled++;
            }
            /* else: closing, or a pointer that is not a live client -- skipped */
        }
        /* Only events to skip (a readable fd the logger is about to close): do not spin and
         * starve the logger. */
        if (n > 0 && !handled)
            usleep(SKIP_BACKOFF_US);
    }
    return 0;
}
