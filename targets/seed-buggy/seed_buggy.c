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
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NWORKERS 4
#define MAXEVENTS 256
#define BUFSZ 8192
#define ARM (EPOLLIN | EPOLLONESHOT | EPOLLET)

struct client {
    int fd;
    char buf[BUFSZ];
    size_t len;
    size_t skip;  /* request-body bytes still to discard */
    int closing;  /* answered "Connection: close": ignore input, wait for the peer's EOF */
};

struct item {
    struct client *c;
    uint32_t events;
};

struct queue {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct item *items;
    size_t cap, head, n;
    int closed;
};

static volatile sig_atomic_t stop_flag;
static int epfd = -1;
static int lfd = -1;
static char listener_tag;
static struct queue work_q, error_q;

static const char RESP_400[] =
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: text/plain\r\n"
    "Content-Length: 12\r\n"
    "Connection: close\r\n"
    "\r\n"
    "bad request\n";

/* ---- queue ------------------------------------------------------------------------------ */

static void queue_init(struct queue *q)
{
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->cap = 1024;
    q->items = malloc(q->cap * sizeof *q->items);
    if (!q->items) {
        perror("malloc");
        exit(1);
    }
}

static void queue_push(struct queue *q, struct client *c, uint32_t events)
{
    pthread_mutex_lock(&q->mu);
    if (q->n == q->cap) {
        size_t ncap = q->cap * 2;
        struct item *ni = malloc(ncap * sizeof *ni);
        if (!ni) {
            perror("malloc");
            exit(1);
        }
        for (size_t i = 0; i < q->n; i++)
            ni[i] = q->items[(q->head + i) % q->cap];
        free(q->items);
        q->items = ni;
        q->cap = ncap;
        q->head = 0;
    }
    q->items[(q->head + q->n) % q->cap] = (struct item){c, events};
    q->n++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

static int queue_pop(struct queue *q, struct item *out)
{
    pthread_mutex_lock(&q->mu);
    while (q->n == 0 && !q->closed)
        pthread_cond_wait(&q->cv, &q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        return 0;
    }
    *out = q->items[q->head];
    q->head = (q->head + 1) % q->cap;
    q->n--;
    pthread_mutex_unlock(&q->mu);
    return 1;
}

static void queue_close(struct queue *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

/* ---- HTTP ------------------------------------------------------------------------------- */

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
static int parse_request(const char *p, size_t n, struct request *rq)
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

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
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

static void send_response(int fd, const struct request *rq)
{
    char out[BUFSZ + 256];
    int h = snprintf(out, sizeof out,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                     rq->path_len + 1, rq->close ? "Connection: close\r\n" : "");
    memcpy(out + h, rq->path, rq->path_len);
    out[(size_t)h + rq->path_len] = '\n';
    (void)write_all(fd, out, (size_t)h + rq->path_len + 1);
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
        (void)write_all(c->fd, RESP_400, sizeof RESP_400 - 1);
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
    queue_push(&error_q, c, 0);
    /* keep listening for the client while the error thread answers */
    rearm(c);
}

/* Answer every complete request in c->buf.  -1: c was handed to the error thread. */
static int serve(struct client *c)
{
    size_t off = 0;

    for (;;) {
        struct request rq;
        const char *hdr_end;

        if (c->closing) {
            off = c->len;
            break;
        }
        if (c->skip > 0) {
            size_t k = c->len - off < c->skip ? c->len - off : c->skip;
            off += k;
            c->skip -= k;
            if (c->skip > 0)
                break;
        }
        hdr_end = memmem(c->buf + off, c->len - off, "\r\n\r\n", 4);
        if (!hdr_end)
            break;
        if (parse_request(c->buf + off, (size_t)(hdr_end + 4 - (c->buf + off)), &rq) < 0) {
            bad_request(c);
            return -1;
        }
        send_response(c->fd, &rq);
        off = (size_t)(hdr_end + 4 - c->buf);
        c->skip = rq.content_length;
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
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return;
        }
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
            else
                queue_push(&work_q, events[i].data.ptr, events[i].events);
        }
    }
    queue_close(&work_q);
    queue_close(&error_q);
    return NULL;
}

/* ---- main ------------------------------------------------------------------------------- */

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static int listen_on(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res, *ai;
    int fd = -1, one = 1, rc = getaddrinfo(host, port, &hints, &res);

    if (rc != 0) {
        fprintf(stderr, "seed_buggy: %s:%s: %s\n", host, port, gai_strerror(rc));
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
        fprintf(stderr, "seed_buggy: cannot listen on %s:%s: %s\n", host, port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    pthread_t epoll_thread, error_thread, workers[NWORKERS];

    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    lfd = listen_on(argv[1], argv[2]);
    if (lfd < 0)
        return 1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        perror("epoll");
        return 1;
    }
    queue_init(&work_q);
    queue_init(&error_q);
    for (int i = 0; i < NWORKERS; i++)
        pthread_create(&workers[i], NULL, worker_main, NULL);
    pthread_create(&error_thread, NULL, error_main, NULL);
    pthread_create(&epoll_thread, NULL, epoll_main, NULL);

    printf("READY\n");
    fflush(stdout);

    pthread_join(epoll_thread, NULL);
    /* The seed never tracked its connections, so there is nothing to tear down; _exit also
     * skips LeakSanitizer's exit-time listing of every still-open client under ASan. */
    _exit(0);
}
