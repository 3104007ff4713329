/*
 * h2o-1427: the loop thread handles an epoll event for an fd that another thread (a
 * periodic updater) closed.
 *
 *   usage: h2o_1427 HOST PORT      (prints READY on stdout once listening)
 *
 * A loop thread owns the epoll instance and serves the connections (level-triggered
 * registrations, data = the connection object).  A periodic updater thread wakes every
 * UPDATE_US and reaps connections the peer has abandoned: TCP state CLOSE_WAIT (FIN received)
 * or CLOSE (reset), nothing left unread, nothing left to send.
 *
 * The bug (ZOO_FIXED undefined): the updater closes those fds itself.  The peer's FIN or reset
 * that made a connection reapable is also an epoll event: when the loop thread has already
 * harvested it, it dispatches it after the updater's close and reads from, "closes" and
 * deletes a number that is closed (EBADF) or already handed to a new connection.  The loop
 * frees a reaped connection's object at the start of its next iteration.
 *
 * The fix (ZOO_FIXED): the updater only marks the connection and wakes the loop thread, which
 * closes it between two batches.
 */
#include "../common/zoo_http.h"
#include "../../common/list.h"

#include <pthread.h>

#define UPDATE_US 1000
#define TAG_LISTENER 1
#define TAG_WAKE 2 /* below ZH_TAGS: zh_run skips it */

struct conn {
    struct zh_conn z;
    int reap; /* the updater found it abandoned (and, with the bug, closed it) */
    struct conn *prev, *next;
};

static int epfd = -1;
static pthread_mutex_t conns_mu = PTHREAD_MUTEX_INITIALIZER;
static struct conn *conns; /* live connections, for the updater */
static struct conn *reaped; /* closed by the updater, to be freed by the loop */
#ifdef ZOO_FIXED
static int wake_fd = -1;
#endif

static void unlink_conn(struct conn *c)
{
    LIST_UNLINK(conns, c);
    c->prev = c->next = NULL;
}

static void conn_close(struct conn *c)
{
    int zombie = 0;
    pthread_mutex_lock(&conns_mu);
#ifndef ZOO_FIXED
    zombie = c->reap; /* the updater closed it and unlinked it */
#endif
    if (!zombie)
        unlink_conn(c);
    pthread_mutex_unlock(&conns_mu);
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->z.fd, NULL);
    close(c->z.fd);
    if (!zombie) {
        zh_conn_release(&c->z);
        free(c);
    }
}

static int abandoned(struct conn *c)
{
    return zh_peer_gone(c->z.fd) && !__atomic_load_n(&c->z.outlen, __ATOMIC_RELAXED);
}

static void *updater_main(void *arg)
{
    (void)arg;
    while (!stop_flag) {
        zh_sleep_us(UPDATE_US);
        pthread_mutex_lock(&conns_mu);
        for (struct conn *c = conns, *next; c; c = next) {
            next = c->next;
            if (c->reap || !abandoned(c))
                continue;
            c->reap = 1;
#ifdef ZOO_FIXED
            eventfd_write(wake_fd, 1);
#else
            unlink_conn(c);
            close(c->z.fd);
            c->next = reaped;
            reaped = c;
#endif
        }
        pthread_mutex_unlock(&conns_mu);
    }
    return NULL;
}

/* Between two batches: nothing harvested can still name these connections. */
static void between_batches(void)
{
    struct conn *dead;
#ifdef ZOO_FIXED
    eventfd_t v;
    eventfd_read(wake_fd, &v);
    for (;;) {
        struct conn *c;
        pthread_mutex_lock(&conns_mu);
        for (c = conns; c && !c->reap; c = c->next)
            ;
        pthread_mutex_unlock(&conns_mu);
        if (!c)
            break;
        conn_close(c);
    }
#endif
    pthread_mutex_lock(&conns_mu);
    dead = reaped;
    reaped = NULL;
    pthread_mutex_unlock(&conns_mu);
    while (dead) {
        struct conn *c = dead;
        dead = c->next;
        zh_conn_release(&c->z);
        free(c);
    }
}

static void on_conn(void *p, uint32_t events)
{
    struct conn *c = p;
    enum zh_next next = zh_handle(&c->z, events);
    struct epoll_event ev = {.events = EPOLLRDHUP, .data.ptr = c};
    if (next == ZH_CLOSE) {
        conn_close(c);
        return;
    }
    ev.events |= next == ZH_WRITE ? EPOLLOUT : EPOLLIN;
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->z.fd, &ev) < 0)
        conn_close(c);
}

static void accept_all(struct zh_listener *l)
{
    struct conn *c;
    ZH_EACH_ACCEPTED(l, fd, c, INT_MAX) {
        pthread_mutex_lock(&conns_mu);
        LIST_PUSH(conns, c);
        pthread_mutex_unlock(&conns_mu);
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, (uintptr_t)c) < 0)
            conn_close(c);
    }
}

int main(int argc, char **argv)
{
    struct zh_listener l;
    pthread_t updater;
    int lfd = zh_start(argc, argv);

    epfd = zh_epoll(&l, lfd, TAG_LISTENER);
#ifdef ZOO_FIXED
    wake_fd = zh_wake_fd(epfd, TAG_WAKE);
#endif
    pthread_create(&updater, NULL, updater_main, NULL);
    zh_ready();
    zh_run(&(struct zh_loop){.epfd = epfd,
                             .l = &l,
                             .accept = accept_all,
                             .dispatch = on_conn,
                             .before = between_batches});
    pthread_join(updater, NULL);
    return 0;
}
