/* What afterclose's small C test servers (tests/servers, tests/lifecycle) share: the HTTP and
 * listening code of the built-in servers (targets/seed-common/http_server.h) and a blocking
 * answer on a non-blocking socket.  Include it after defining _GNU_SOURCE and BUFSZ. */
#ifndef AFTERCLOSE_TEST_SERVERS_COMMON_H
#define AFTERCLOSE_TEST_SERVERS_COMMON_H

#include <poll.h>

#include "../../targets/seed-common/http_server.h"

#ifndef BUFSZ
#error "define BUFSZ (the request buffer's size) before including common.h"
#endif

/* Write all of [p, p+n), waiting up to 1 s whenever the socket buffer is full.  -1 if the
 * connection broke or the client stopped reading. */
HTTP_SERVER_HELPER int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
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

/* The answer to rq: 200, the path and a newline as the body. */
HTTP_SERVER_HELPER int respond(int fd, const struct request *rq)
{
    char out[BUFSZ + 256];
    int h = response_head(out, sizeof out, rq);
    memcpy(out + h, rq->path, rq->path_len);
    out[(size_t)h + rq->path_len] = '\n';
    return write_all(fd, out, (size_t)h + rq->path_len + 1);
}

#endif
