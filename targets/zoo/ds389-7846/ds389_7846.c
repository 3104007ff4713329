/*
 * ds389-7846: EPOLLONESHOT re-armed before the handler's last touch of the connection: two
 * threads handle one connection at once.
 *
 *   usage: ds389_7846 HOST PORT      (prints READY on stdout once listening)
 *
 * A loop thread waits on epoll and queues each event to NWORKERS workers; connections live in
 * a table with one slot per fd number.  Connections are
 * registered with EPOLLONESHOT, so that an event goes to one worker at a time: the worker
 * that got it owns the connection until it re-arms the registration with EPOLL_CTL_MOD.
 *
 * The bug (ZOO_FIXED undefined): to start waiting for the next request while the answer is
 * still being written, a worker re-arms the connection as soon as it has read the request,
 * then writes the answer and, when the client is done, closes the connection.  Whatever is
 * still readable (the client's FIN, a reset, a pipelined request) fires at once, and a second
 * worker reads, answers or closes the same connection while the first still writes or
 * closes it.
 *
 * The fix (ZOO_FIXED): the re-arm is the worker's last touch of the connection.
 */
#include "../common/zoo_http.h"
#include "../../common/queue.h"

#define NWORKERS 4
#define MAX_FDS 4096
#define LOG_US 200 /* the access log's device is slow */

struct conn {
    struct zh_conn z;
    unsigned long logged; /* answers already in the access log */
};

static int epfd = -1;
static struct queue work_q;
static struct conn table[MAX_FDS]; /* the connection table: one slot per fd number */
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

static void conn_close(struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->z.fd, NULL);
    close(c->z.fd);
    zh_conn_release(&c->z);
}

static int rearm(struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events | EPOLLRDHUP | EPOLLONESHOT, .data.ptr = c};
    return epoll_ctl(epfd, EPOLL_CTL_MOD, c->z.fd, &ev);
}

/* One line per batch of answers, written (unbuffered) to stderr before the answers go out. */
static void access_log(struct conn *c)
{
    char line[96];
    int n;
    if (c->z.answered == c->logged)
        return;
    c->logged = c->z.answered;
    n = snprintf(line, sizeof line, "fd %d: %lu answered, %zu bytes to send\n", c->z.fd,
                 c->z.answered, c->z.outlen - c->z.outoff);
    pthread_mutex_lock(&log_mu);
    if (write(2, line, (size_t)n) < 0)
        perror("access log");
    zh_sleep_us(LOG_US);
    pthread_mutex_unlock(&log_mu);
}

static void handle(struct conn *c, uint32_t events)
{
    enum zh_next next;

    if (events & (EPOLLERR | EPOLLHUP)) {
        conn_close(c);
        return;
    }
    if (events & EPOLLRDHUP)
        c->z.peer_eof = 1;
    if (zh_pending(&c->z)) {
        int r = zh_flush(&c->z);
        if (r < 0) {
            conn_close(c);
            return;
        }
        if (r == 0) {
            if (rearm(c, EPOLLOUT) < 0)
                conn_close(c);
            return;
        }
    }
    if (zh_read_serve(&c->z) < 0) {
        conn_close(c);
        return;
    }
#ifndef ZOO_FIXED
    /* wait for the next request while this one's answer is logged and written */
    if (rearm(c, EPOLLIN) < 0) {
        conn_close(c);
        return;
    }
#endif
    access_log(c);
    next = zh_settle(&c->z);
    if (next == ZH_CLOSE)
        conn_close(c);
    else if (next == ZH_WRITE && rearm(c, EPOLLOUT) < 0)
        conn_close(c);
#ifdef ZOO_FIXED
    else if (next == ZH_READ && rearm(c, EPOLLIN) < 0)
        conn_close(c);
#endif
}

static void *worker_main(void *arg)
{
    struct item it;
    (void)arg;
    while (queue_pop(&work_q, &it))
        handle(it.c, it.events);
    return NULL;
}

static void accept_all(struct zh_listener *l)
{
    int fd;
    while ((fd = zh_accept_next(l)) >= 0) {
        struct conn *c = &table[fd];
        if (fd >= MAX_FDS) {
            close(fd);
            continue;
        }
        zh_conn_init(&c->z, fd);
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP | EPOLLONESHOT,
                     (uintptr_t)c) < 0)
            close(fd);
    }
}

/* The loop thread's part: a connection's event goes to the workers' queue. */
static void enqueue(void *c, uint32_t events)
{
    if (queue_push(&work_q, c, events) < 0)
        abort(); /* out of memory */
}

int main(int argc, char **argv)
{
    struct zh_listener l;
    pthread_t workers[NWORKERS];
    int lfd = zh_start(argc, argv);

    epfd = zh_epoll(&l, lfd, 0);
    queue_init(&work_q);
    for (int i = 0; i < NWORKERS; i++)
        pthread_create(&workers[i], NULL, worker_main, NULL);
    zh_ready();
    zh_run(&(struct zh_loop){.epfd = epfd, .l = &l, .accept = accept_all, .dispatch = enqueue});
    queue_close(&work_q);
    for (int i = 0; i < NWORKERS; i++)
        pthread_join(workers[i], NULL);
    return 0;
}
