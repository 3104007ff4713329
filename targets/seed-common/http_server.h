/* The HTTP/1.x and listening code of the built-in C servers: seed-buggy and seed-fixed, and
 * afterclose's own test servers (tests/servers/common.h).  Each server has its own way of
 * reading, owning and closing connections; what a request means and what the answer looks
 * like is the same for all, and lives here.  Include it after defining _GNU_SOURCE (memmem). */
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

/* Not every server uses every helper; -Wall -Werror must not mind. */
#define HTTP_SERVER_HELPER static __attribute__((unused))

/* The listening socket: non-blocking, close-on-exec, SO_REUSEADDR, backlog 1024, on the first
 * address HOST:PORT resolves to that binds.  -1 (with a message naming PROG) if none does. */
HTTP_SERVER_HELPER int listen_on(const char *prog, const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res, *ai;
    int fd = -1, one = 1, rc = getaddrinfo(host, port, &hints, &res);

    if (rc != 0) {
        fprintf(stderr, "%s: %s:%s: %s\n", prog, host, port, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 1024) == 0)
            break;
        close(fd);
        fd = -1;
    }
    if (fd < 0)
        fprintf(stderr, "%s: cannot listen on %s:%s: %s\n", prog, host, port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

static const char RESP_400[] =
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: text/plain\r\n"
    "Content-Length: 12\r\n"
    "Connection: close\r\n"
    "\r\n"
    "bad request\n";

struct request {
    const char *path;
    size_t path_len;
    size_t content_length;
    int close;
};

static int ci_contains(const char *s, size_t n, const char *word)
{
    size_t w = strlen(word);
    for (size_t i = 0; i + w <= n; i++)
        if (strncasecmp(s + i, word, w) == 0)
            return 1;
    return 0;
}

/* Parse one header block [p, p+n) ending in CRLFCRLF.  -1 = malformed. */
HTTP_SERVER_HELPER int parse_request(const char *p, size_t n, struct request *rq)
{
    const char *end = p + n;
    const char *eol = memmem(p, n, "\r\n", 2);
    const char *s = p;
    int minor;
    int keep_alive = 0, close_hdr = 0;

    memset(rq, 0, sizeof *rq);
    if (!eol)
        return -1;
    while (s < eol && *s >= 'A' && *s <= 'Z')
        s++;
    if (s == p || s >= eol || *s != ' ')
        return -1;
    s++;
    if (s >= eol || *s != '/')
        return -1;
    rq->path = s;
    while (s < eol && *s > ' ' && *s < 0x7f)
        s++;
    rq->path_len = (size_t)(s - rq->path);
    if (s >= eol || *s != ' ')
        return -1;
    s++;
    if (eol - s != 8 || memcmp(s, "HTTP/1.", 7) != 0 || s[7] < '0' || s[7] > '9')
        return -1;
    minor = s[7] - '0';

    for (s = eol + 2; s < end;) {
        const char *le = memmem(s, (size_t)(end - s), "\r\n", 2);
        const char *colon;
        if (!le || le == s)
            break;
        colon = memchr(s, ':', (size_t)(le - s));
        if (!colon)
            return -1;
        if ((size_t)(colon - s) == 10 && strncasecmp(s, "connection", 10) == 0) {
            if (ci_contains(colon + 1, (size_t)(le - colon - 1), "close"))
                close_hdr = 1;
            if (ci_contains(colon + 1, (size_t)(le - colon - 1), "keep-alive"))
                keep_alive = 1;
        } else if ((size_t)(colon - s) == 14 && strncasecmp(s, "content-length", 14) == 0) {
            const char *v = colon + 1;
            size_t cl = 0;
            while (v < le && *v == ' ')
                v++;
            if (v == le)
                return -1;
            for (; v < le && *v != ' '; v++) {
                if (*v < '0' || *v > '9' || cl > (SIZE_MAX - 9) / 10)
                    return -1;
                cl = cl * 10 + (size_t)(*v - '0');
            }
            rq->content_length = cl;
        }
        s = le + 2;
    }
    rq->close = close_hdr || (minor == 0 && !keep_alive);
    return 0;
}

/* The head of the answer to rq, into out (snprintf's result); the body is the path and "\n". */
HTTP_SERVER_HELPER int response_head(char *out, size_t size, const struct request *rq)
{
    return snprintf(out, size,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                    rq->path_len + 1, rq->close ? "Connection: close\r\n" : "");
}

#endif
