/*
 * The seed's architecture behind a non-HTTP protocol, chosen at build time:
 *   -DPROTO_LINE (newline echo), -DPROTO_RESP (PING, ECHO, SET, GET), -DPROTO_MEMCACHED
 *   (set, get, version);  -DSEED_FIXED builds the correct twin.
 *
 *   usage: seed_proto HOST PORT      (prints READY on stdout once listening)
 *
 * Like targets/seed-buggy: an epoll thread accepts and queues events to 4 workers; fds are
 * registered EPOLLIN|EPOLLONESHOT|EPOLLET with data.ptr = a malloc'd struct client; a worker
 * reads until EAGAIN, answers every whole request and re-arms with EPOLL_CTL_MOD; on EOF it
 * frees the client and closes the fd.  A malformed request goes to the error thread.
 *
 * Buggy (the seed's bug): the worker ALSO re-arms right after the hand-over, so the connection
 * has two owners; the error thread writes the protocol's error reply, shuts the socket down and
 * re-arms it "so the worker sees the close", while a worker may already have freed the client
 * and closed the fd (use-after-free, a re-arm of a closed or reused fd).
 *
 * Fixed: one owner at a time.  The worker that hands a connection over does not re-arm; the
 * error thread answers, then deletes the registration, closes and frees.  A worker closing
 * on EOF deletes the registration before close().  Keys are per connection: each client keeps
 * the one value its connection set.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <poll.h>

#include "../../targets/seed-common/seed_server.h"
#include "common.h"

#define ARM (EPOLLIN | EPOLLONESHOT | EPOLLET)
#define OUTSZ (2 * BUFSZ + 512)

struct client {
    int fd;
    char buf[BUFSZ];
    size_t len;
    char key[256];
    size_t keylen;
    char val[BUFSZ];
    size_t vallen;
    int has_val;
};

struct out {
    char p[OUTSZ];
    size_t n;
};

static void put(struct out *o, const void *p, size_t n)
{
    if (o->n + n <= sizeof o->p) {
        memcpy(o->p + o->n, p, n);
        o->n += n;
    }
}

/* A value of n bytes after a header line: "<prefix><n>\r\n" (RESP) or "<prefix> <n>\r\n". */
static __attribute__((unused)) void put_value(struct out *o, const char *prefix,
                                              const char *v, size_t n)
{
    char head[400];
    int h = snprintf(head, sizeof head, "%s%zu\r\n", prefix, n);
    put(o, head, (size_t)h);
    put(o, v, n);
    put(o, "\r\n", 2);
}

static __attribute__((unused)) void store(struct client *c, const char *k, size_t kn, const char *v, size_t vn)
{
    memcpy(c->key, k, kn);
    c->keylen = kn;
    memcpy(c->val, v, vn);
    c->vallen = vn;
    c->has_val = 1;
}

static __attribute__((unused)) int holds(const struct client *c, const char *k, size_t kn)
{
    return c->has_val && kn == c->keylen && memcmp(k, c->key, kn) == 0;
}

/* Each protocol: one request at p[0..n): its length, with the reply added to o; 0 if the
 * request is not whole yet; -1 if it is malformed. */
#if defined(PROTO_LINE)
static const char PROTO_ERROR[] = "ERR malformed line\n";

static long one_request(struct client *c, const char *p, size_t n, struct out *o)
{
    const char *nl = memchr(p, '\n', n);
    (void)c;
    if (!nl)
        return n == BUFSZ ? -1 : 0;
    for (const char *q = p; q < nl; q++) {
        unsigned char ch = (unsigned char)*q;
        if ((ch < 0x20 && ch != '\r' && ch != '\t') || ch >= 0x7f)
            return -1;
    }
    put(o, p, (size_t)(nl + 1 - p));
    return nl + 1 - p;
}

#elif defined(PROTO_RESP)
static const char PROTO_ERROR[] = "-ERR malformed request\r\n";

/* A number ending in CRLF at *pp; -2 if not whole, -1 if malformed. */
static long resp_number(const char **pp, const char *end, char kind)
{
    const char *p = *pp, *cr;
    long v = 0;
    if (p >= end)
        return -2;
    if (*p != kind)
        return -1;
    cr = memmem(p, (size_t)(end - p), "\r\n", 2);
    if (!cr)
        return end - p > 24 ? -1 : -2;
    if (cr == p + 1)
        return -1;
    for (const char *q = p + 1; q < cr; q++) {
        if (!isdigit((unsigned char)*q) || v > BUFSZ)
            return -1;
        v = v * 10 + (*q - '0');
    }
    *pp = cr + 2;
    return v;
}

static long one_request(struct client *c, const char *p, size_t n, struct out *o)
{
    const char *end = p + n, *q = p, *arg[3];
    size_t len[3];
    long argc = resp_number(&q, end, '*');
    if (argc < 0)
        return argc == -2 ? 0 : -1;
    if (argc < 1 || argc > 3)
        return -1;
    for (long i = 0; i < argc; i++) {
        long size = resp_number(&q, end, '$');
        if (size < 0)
            return size == -2 ? 0 : -1;
        if (end - q < size + 2)
            return 0;
        if (q[size] != '\r' || q[size + 1] != '\n')
            return -1;
        arg[i] = q;
        len[i] = (size_t)size;
        q += size + 2;
    }
#define IS(word, count) (argc == (count) && len[0] == sizeof word - 1 && \
                         strncasecmp(arg[0], word, len[0]) == 0)
    if (IS("PING", 1)) {
        put(o, "+PONG\r\n", 7);
    } else if (IS("ECHO", 2)) {
        put_value(o, "$", arg[1], len[1]);
    } else if (IS("SET", 3) && len[1] < sizeof c->key) {
        store(c, arg[1], len[1], arg[2], len[2]);
        put(o, "+OK\r\n", 5);
    } else if (IS("GET", 2)) {
        if (!holds(c, arg[1], len[1])) {
            put(o, "$-1\r\n", 5);
        } else {
            put_value(o, "$", c->val, c->vallen);
        }
    } else {
        return -1;
    }
#undef IS
    return q - p;
}

#elif defined(PROTO_MEMCACHED)
static const char PROTO_ERROR[] = "ERROR\r\n";

static long one_request(struct client *c, const char *p, size_t n, struct out *o)
{
    const char *cr = memmem(p, n, "\r\n", 2);
    char cmd[16], key[300];
    unsigned flags, exptime;
    size_t size, line;
    int used = 0;

    if (!cr)
        return n > 1024 ? -1 : 0;
    line = (size_t)(cr - p) + 2;
    if (line > 1024)
        return -1;
    char text[1024];
    memcpy(text, p, line - 2);
    text[line - 2] = '\0';
    if (sscanf(text, "%15s %299s%n", cmd, key, &used) < 1)
        return -1;
    if (strcmp(cmd, "version") == 0) {
        put(o, "VERSION 1.6.0-afterclose\r\n", 26);
        return (long)line;
    }
    if (strlen(key) > 250)
        return -1;
    if (strcmp(cmd, "get") == 0 && text[used] == '\0') {
        if (holds(c, key, strlen(key))) {
            char head[300];
            snprintf(head, sizeof head, "VALUE %s 0 ", key);
            put_value(o, head, c->val, c->vallen);
        }
        put(o, "END\r\n", 5);
        return (long)line;
    }
    if (strcmp(cmd, "set") == 0) {
        char tail;
        if (sscanf(text + used, " %u %u %zu %c", &flags, &exptime, &size, &tail) != 3 ||
            size > BUFSZ)
            return -1;
        if (n < line + size + 2)
            return line + size + 2 > BUFSZ ? -1 : 0;
        if (p[line + size] != '\r' || p[line + size + 1] != '\n')
            return -1;
        store(c, key, strlen(key), p + line, size);
        put(o, "STORED\r\n", 8);
        return (long)(line + size + 2);
    }
    return -1;
}

#else
#error "build with -DPROTO_LINE, -DPROTO_RESP or -DPROTO_MEMCACHED"
#endif

/* ---- the error thread ------------------------------------------------------------------- */

static void rearm(struct client *c)
{
    struct epoll_event ev = {.events = ARM, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void drop(struct client *c)
{
    int fd = c->fd;
#ifdef SEED_FIXED
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
#endif
    free(c);
    close(fd);
}

static void *error_main(void *arg)
{
    struct item it;
    (void)arg;
    while (queue_pop(&error_q, &it)) {
        struct client *c = it.c;
        char line[96];

        /* The logging a real server does before it answers. */
        snprintf(line, sizeof line, "malformed request on fd %d", c->fd);
        (void)write_all(c->fd, PROTO_ERROR, sizeof PROTO_ERROR - 1);
#ifdef SEED_FIXED
        drop(c);
#else
        shutdown(c->fd, SHUT_RDWR);
        /* "re-arm so the worker sees the close" */
        rearm(c);
#endif
    }
    return NULL;
}

/* ---- workers ---------------------------------------------------------------------------- */

static void bad_request(struct client *c)
{
    c->len = 0;
    if (queue_push(&error_q, c, 0) < 0) {
        perror("malloc");
        exit(1);
    }
#ifndef SEED_FIXED
    /* keep listening for the client while the error thread answers */
    rearm(c);
#endif
}

/* Answer every whole request in c->buf.  -1: c was handed to the error thread. */
static int serve(struct client *c)
{
    size_t off = 0;
    static __thread struct out o;

    for (;;) {
        long used;
        o.n = 0;
        if (off == c->len)
            break;
        used = one_request(c, c->buf + off, c->len - off, &o);
        if (used == 0)
            break;
        if (used < 0) {
            bad_request(c);
            return -1;
        }
        (void)write_all(c->fd, o.p, o.n);
        off += (size_t)used;
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

static void handle(struct client *c)
{
    for (;;) {
        ssize_t n;
        if (c->len == sizeof c->buf) {
            bad_request(c);
            return;
        }
        n = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
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
        drop(c); /* EOF or error: the client is gone */
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
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return;
        }
        c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
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
    struct epoll_event events[MAXEVENTS];
    (void)arg;
    while (!stop_flag) {
        int n = epoll_wait(epfd, events, MAXEVENTS, 300);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == &listener_tag)
                accept_all();
            else if (queue_push(&work_q, events[i].data.ptr, events[i].events) < 0)
                exit(1);
        }
    }
    queue_close(&work_q);
    queue_close(&error_q);
    return NULL;
}

int main(int argc, char **argv)
{
    struct seed_threads threads = {
        .worker_main = worker_main, .error_main = error_main, .epoll_main = epoll_main};
    int status = seed_serve(argc, argv, "seed_proto", &threads);

    if (status != 0)
        return status;
    _exit(0);
}
