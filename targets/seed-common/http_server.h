/* The listening and I/O code of the built-in C servers: seed-buggy, seed-fixed and the static
 * pair, and afterclose's own test servers (tests/servers/common.h).  Each server has its own
 * way of reading, owning and closing connections; what a request means and what the answer
 * looks like is the same for all targets, zoo included, and lives in ../common/http_parse.h.
 * Include it after defining _GNU_SOURCE (memmem). */
#ifndef AFTERCLOSE_HTTP_SERVER_H
#define AFTERCLOSE_HTTP_SERVER_H

#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../common/http_parse.h"
#include "../common/start.h"

/* Not every server uses every helper; -Wall -Werror must not mind. */
#define HTTP_SERVER_HELPER static __attribute__((unused))

/* ---- event-loop servers: signals, listener, requests in a buffer, writing ------------------ */

#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <time.h>

/* A new epoll instance watching FD (level-triggered EPOLLIN), its events carrying DATA.  -1
 * after perror(WHAT) if it cannot be made. */
HTTP_SERVER_HELPER int epoll_watching(const char *what, int fd, epoll_data_t data)
{
    struct epoll_event ev = {.events = EPOLLIN, .data = data};
    int epfd = epoll_create1(EPOLL_CLOEXEC);

    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        perror(what);
        return -1;
    }
    return epfd;
}

/* The next connection waiting on the listener LFD, non-blocking and close-on-exec.  EINTR and
 * ECONNABORTED (a connection reset while it waited in the backlog) are tried again; -1 with
 * errno set when none is waiting (EAGAIN) or accept4 failed (EMFILE, ENFILE, ENOBUFS ...). */
HTTP_SERVER_HELPER int accept_conn(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0 || (errno != EINTR && errno != ECONNABORTED))
            return fd;
    }
}

HTTP_SERVER_HELPER int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* What epoll reports for the listener LFD from now on: EPOLLIN, or 0 to stop watching it. */
HTTP_SERVER_HELPER void listener_watch(int epfd, int lfd, epoll_data_t data, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data = data};
    epoll_ctl(epfd, EPOLL_CTL_MOD, lfd, &ev);
}

/* After accept4 failed with EMFILE, ENFILE, ENOBUFS, ENOMEM ...: the pending connection stays in
 * the backlog and the level-triggered listener would wake epoll_wait again at once, so stop
 * watching it for MS milliseconds (until *paused_until) instead of spinning. */
HTTP_SERVER_HELPER void listener_pause(int epfd, int lfd, epoll_data_t data,
                                       int64_t *paused_until, int ms)
{
    listener_watch(epfd, lfd, data, 0);
    *paused_until = now_ms() + ms;
}

/* epoll_wait's timeout (at most TIMEOUT ms) while the listener may be paused: the pause ends
 * here once it is due (*paused_until back to 0, the listener watched again); until then the
 * wait ends no later than the pause does. */
HTTP_SERVER_HELPER int listener_pause_timeout(int epfd, int lfd, epoll_data_t data,
                                              int64_t *paused_until, int timeout)
{
    if (*paused_until) {
        int64_t left = *paused_until - now_ms();
        if (left <= 0) {
            *paused_until = 0;
            listener_watch(epfd, lfd, data, EPOLLIN);
        } else if (left < timeout) {
            timeout = (int)left;
        }
    }
    return timeout;
}

/* The next request in buf[*off, len), a buffer of CAP bytes.  First the rest of the last
 * request's body is passed over (*skip bytes; a server that passes SKIP NULL does not look for
 * bodies), then one header block is parsed into rq.  1: a request, *off is past its header
 * block and *skip is the length of its body; 0: more bytes are needed; -1: malformed, or a
 * header block larger than the buffer. */
HTTP_SERVER_HELPER int next_request(const char *buf, size_t len, size_t cap, size_t *off,
                                    size_t *skip, struct request *rq)
{
    const char *start, *end;

    if (skip && *skip > 0) {
        size_t k = len - *off < *skip ? len - *off : *skip;
        *off += k;
        *skip -= k;
        if (*skip > 0)
            return 0;
    }
    start = buf + *off;
    end = memmem(start, len - *off, "\r\n\r\n", 4);
    if (!end)
        return *off == 0 && len == cap ? -1 : 0;
    if (parse_request(start, (size_t)(end + 4 - start), rq) < 0)
        return -1;
    *off = (size_t)(end + 4 - buf);
    if (skip)
        *skip = rq->content_length;
    return 1;
}

/* The whole answer to rq (its head, then the path and "\n" as the body) into out: its length,
 * or -1 if it does not fit in SIZE bytes. */
HTTP_SERVER_HELPER int format_response(char *out, size_t size, const struct request *rq)
{
    int h = response_head(out, size, rq);

    if (h < 0 || (size_t)h + rq->path_len + 1 > size)
        return -1;
    memcpy(out + h, rq->path, rq->path_len);
    out[(size_t)h + rq->path_len] = '\n';
    return h + (int)rq->path_len + 1;
}

/* Send out[*off, *len) on the non-blocking socket FD.  1: all sent (*off and *len back to 0),
 * 0: the socket buffer is full, -1: the connection broke. */
HTTP_SERVER_HELPER int send_pending(int fd, const char *out, size_t *off, size_t *len)
{
    while (*off < *len) {
        ssize_t w = send(fd, out + *off, *len - *off, MSG_NOSIGNAL);
        if (w > 0)
            *off += (size_t)w;
        else if (w < 0 && errno == EINTR)
            continue;
        else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        else
            return -1;
    }
    *off = *len = 0;
    return 1;
}

/* The call write_all_via() puts bytes on a socket with: what a tracer records of the server. */
enum write_call { VIA_WRITE, VIA_SEND /* send(MSG_NOSIGNAL) */ };

/* Write all of [p, p+n) to the non-blocking socket FD, waiting up to 1 s whenever its buffer is
 * full.  -1 if the connection broke or the peer stopped reading. */
HTTP_SERVER_HELPER int write_all_via(int fd, const char *p, size_t n, enum write_call call)
{
    while (n > 0) {
        ssize_t w = call == VIA_SEND ? send(fd, p, n, MSG_NOSIGNAL) : write(fd, p, n);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, 1000) <= 0)
                return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

#endif
