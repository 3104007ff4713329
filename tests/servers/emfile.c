/*
 * emfile: a small single-threaded epoll HTTP server that runs out of file descriptors in one
 * of three ways.  Used by tests/test_container_faults.py to show that the fd_limit fault
 * tells a server that survives EMFILE from one that spins or leaks on it.
 *
 *   usage: emfile HOST PORT MODE      (prints READY on stdout once listening)
 *
 * It answers "GET /path HTTP/1.x" with 200 and body "/path\n" (keep-alive, "Connection:
 * close"); a malformed request gets 400 and a close.  Like a static file server, it opens a
 * file for every request (/dev/null stands in for it), so a request can fail with EMFILE too.
 * The epoll set is level-triggered.  SIGTERM/SIGINT exit 0.
 *
 * MODE:
 *   ok     EMFILE from accept4: stop watching the listener for 100 ms.  EMFILE opening the
 *          file: answer 503 and close the connection.
 *   spin   EMFILE from accept4: straight back to epoll_wait.  The level-triggered listener is
 *          readable again at once (the connection is still in the backlog), so the loop spins
 *          at 100% CPU until some fd is freed.  Requests as in ok.
 *   leak   accepts as in ok, but EMFILE opening the file drops the connection from epoll
 *          without close(): CLOSE_WAIT once its peer leaves, and one fd fewer for good.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>

#define MAXFD 65536
#define BUFSZ 8192
#include "common.h"

#define PAUSE_MS 100

enum mode { M_OK, M_SPIN, M_LEAK };

static const char *const MODES[] = {[M_OK] = "ok", [M_SPIN] = "spin", [M_LEAK] = "leak"};

static enum mode mode;
static int epfd, lfd;
static struct fd_conn *conns[MAXFD]; /* non-NULL = open and watched */
static int64_t paused_until;      /* listener not watched until then (ms); 0 = watched */

#define LISTENER_DATA ((epoll_data_t){.fd = lfd})

static void conn_close(int fd)
{
    fd_conn_forget(conns, epfd, fd);
    close(fd);
}

static const char RESP_503[] = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                               "Content-Length: 7\r\nConnection: close\r\n\r\nEMFILE\n";

static void serve(int fd)
{
    struct fd_conn *c = conns[fd];
    size_t off = 0;
    for (;;) {
        struct request rq;
        int file, got = next_request(c->buf, c->len, sizeof c->buf, &off, NULL, &rq);
        if (got == 0)
            break;
        if (got < 0) {
            write_all(fd, RESP_400, sizeof RESP_400 - 1);
            conn_close(fd);
            return;
        }
        file = open("/dev/null", O_RDONLY | O_CLOEXEC); /* the file this request serves */
        if (file < 0) {
            if (mode == M_LEAK) {
                fd_conn_forget(conns, epfd, fd); /* the bug: no close(fd), no answer */
                return;
            }
            write_all(fd, RESP_503, sizeof RESP_503 - 1);
            conn_close(fd);
            return;
        }
        close(file);
        respond(fd, &rq);
        if (rq.close) {
            shutdown(fd, SHUT_WR);
            conn_close(fd);
            return;
        }
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
}

static void on_readable(int fd)
{
    struct fd_conn *c = conns[fd];
    ssize_t n = read(fd, c->buf + c->len, sizeof c->buf - c->len);
    if (n > 0) {
        c->len += (size_t)n;
        serve(fd);
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        conn_close(fd);
    }
}

static void on_accept(void)
{
    for (;;) {
        int fd = accept_conn(lfd);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (mode == M_SPIN)
                return; /* the bug: the listener is still readable, epoll_wait returns at once */
            listener_pause(epfd, lfd, LISTENER_DATA, &paused_until, PAUSE_MS);
            return;
        }
        fd_conn_add(conns, MAXFD, epfd, fd);
    }
}

int main(int argc, char **argv)
{
    int m, status = test_server_start(argc, argv, "emfile", MODES, COUNT_OF(MODES), &m, &lfd);

    if (status != 0)
        return status;
    mode = (enum mode)m;
    epfd = epoll_watching("epoll", lfd, LISTENER_DATA);
    if (epfd < 0)
        return 1;
    printf("READY\n");
    fflush(stdout);

    while (!stop_flag) {
        struct epoll_event events[64];
        int timeout = listener_pause_timeout(epfd, lfd, LISTENER_DATA, &paused_until, 300);
        int n = epoll_wait(epfd, events, 64, timeout);
        for (int k = 0; k < n; k++) {
            int fd = events[k].data.fd;
            if (fd == lfd)
                on_accept();
            else if (conns[fd])
                on_readable(fd);
        }
    }
    for (int fd = 0; fd < MAXFD; fd++)
        if (conns[fd])
            conn_close(fd);
    return 0;
}
