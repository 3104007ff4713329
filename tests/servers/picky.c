/*
 * picky: a small single-threaded epoll HTTP server, correct, that does not fit afterclose's
 * first assumptions, or (idle-buggy) whose idle timer outlives its connection.
 *
 *   usage: picky HOST PORT MODE [IDLE_TIMEOUT_S]    (prints READY once listening)
 *
 * Every answer is 200 with a fixed body of SMALL_BODY bytes (the path is not echoed), except
 * GET /big, answered with BIG_BODY bytes.  MODE:
 *   small               keep-alive as HTTP/1.1 says (until "Connection: close")
 *   explicit-keepalive  keeps a connection open only when the request says
 *                       "Connection: keep-alive"; otherwise answers with "Connection: close"
 *                       and closes
 *   idle-ok             small, and closes a connection idle for IDLE_TIMEOUT_S
 *   idle-buggy          the same, but a timer is never cancelled: when it fires it closes the
 *                       fd number it was armed for, whatever connection holds it now, or a
 *                       number nobody holds (close -> EBADF)
 * SIGTERM/SIGINT exit 0.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>

#define MAXFD 4096
#define BUFSZ 8192
#define SMALL_BODY 300
#define BIG_BODY (1 << 20)
#define TIMERS 65536
#include "common.h"

enum mode { M_SMALL, M_EXPLICIT, M_IDLE_OK, M_IDLE_BUGGY };

struct conn {
    char buf[BUFSZ];
    size_t len;
    unsigned long gen;
    double last_active;
};

/* An idle timer armed at accept: a FIFO, since every timer is armed for now + the timeout. */
struct timer {
    int fd;
    unsigned long gen;
    double at;
};

static volatile sig_atomic_t stop_flag;
static enum mode mode;
static int epfd, lfd;
static double idle_timeout_s = 5.0;
static struct conn *conns[MAXFD];
static unsigned long next_gen;
static struct timer timers[TIMERS];
static size_t t_head, t_tail;
static char big[BIG_BODY];

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void arm(int fd, unsigned long gen, double at)
{
    if (t_tail - t_head == TIMERS)
        return; /* full: that connection just never times out */
    timers[t_tail % TIMERS] = (struct timer){fd, gen, at};
    t_tail++;
}

static void conn_close(int fd)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(conns[fd]);
    conns[fd] = NULL;
}

static void expire(void)
{
    double now = now_s();
    while (t_head != t_tail && timers[t_head % TIMERS].at <= now) {
        struct timer t = timers[t_head % TIMERS];
        struct conn *c = conns[t.fd];
        t_head++;
        if (mode == M_IDLE_BUGGY) {
            /* The bug: the timer trusts the fd number; the connection it was armed for may
             * have closed long ago. */
            conn_close(t.fd);
            continue;
        }
        if (!c || c->gen != t.gen)
            continue; /* closed before its timer fired: nothing to do */
        if (now - c->last_active >= idle_timeout_s)
            conn_close(t.fd);
        else
            arm(t.fd, t.gen, c->last_active + idle_timeout_s);
    }
}

static int wants_keepalive(const char *head, size_t n)
{
    const char *h = head;
    while ((h = memmem(h, n - (size_t)(h - head), "\r\n", 2)) != NULL) {
        h += 2;
        if ((size_t)(head + n - h) >= 11 && strncasecmp(h, "connection:", 11) == 0) {
            const char *le = memmem(h, n - (size_t)(h - head), "\r\n", 2);
            size_t len = le ? (size_t)(le - h) : n - (size_t)(h - head);
            return memmem(h, len, "keep-alive", 10) != NULL ||
                   memmem(h, len, "Keep-Alive", 10) != NULL;
        }
    }
    return 0;
}

static int answer(int fd, const struct request *rq, int close_after)
{
    static const char filler[SMALL_BODY + 1] = {[0 ... SMALL_BODY - 1] = 's'};
    int is_big = rq->path_len == 4 && memcmp(rq->path, "/big", 4) == 0;
    size_t body = is_big ? BIG_BODY : SMALL_BODY;
    char head[256];
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                     body, close_after ? "Connection: close\r\n" : "");
    if (write_all(fd, head, (size_t)h) < 0)
        return -1;
    return write_all(fd, is_big ? big : filler, body);
}

/* Answer complete requests; returns 1 if the connection was closed. */
static int serve(int fd)
{
    struct conn *c = conns[fd];
    size_t off = 0;
    for (;;) {
        const char *end = memmem(c->buf + off, c->len - off, "\r\n\r\n", 4);
        size_t n;
        struct request rq;
        int close_after;
        if (!end) {
            if (off == 0 && c->len == sizeof c->buf) {
                write_all(fd, RESP_400, sizeof RESP_400 - 1);
                conn_close(fd);
                return 1;
            }
            break;
        }
        n = (size_t)(end + 4 - c->buf - off);
        if (parse_request(c->buf + off, n, &rq) < 0) {
            write_all(fd, RESP_400, sizeof RESP_400 - 1);
            conn_close(fd);
            return 1;
        }
        close_after = rq.close || (mode == M_EXPLICIT && !wants_keepalive(c->buf + off, n));
        if (answer(fd, &rq, close_after) < 0) {
            conn_close(fd);
            return 1;
        }
        off += n;
        if (close_after) {
            shutdown(fd, SHUT_WR);
            conn_close(fd);
            return 1;
        }
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

static void on_readable(int fd)
{
    struct conn *c = conns[fd];
    ssize_t n = read(fd, c->buf + c->len, sizeof c->buf - c->len);
    if (n > 0) {
        c->len += (size_t)n;
        c->last_active = now_s();
        serve(fd);
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        conn_close(fd);
    }
}

static void on_accept(void)
{
    for (;;) {
        struct epoll_event ev = {.events = EPOLLIN};
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return;
        }
        if (fd >= MAXFD || !(conns[fd] = calloc(1, sizeof(struct conn)))) {
            close(fd);
            continue;
        }
        conns[fd]->gen = ++next_gen;
        conns[fd]->last_active = now_s();
        if (mode == M_IDLE_OK || mode == M_IDLE_BUGGY)
            arm(fd, conns[fd]->gen, conns[fd]->last_active + idle_timeout_s);
        ev.data.fd = fd;
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    }
}

int main(int argc, char **argv)
{
    static const char *names[] = {"small", "explicit-keepalive", "idle-ok", "idle-buggy"};
    struct sigaction sa;
    struct epoll_event ev = {.events = EPOLLIN};
    size_t i;

    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT MODE [IDLE_TIMEOUT_S]\n", argv[0]);
        return 2;
    }
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(argv[3], names[i]) == 0)
            break;
    if (i == sizeof names / sizeof names[0]) {
        fprintf(stderr, "picky: unknown mode %s\n", argv[3]);
        return 2;
    }
    mode = (enum mode)i;
    if (argc == 5)
        idle_timeout_s = atof(argv[4]);
    memset(big, 'b', sizeof big);

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    lfd = listen_on("picky", argv[1], argv[2]);
    if (lfd < 0)
        return 1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    ev.data.fd = lfd;
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        perror("epoll");
        return 1;
    }
    printf("READY\n");
    fflush(stdout);

    while (!stop_flag) {
        struct epoll_event events[64];
        int n = epoll_wait(epfd, events, 64, 50);
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            if (fd == lfd)
                on_accept();
            else if (conns[fd])
                on_readable(fd);
        }
        if (mode == M_IDLE_OK || mode == M_IDLE_BUGGY)
            expire();
    }
    for (int fd = 0; fd < MAXFD; fd++)
        if (conns[fd])
            conn_close(fd);
    return 0;
}
