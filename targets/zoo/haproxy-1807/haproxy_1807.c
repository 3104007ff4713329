/*
 * haproxy-1807: one thread re-registers an fd number that another thread has just closed.
 *
 *   usage: haproxy_1807 HOST PORT      (prints READY on stdout once listening)
 *
 * A loop thread owns the connections (level-triggered registrations, data = the connection
 * object).  Keep-alive clients are rate limited: after a request is answered the loop stops
 * reading from the connection for PAUSE_US (the registration keeps only EPOLLRDHUP, so a
 * hang-up is still seen) and queues (fd, data) for the resumer thread, which re-enables
 * EPOLLIN with EPOLL_CTL_MOD when the pause is over.  The resumer works from its own list of
 * fd numbers, the way a poller applies a list of pending fd updates.
 *
 * The bug (ZOO_FIXED undefined): when the peer hangs up during the pause the loop closes the
 * connection and frees it, but the pending update stays queued: the resumer then calls
 * EPOLL_CTL_MOD on a number that is closed (EBADF), or that accept already handed to a new
 * connection, whose registration it overwrites with the dead connection's data.
 *
 * The fix (ZOO_FIXED): the update list is under one mutex with the resumer's epoll_ctl, and
 * the loop withdraws a connection's pending update under it before closing the fd.
 */
#include "../common/zoo_http.h"

#include <pthread.h>

#define PAUSE_US 1000
#define TICK_US 200

struct conn {
    struct zh_conn z;
    unsigned long answered;
};

struct update {
    int fd;
    struct conn *c;
    int64_t due_us;
};

static int epfd = -1;
static pthread_mutex_t upd_mu = PTHREAD_MUTEX_INITIALIZER;
static struct update *upd;
static size_t nupd, upd_cap;

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void conn_close(struct conn *c)
{
#ifdef ZOO_FIXED
    pthread_mutex_lock(&upd_mu);
    for (size_t i = 0; i < nupd; i++)
        if (upd[i].c == c)
            upd[i--] = upd[--nupd];
    pthread_mutex_unlock(&upd_mu);
#endif
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->z.fd, NULL);
    close(c->z.fd);
    zh_conn_release(&c->z);
    free(c);
}

static int rearm(struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events | EPOLLRDHUP, .data.ptr = c};
    return epoll_ctl(epfd, EPOLL_CTL_MOD, c->z.fd, &ev);
}

static void pause_reading(struct conn *c)
{
    pthread_mutex_lock(&upd_mu);
    if (nupd == upd_cap) {
        upd_cap = upd_cap ? upd_cap * 2 : 256;
        upd = realloc(upd, upd_cap * sizeof *upd);
        if (!upd)
            abort();
    }
    upd[nupd++] = (struct update){c->z.fd, c, now_us() + PAUSE_US};
    pthread_mutex_unlock(&upd_mu);
}

static void on_conn(void *p, uint32_t events)
{
    struct conn *c = p;
    enum zh_next next = zh_handle(&c->z, events);
    int r;

    if (next == ZH_CLOSE) {
        conn_close(c);
        return;
    }
    if (next == ZH_WRITE) {
        r = rearm(c, EPOLLOUT);
    } else if (c->z.answered != c->answered) {
        c->answered = c->z.answered;
        r = rearm(c, 0);
        if (r == 0)
            pause_reading(c);
    } else {
        r = rearm(c, EPOLLIN);
    }
    if (r < 0)
        conn_close(c);
}

static void *resumer_main(void *arg)
{
    (void)arg;
    while (!stop_flag) {
        int64_t now;
        zh_sleep_us(TICK_US);
        now = now_us();
        pthread_mutex_lock(&upd_mu);
        for (size_t i = 0; i < nupd; i++) {
            struct update u = upd[i];
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = u.c};
            if (u.due_us > now)
                continue;
            upd[i--] = upd[--nupd];
#ifndef ZOO_FIXED
            /* the update is applied outside the lock, from the values it queued */
            pthread_mutex_unlock(&upd_mu);
            epoll_ctl(epfd, EPOLL_CTL_MOD, u.fd, &ev);
            pthread_mutex_lock(&upd_mu);
#else
            epoll_ctl(epfd, EPOLL_CTL_MOD, u.fd, &ev);
#endif
        }
        pthread_mutex_unlock(&upd_mu);
    }
    return NULL;
}

static void accept_all(struct zh_listener *l)
{
    struct conn *c;
    ZH_EACH_ACCEPTED(l, fd, c, INT_MAX) {
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, (uintptr_t)c) < 0) {
            close(fd);
            free(c);
        }
    }
}

int main(int argc, char **argv)
{
    struct zh_listener l;
    pthread_t resumer;
    int lfd = zh_start(argc, argv);

    epfd = zh_epoll(&l, lfd, 0);
    pthread_create(&resumer, NULL, resumer_main, NULL);
    zh_ready();
    zh_run(&(struct zh_loop){.epfd = epfd, .l = &l, .accept = accept_all, .dispatch = on_conn});
    pthread_join(resumer, NULL);
    return 0;
}
