/*
 * misbehave: a small single-threaded epoll HTTP server with one selectable, deliberate,
 * black-box-visible bug.  Used to prove that the harness's oracles notice each kind of
 * misbehaviour (and stay quiet for MODE=none).
 *
 *   usage: misbehave HOST PORT MODE      (prints READY on stdout once listening)
 *
 * It answers "GET /path HTTP/1.x" with 200 and body "/path\n", keep-alive, pipelining,
 * "Connection: close"; a malformed request gets 400 and the connection is closed.  The epoll
 * set is level-triggered with data.fd.  SIGTERM/SIGINT exit 0.
 *
 * MODE:
 *   none             correct: closes on EOF, handles RST
 *   crash            real NULL write (SIGSEGV) on the 5th request it serves
 *   leak             never closes an fd whose read() returned 0 (leaves CLOSE_WAIT); the fd is
 *                    removed from epoll so the server does not spin on it
 *   crosstalk        every 3rd response goes to the previously served connection (when that
 *                    one is still open and is not the current one)
 *   double-response  answers every request twice
 *   unsolicited      writes "HELLO\n" right after accept, before any request
 *   wrong-body       the body is always "/nope\n"
 *   hang             after 3 requests stops calling epoll_wait (sleeps, stays alive)
 *   exit             exits with status 3 after 3 requests
 *   drop             every 20th complete request is not answered: the connection is closed
 *   stale-timer      an idle-timer thread keeps the number of every connection the event loop
 *                    closed and closes that number again 2 ms later: EBADF when the number is
 *                    free, a stranger's fresh connection when it was reused
 *   close-between    correct: answers each request as keep-alive, then closes the connection
 *                    before the next request comes (a server may close an idle keep-alive
 *                    connection at any time between requests)
 *   spin             never closes an fd whose read() returned 0 and leaves it registered
 *                    (level-triggered EPOLLIN): epoll_wait and read() return at once, forever
 */
#define _GNU_SOURCE
#include <stdlib.h>

#define MAXFD 4096
#define BUFSZ 8192
#include "common.h"

enum mode { M_NONE, M_CRASH, M_LEAK, M_CROSSTALK, M_DOUBLE, M_UNSOLICITED, M_WRONG_BODY,
            M_HANG, M_EXIT, M_DROP, M_SPIN, M_STALE_TIMER, M_CLOSE_BETWEEN };

static const char *const MODES[] = {
    [M_NONE] = "none",
    [M_CRASH] = "crash",
    [M_LEAK] = "leak",
    [M_CROSSTALK] = "crosstalk",
    [M_DOUBLE] = "double-response",
    [M_UNSOLICITED] = "unsolicited",
    [M_WRONG_BODY] = "wrong-body",
    [M_HANG] = "hang",
    [M_EXIT] = "exit",
    [M_DROP] = "drop",
    [M_SPIN] = "spin",
    [M_STALE_TIMER] = "stale-timer",
    [M_CLOSE_BETWEEN] = "close-between",
};

static enum mode mode;
static int epfd, lfd;
static struct fd_conn *conns[MAXFD]; /* non-NULL = open and watched */
static unsigned long served;      /* requests answered so far */
static int last_fd = -1;          /* connection whose request was answered last */
static unsigned long complete;    /* complete requests read so far */

static void drop(int fd)
{
    fd_conn_forget(conns, epfd, fd);
    if (last_fd == fd)
        last_fd = -1;
}

/* stale-timer: numbers the event loop closed, which the timer thread closes again. */
static pthread_mutex_t stale_lock = PTHREAD_MUTEX_INITIALIZER;
static int stale[MAXFD];
static int n_stale;

static void *stale_timer(void *arg)
{
    (void)arg;
    while (!stop_flag) {
        int mine[MAXFD], n;
        usleep(2000);
        pthread_mutex_lock(&stale_lock);
        n = n_stale;
        memcpy(mine, stale, (size_t)n * sizeof mine[0]);
        n_stale = 0;
        pthread_mutex_unlock(&stale_lock);
        for (int k = 0; k < n; k++)
            close(mine[k]); /* "idle": but this number was closed already */
    }
    return NULL;
}

static void conn_close(int fd)
{
    drop(fd);
    close(fd);
    if (mode == M_STALE_TIMER) {
        pthread_mutex_lock(&stale_lock);
        if (n_stale < MAXFD)
            stale[n_stale++] = fd;
        pthread_mutex_unlock(&stale_lock);
    }
}

static void crash_now(void)
{
    /* Both volatiles matter: a visible NULL becomes a trap (SIGILL) at -O2, and gcc 12 -O2
     * dropped the store entirely when only the pointer itself was volatile. */
    volatile int *volatile p = NULL;
    *p = 42;
}

static void misbehave_respond(int fd, const struct request *rq)
{
    char out[BUFSZ + 256];
    struct request shown = *rq; /* what the answer says was asked */
    int target = fd;
    int n;

    if (mode == M_CRASH && served + 1 == 5)
        crash_now();
    if (mode == M_WRONG_BODY) {
        shown.path = "/nope";
        shown.path_len = 5;
    }
    n = format_response(out, sizeof out, &shown);
    if (n < 0)
        return;

    served++;
    if (mode == M_CROSSTALK && served % 3 == 0 && last_fd >= 0 && last_fd != fd &&
        conns[last_fd])
        target = last_fd;
    write_all(target, out, (size_t)n);
    if (mode == M_DOUBLE)
        write_all(target, out, (size_t)n);
    last_fd = fd;
}

/* Answer complete requests; returns 1 if the connection was closed. */
static int serve(int fd)
{
    struct fd_conn *c = conns[fd];
    size_t off = 0;
    for (;;) {
        struct request rq;
        int got = next_request(c->buf, c->len, sizeof c->buf, &off, NULL, &rq);
        if (got == 0)
            break;
        if (got < 0) {
            write_all(fd, RESP_400, sizeof RESP_400 - 1);
            conn_close(fd);
            return 1;
        }
        if (mode == M_DROP && ++complete % 20 == 0) {
            conn_close(fd);
            return 1;
        }
        misbehave_respond(fd, &rq);
        if (rq.close || mode == M_CLOSE_BETWEEN) {
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
    struct fd_conn *c = conns[fd];
    ssize_t n = read(fd, c->buf + c->len, sizeof c->buf - c->len);
    if (n > 0) {
        c->len += (size_t)n;
        serve(fd);
    } else if (n == 0) {
        if (mode == M_LEAK)
            drop(fd); /* forgets the fd without closing it: CLOSE_WAIT forever */
        else if (mode != M_SPIN) /* spin: still registered, readable (EOF) forever */
            conn_close(fd);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        conn_close(fd);
    }
}

static void on_accept(void)
{
    for (;;) {
        int fd = accept_conn(lfd);
        if (fd < 0)
            return;
        if (fd_conn_add(conns, MAXFD, epfd, fd) == 0 && mode == M_UNSOLICITED)
            write_all(fd, "HELLO\n", 6);
    }
}

int main(int argc, char **argv)
{
    int m, status =
               test_server_start(argc, argv, "misbehave", MODES, COUNT_OF(MODES), &m, &lfd);

    if (status != 0)
        return status;
    mode = (enum mode)m;
    epfd = epoll_watching("epoll", lfd, (epoll_data_t){.fd = lfd});
    if (epfd < 0)
        return 1;
    if (mode == M_STALE_TIMER && start_signal_free_thread(stale_timer) < 0)
        return 1;
    printf("READY\n");
    fflush(stdout);

    while (!stop_flag) {
        struct epoll_event events[64];
        int n = epoll_wait(epfd, events, 64, 300);
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            if (fd == lfd)
                on_accept();
            else if (conns[fd])
                on_readable(fd);
        }
        if ((mode == M_HANG || mode == M_EXIT) && served >= 3) {
            if (mode == M_EXIT)
                exit(3);
            while (!stop_flag)
                usleep(100 * 1000);
        }
    }
    for (int fd = 0; fd < MAXFD; fd++)
        if (conns[fd])
            conn_close(fd);
    return 0;
}
