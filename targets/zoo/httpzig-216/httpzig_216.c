/*
 * httpzig-216: a worker closes the fd and recycles the connection object while the loop
 * thread sits in epoll_wait with the connection still registered.
 *
 *   usage: httpzig_216 HOST PORT      (prints READY on stdout once listening)
 *
 * One loop thread owns the epoll instance: it accepts, registers each connection
 * edge-triggered (EPOLLIN | EPOLLOUT | EPOLLRDHUP, data = the connection object) and hands
 * each event to a pool of 4 workers.  A connection is run by one worker at a time: an event
 * that arrives while a worker holds it is folded into that worker's run.
 *
 * The bug (ZOO_FIXED undefined): when a connection is over, the worker that holds it gives the
 * object back (free) and then closes the fd.  Between the two the registration is still live
 * and armed, and the loop thread is almost always inside epoll_wait on that instance: the
 * kernel can hand it the freed (and soon reused) object, which it then queues to a worker.
 *
 * The fix (ZOO_FIXED): the worker marks the connection closing and hands it to the loop
 * thread, which removes the registration, closes the fd and frees the object between two
 * waits, when no harvested event can still name it.
 */
#include "../common/zoo_http.h"
#include "../../common/queue.h"


#define NWORKERS 4
#define TAG_LISTENER 1
#define TAG_WAKE 2 /* below ZH_TAGS: zh_run skips it */

struct conn {
    struct zh_conn z;
    pthread_mutex_t mu;
    int running; /* a worker holds it */
    int closing; /* handed to the loop thread to be closed */
    uint32_t again; /* events that arrived while a worker held it */
};

static int epfd = -1;
static struct queue work_q;
#ifdef ZOO_FIXED
static int wake_fd = -1;
static pthread_mutex_t done_mu = PTHREAD_MUTEX_INITIALIZER;
static struct conn **done;
static size_t ndone, done_cap;
#endif

static void conn_free(struct conn *c)
{
    zh_conn_release(&c->z);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* The worker that holds c is done with it for good. */
static void conn_over(struct conn *c)
{
#ifdef ZOO_FIXED
    pthread_mutex_lock(&done_mu);
    if (ndone == done_cap) {
        done_cap = done_cap ? done_cap * 2 : 64;
        done = realloc(done, done_cap * sizeof *done);
        if (!done)
            abort();
    }
    done[ndone++] = c;
    pthread_mutex_unlock(&done_mu);
    eventfd_write(wake_fd, 1);
#else
    int fd = c->z.fd;
    conn_free(c); /* back to the allocator while still registered */
    close(fd);
#endif
}

static void *worker_main(void *arg)
{
    struct item it;
    (void)arg;
    while (queue_pop(&work_q, &it)) {
        struct conn *c = it.c;
        uint32_t events = it.events;
        for (;;) {
            enum zh_next next = zh_handle(&c->z, events);
            pthread_mutex_lock(&c->mu);
            if (next == ZH_CLOSE) {
                c->closing = 1;
                pthread_mutex_unlock(&c->mu);
                conn_over(c);
                break;
            }
            if (!c->again) {
                c->running = 0;
                pthread_mutex_unlock(&c->mu);
                break;
            }
            events = c->again;
            c->again = 0;
            pthread_mutex_unlock(&c->mu);
        }
    }
    return NULL;
}

static void dispatch(void *p, uint32_t events)
{
    struct conn *c = p;
    pthread_mutex_lock(&c->mu);
    if (c->closing) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    if (c->running) {
        c->again |= events;
        pthread_mutex_unlock(&c->mu);
        return;
    }
    c->running = 1;
    pthread_mutex_unlock(&c->mu);
    if (queue_push(&work_q, c, events) < 0)
        abort(); /* out of memory */
}

static void accept_all(struct zh_listener *l)
{
    struct conn *c;
    ZH_EACH_ACCEPTED(l, fd, c, INT_MAX) {
        pthread_mutex_init(&c->mu, NULL);
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                     (uintptr_t)c) < 0) {
            close(fd);
            conn_free(c);
        }
    }
}

#ifdef ZOO_FIXED
/* Between two waits: nothing harvested can still name these connections. */
static void close_done(void)
{
    eventfd_t v;
    eventfd_read(wake_fd, &v);
    pthread_mutex_lock(&done_mu);
    for (size_t i = 0; i < ndone; i++) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, done[i]->z.fd, NULL);
        close(done[i]->z.fd);
        conn_free(done[i]);
    }
    ndone = 0;
    pthread_mutex_unlock(&done_mu);
}
#endif

int main(int argc, char **argv)
{
    struct zh_listener l;
    pthread_t workers[NWORKERS];
    int lfd = zh_start(argc, argv);
    struct zh_loop loop = {.l = &l, .accept = accept_all, .dispatch = dispatch};

    epfd = loop.epfd = zh_epoll(&l, lfd, TAG_LISTENER);
#ifdef ZOO_FIXED
    wake_fd = zh_wake_fd(epfd, TAG_WAKE);
#endif
    queue_init(&work_q);
    for (int i = 0; i < NWORKERS; i++)
        pthread_create(&workers[i], NULL, worker_main, NULL);
    zh_ready();
#ifdef ZOO_FIXED
    loop.before = close_done;
#endif
    zh_run(&loop);
    queue_close(&work_q);
    for (int i = 0; i < NWORKERS; i++)
        pthread_join(workers[i], NULL);
    return 0;
}
