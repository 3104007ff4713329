/*
 * seed-buggy: a faithful rendition of a real use-after-close report.
 *
 *   usage: seed_buggy HOST PORT      (prints READY on stdout once listening)
 *
 * Architecture (as reported):
 *   - one thread runs epoll_wait(epfd, events, 256, 300), accepts new connections itself
 *     (listener level-triggered, non-blocking) and queues client events to 4 workers
 *     through a mutex+condvar queue;
 *   - accepted fds are non-blocking, registered EPOLLIN|EPOLLONESHOT|EPOLLET with
 *     data.ptr = a malloc'd struct client;
 *   - a worker reads until EAGAIN, answers complete HTTP/1.1 requests and re-arms with
 *     EPOLL_CTL_MOD; when read() returns 0 (or fails) it frees the client, then closes the fd;
 *   - a malformed request line is handed to a separate "error thread" (own queue), and the
 *     worker ALSO re-arms the fd right away: from then on the connection has two owners;
 *   - the error thread logs the error, writes "400 Bad Request", calls
 *     shutdown(c->fd, SHUT_RDWR) and re-arms EPOLL_CTL_MOD(c->fd, c) "so the worker sees the
 *     close".
 *
 * THE BUG (deliberate, do not fix here; seed-fixed is the corrected version): the worker's
 * re-arm lets the hang-up (the client's own close/RST, or the error thread's shutdown) reach a
 * worker, which frees the client and closes the fd while the error thread still holds the
 * pointer.  The error thread then reads a freed struct (use-after-free), may write the 400 to /
 * shut down an fd number the kernel already gave to a stranger's connection, and re-arms a
 * closed or reused fd number with a freed pointer, so a second "close" event names an
 * already-freed client: double free, use-after-free, segfault.
 *
 * No artificial sleep widens the window; the error thread only does the logging work a real
 * server does (peer address, timestamp, formatted line into an in-memory log ring).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <time.h>

#include "../seed-common/seed_server.h"

#define ARM (EPOLLIN | EPOLLONESHOT | EPOLLET)

struct client {
    int fd;
    char buf[BUFSZ];
    size_t len;
    size_t skip;  /* request-body bytes still to discard */
    int closing;  /* answered "Connection: close": ignore input, wait for the peer's EOF */
};

/* The seed has no way to go on without memory for its queue. */
static void out_of_memory(void *c)
{
    (void)c;
    perror("malloc");
    exit(1);
}

/* ---- HTTP ------------------------------------------------------------------------------- */

/* The seed answers with plain write() calls. */
static void send_response(int fd, const struct request *rq)
{
    char out[BUFSZ + 256];
    int n = format_response(out, sizeof out, rq);
    if (n > 0)
        (void)write_all_via(fd, out, (size_t)n, VIA_WRITE);
}

/* ---- the error thread ------------------------------------------------------------------- */

#define LOG_LINES 64
static char log_ring[LOG_LINES][160];
static unsigned log_next;

static void log_bad_request(struct client *c)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char host[INET6_ADDRSTRLEN] = "?";
    char stamp[64];
    struct timespec ts;
    struct tm tm;

    if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof host);
        else if (ss.ss_family == AF_INET6)
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof host);
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%d/%b/%Y:%H:%M:%S %z", &tm);
    snprintf(log_ring[log_next++ % LOG_LINES], sizeof log_ring[0],
             "%s - - [%s] \"-\" 400 12 fd=%d", host, stamp, c->fd);
}

static void *error_main(void *arg)
{
    struct item it;
    (void)arg;
    while (queue_pop(&error_q, &it)) {
        struct client *c = it.c;
        struct epoll_event ev = {.events = ARM, .data.ptr = c};

        log_bad_request(c);
        (void)write_all_via(c->fd, RESP_400, sizeof RESP_400 - 1, VIA_WRITE);
        shutdown(c->fd, SHUT_RDWR);
        /* "re-arm so the worker sees the close" */
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    }
    return NULL;
}

/* ---- workers ---------------------------------------------------------------------------- */

static void rearm(struct client *c)
{
    struct epoll_event ev = {.events = ARM, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void bad_request(struct client *c)
{
    c->len = 0;
    c->skip = 0;
    if (queue_push(&error_q, c, 0) < 0)
        out_of_memory(c);
    /* keep listening for the client while the error thread answers */
    rearm(c);
}

/* Answer every complete request in c->buf.  -1: c was handed to the error thread. */
static int serve(struct client *c)
{
    size_t off = 0;

    for (;;) {
        struct request rq;
        int got;

        if (c->closing) {
            off = c->len;
            break;
        }
        /* A header block that fills the buffer is left to handle(), which sees it full. */
        got = next_request(c->buf, c->len, SIZE_MAX, &off, &c->skip, &rq);
        if (got == 0)
            break;
        if (got < 0) {
            bad_request(c);
            return -1;
        }
        send_response(c->fd, &rq);
        if (rq.close) {
            shutdown(c->fd, SHUT_WR);
            c->closing = 1;
        }
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

static void handle(struct client *c)
{
    int fd = c->fd;

    for (;;) {
        ssize_t n;
        if (c->len == sizeof c->buf) { /* header block larger than the buffer */
            bad_request(c);
            return;
        }
        n = read(fd, c->buf + c->len, sizeof c->buf - c->len);
        if (n > 0) {
            c->len += (size_t)n;
            if (serve(c) < 0)
                return;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        /* EOF or error: the client is gone */
        free(c);
        close(fd);
        return;
    }
    rearm(c);
}

static void *worker_main(void *arg)
{
    struct item it;
    (void)arg;
    while (queue_pop(&work_q, &it))
        handle(it.c);
    return NULL;
}

/* ---- the epoll thread ------------------------------------------------------------------- */

static void accept_all(void)
{
    for (;;) {
        struct client *c;
        struct epoll_event ev;
        int fd = accept_conn(lfd);
        if (fd < 0)
            return;
        c = malloc(sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->len = 0;
        c->skip = 0;
        c->closing = 0;
        ev.events = ARM;
        ev.data.ptr = c;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            free(c);
            close(fd);
        }
    }
}

static void *epoll_main(void *arg)
{
    (void)arg;
    seed_epoll_loop(accept_all, NULL, out_of_memory);
    return NULL;
}

/* ---- main ------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    struct seed_threads threads = {
        .worker_main = worker_main, .error_main = error_main, .epoll_main = epoll_main};
    int status = seed_serve(argc, argv, "seed_buggy", &threads);

    if (status != 0)
        return status;
    /* The seed never tracked its connections, so there is nothing to tear down; _exit also
     * skips LeakSanitizer's exit-time listing of every still-open client under ASan. */
    _exit(0);
}
