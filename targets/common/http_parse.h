/* The pure HTTP/1.x helpers every C target shares (the seeds, the static pair, the zoo and
 * afterclose's own test servers): what a request means and what its answer looks like, and a
 * growing output buffer.  No syscalls: each server keeps its own reading, writing, owning and
 * closing, so including this changes no server's order of syscalls.  Include it after
 * defining _GNU_SOURCE (memmem). */
#ifndef AFTERCLOSE_HTTP_PARSE_H
#define AFTERCLOSE_HTTP_PARSE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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

static inline int ci_contains(const char *s, size_t n, const char *word)
{
    size_t w = strlen(word);
    for (size_t i = 0; i + w <= n; i++)
        if (strncasecmp(s + i, word, w) == 0)
            return 1;
    return 0;
}

/* Parse one header block [p, p+n) ending in CRLFCRLF.  -1 = malformed. */
static inline int parse_request(const char *p, size_t n, struct request *rq)
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
static inline int response_head(char *out, size_t size, const struct request *rq)
{
    return snprintf(out, size,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                    rq->path_len + 1, rq->close ? "Connection: close\r\n" : "");
}

/* Append [p, p+n) to the growing buffer *buf (*len bytes used of *cap; the first allocation is
 * 4096 bytes, then it doubles).  -1: out of memory, the buffer unchanged. */
static inline int buf_append(char **buf, size_t *len, size_t *cap, const char *p, size_t n)
{
    if (*len + n > *cap) {
        size_t ncap = *cap ? *cap : 4096;
        char *nb;
        while (ncap < *len + n)
            ncap *= 2;
        nb = realloc(*buf, ncap);
        if (!nb)
            return -1;
        *buf = nb;
        *cap = ncap;
    }
    memcpy(*buf + *len, p, n);
    *len += n;
    return 0;
}

#endif
