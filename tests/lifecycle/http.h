/* HTTP/1.x for the lifecycle test servers (loop.c, pool.c): parse one request line and its
 * headers, answer with the path as the body, or 400.  Included after the system headers and
 * after BUFSZ is defined. */
#ifndef AFTERCLOSE_TEST_LIFECYCLE_HTTP_H
#define AFTERCLOSE_TEST_LIFECYCLE_HTTP_H

static int write_all(int fd, const char *p, size_t n)
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

/* -1 malformed, else 0 with path/close filled in */
static int parse(const char *p, size_t n, const char **path, size_t *path_len, int *close_it)
{
    const char *eol = memmem(p, n, "\r\n", 2);
    const char *s = p, *hdrs;
    if (!eol)
        return -1;
    while (s < eol && *s >= 'A' && *s <= 'Z')
        s++;
    if (s == p || s >= eol || *s != ' ' || s + 1 >= eol || s[1] != '/')
        return -1;
    *path = ++s;
    while (s < eol && *s > ' ' && *s < 0x7f)
        s++;
    *path_len = (size_t)(s - *path);
    if (eol - s != 9 || memcmp(s, " HTTP/1.", 8) != 0 || (s[8] != '0' && s[8] != '1'))
        return -1;
    *close_it = s[8] == '0';
    for (hdrs = eol + 2; hdrs < p + n;) {
        const char *le = memmem(hdrs, (size_t)(p + n - hdrs), "\r\n", 2);
        if (!le || le == hdrs)
            break;
        if (!memchr(hdrs, ':', (size_t)(le - hdrs)))
            return -1;
        if ((size_t)(le - hdrs) >= 11 && strncasecmp(hdrs, "connection:", 11) == 0) {
            for (const char *v = hdrs + 11; v + 5 <= le; v++)
                if (strncasecmp(v, "close", 5) == 0)
                    *close_it = 1;
        }
        hdrs = le + 2;
    }
    return 0;
}

static int respond(int fd, const char *path, size_t path_len, int close_it)
{
    char out[BUFSZ + 256];
    int h = snprintf(out, sizeof out,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                     path_len + 1, close_it ? "Connection: close\r\n" : "");
    memcpy(out + h, path, path_len);
    out[(size_t)h + path_len] = '\n';
    return write_all(fd, out, (size_t)h + path_len + 1);
}

static const char RESP_400[] = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                               "Content-Length: 12\r\nConnection: close\r\n\r\nbad request\n";

#endif
