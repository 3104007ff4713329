/*
 * pool: a small epoll HTTP server -- an acceptor thread and an event thread sharing one epoll
 * instance, EPOLLONESHOT, re-arms applied in batches -- with one selectable, deliberate
 * fd-lifecycle bug.  tests/test_lifecycle_rules.py runs it under the LD_PRELOAD tracer to prove
 * that each traced rule fires on a real server, and that MODE=none is reported for nothing.
 *
 *   usage: pool HOST PORT MODE       (prints READY on stdout once listening)
 *
 * It answers "GET /path HTTP/1.x" with 200 and body "/path\n" (keep-alive, pipelining,
 * "Connection: close"); a malformed request gets 400 and the connection is closed.
 * SIGTERM/SIGINT exit 0.
 *
 * Design (every mode):
 *   - the acceptor thread A polls the listener, accepts every pending connection and registers
 *     each EPOLLIN|EPOLLONESHOT with data.ptr = a new struct client, then tells the event thread
 *     how many it accepted through an eventfd that is in the same epoll set;
 *   - the event thread E serves requests, reading until EAGAIN.  As soon as it answered a
 *     request it queues the connection's re-arm (EPOLL_CTL_MOD), and it queues one when a read
 *     finds nothing more; the queue is applied in one pass right after an accept batch (when the
 *     eventfd fires), or when its oldest entry is REARM_MAX_MS old;
 *   - E closes connections itself (EOF, error, 400, "Connection: close"): conn_close() =
 *     EPOLL_CTL_DEL, close(); the client is freed then, or by the re-arm pass if a re-arm of it
 *     is still queued.
 *
 * MODE (one bug each):
 *   none               correct
 *   stale-rearm        the re-arm pass does not look at whether the client was closed meanwhile
 *                      (after "Connection: close", say, the re-arm is queued and then the
 *                      connection closed): it relies on EPOLL_CTL_MOD failing for a closed fd,
 *                      and frees the client when it does.  But the pass runs right after an
 *                      accept batch, and the acceptor was just handed the lowest free fd number
 *                      -- the closed one.  The MOD succeeds on the stranger's connection, whose
 *                      registration now carries the old client.  (Nothing crashes: the old
 *                      client object goes on serving the new connection through the reused fd
 *                      number; the new connection's own client object never gets an event.)
 *   wrong-incarnation  on a read/write error the helper closes the fd; the caller then reports
 *                      the error -- slowly, REPORT_US -- and closes the fd again "to be sure".
 *                      Meanwhile the acceptor was handed that number: the second close silently
 *                      drops a stranger's connection before anyone read its request.  No EBADF,
 *                      no crash, no garbled reply: its client just never gets an answer.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/eventfd.h>

#define BUFSZ 8192
#include "../servers/common.h"

#define REARM_MAX_MS 250
#define REPORT_US 2000
#define ARM (EPOLLIN | EPOLLONESHOT)

enum mode { M_NONE, M_STALE_REARM, M_WRONG_INCARNATION };

static const char *const MODES[] = {
    [M_NONE] = "none",
    [M_STALE_REARM] = "stale-rearm",
    [M_WRONG_INCARNATION] = "wrong-incarnation",
};

struct client {
    int fd;
    int rearm_queued;
    int closed;       /* closed while a re-arm was queued: the re-arm pass frees it */
    size_t len;
    char buf[BUFSZ];
};

static enum mode mode;
static int epfd, lfd, efd;
static char accept_tag;

static struct client **rearms;
static size_t rearms_n, rearms_cap;
static int64_t rearm_oldest_ms;
static char error_log[1 << 16];
static size_t error_pos;

/* ---- the acceptor thread -------------------------------------------------------------------- */

static void *acceptor_main(void *arg)
{
    (void)arg;
    while (!stop_flag) {
        struct pollfd p = {.fd = lfd, .events = POLLIN};
        uint64_t accepted = 0;
        if (poll(&p, 1, 300) <= 0)
            continue;
        for (;;) {
            struct epoll_event ev = {.events = ARM};
            struct client *c;
            int fd = accept_conn(lfd);
            if (fd < 0)
                break;
            c = calloc(1, sizeof *c);
            if (!c) {
                close(fd);
                continue;
            }
            c->fd = fd;
            ev.data.ptr = c;
            if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
                close(fd);
                free(c);
                continue;
            }
            accepted++;
        }
        if (accepted && write(efd, &accepted, sizeof accepted) < 0)
            perror("eventfd");
    }
    return NULL;
}

/* ---- the event thread ----------------------------------------------------------------------- */

static void queue_rearm(struct client *c)
{
    if (c->rearm_queued)
        return;
    if (rearms_n == rearms_cap) {
        size_t ncap = rearms_cap ? rearms_cap * 2 : 64;
        struct client **n = realloc(rearms, ncap * sizeof *n);
        if (!n) {
            perror("realloc");
            exit(1);
        }
        rearms = n;
        rearms_cap = ncap;
    }
    if (rearms_n == 0)
        rearm_oldest_ms = now_ms();
    rearms[rearms_n++] = c;
    c->rearm_queued = 1;
}

static void conn_close(struct client *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->len = 0;
    if (c->rearm_queued)
        c->closed = 1; /* still in the re-arm queue: the re-arm pass frees it */
    else
        free(c);
}

static void rearm_pass(void)
{
    for (size_t i = 0; i < rearms_n; i++) {
        struct client *c = rearms[i];
        struct epoll_event ev = {.events = ARM, .data.ptr = c};
        c->rearm_queued = 0;
        if (mode == M_STALE_REARM) {
            /* BUG (stale-rearm): "a closed connection makes the MOD fail" -- not when its fd
             * number was handed out again: then this re-arms a stranger's connection with c. */
            if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
                free(c);
            continue;
        }
        if (c->closed) {
            free(c);
            continue;
        }
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
            conn_close(c);
    }
    rearms_n = 0;
}

/* Logging an error takes a while: it stands in for a synchronous report (a reverse DNS lookup
 * for the log line, a write to a slow disk) and is what opens the window in wrong-incarnation. */
static void report_error(int fd, int err)
{
    char line[128];
    int n = snprintf(line, sizeof line, "fd %d: %s\n", fd, strerror(err));
    usleep(REPORT_US);
    if (n > 0 && (size_t)n < sizeof line) {
        if (error_pos + (size_t)n > sizeof error_log)
            error_pos = 0;
        memcpy(error_log + error_pos, line, (size_t)n);
        error_pos += (size_t)n;
    }
}

/* A read or write failed (ECONNRESET, EPIPE ...). */
static void conn_error(struct client *c, int err)
{
    int fd = c->fd;
    conn_close(c);
    if (mode == M_WRONG_INCARNATION) {
        report_error(fd, err);
        /* BUG (wrong-incarnation): conn_close() already closed fd; meanwhile the acceptor may
         * have been handed the same number for a new connection, which this closes. */
        close(fd);
    }
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
            conn_close(c);
            return 1;
        }
        if (respond(c->fd, &rq) < 0) {
            conn_error(c, errno);
            return 1;
        }
        queue_rearm(c); /* answered: it may read again (re-arms are applied in batches) */
        if (rq.close) {
            shutdown(c->fd, SHUT_WR);
            conn_close(c);
            return 1;
        }
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

/* One EPOLLONESHOT event: read until EAGAIN (or the end), answering as requests complete. */
static void on_event(struct client *c)
{
    for (;;) {
        ssize_t n = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
        if (n > 0) {
            c->len += (size_t)n;
            if (serve(c))
                return;
        } else if (n == 0) {
            conn_close(c);
            return;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            queue_rearm(c);
            return;
        } else if (errno != EINTR) {
            conn_error(c, errno);
            return;
        }
    }
}

int main(int argc, char **argv)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &accept_tag};
    int m, status = test_server_start(argc, argv, "pool", MODES, COUNT_OF(MODES), &m, &lfd);

    if (status != 0)
        return status;
    mode = (enum mode)m;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (epfd < 0 || efd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, efd, &ev) < 0) {
        perror("epoll");
        return 1;
    }
    if (start_signal_free_thread(acceptor_main) < 0)
        return 1;
    printf("READY\n");
    fflush(stdout);

    while (!stop_flag) {
        struct epoll_event events[64];
        int timeout = 300, n, accepted = 0;
        if (rearms_n) {
            int64_t left = rearm_oldest_ms + REARM_MAX_MS - now_ms();
            timeout = left > 0 ? (int)left : 0;
        }
        n = epoll_wait(epfd, events, 64, timeout);
        for (int k = 0; k < n; k++) {
            if (events[k].data.ptr == &accept_tag) {
                uint64_t v;
                if (read(efd, &v, sizeof v) > 0)
                    accepted = 1;
            }
        }
        /* The re-arm pass runs right after an accept batch (or when a re-arm waited too long). */
        if (rearms_n && (accepted || now_ms() - rearm_oldest_ms >= REARM_MAX_MS))
            rearm_pass();
        for (int k = 0; k < n; k++)
            if (events[k].data.ptr != &accept_tag)
                on_event(events[k].data.ptr);
    }
    return 0;
}
