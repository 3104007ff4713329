/*
 * libuv-968: stale events of a closed-and-reopened fd number invoke the new watcher's
 * callback.
 *
 *   usage: libuv_968 HOST PORT      (prints READY on stdout once listening)
 *
 * One thread, a libuv-style loop: epoll data is the fd number, and each event is dispatched
 * through a table of watchers indexed by fd (watchers[fd]).  An event whose number has no
 * watcher is "a descriptor we stopped watching": the loop disarms it with EPOLL_CTL_DEL.
 * The listener's event is handled first in each batch (new clients do not wait behind the
 * connections' work, as nginx's posted accept events do not).  Before each accept it reclaims
 * the fds of connections whose peer is gone (a FIN or a reset) and that have nothing left to
 * answer, then accepts one connection.
 *
 * The bug (ZOO_FIXED undefined): the reclaiming closes happen in the middle of a batch.  The
 * peer's FIN or reset that made a connection "gone" is, as an event, usually still ahead in
 * the same batch (the listener's event went first): if accept handed the number to
 * the new connection, they run the new watcher's callback (a reset or FIN of the old peer
 * closes the new connection); if not, the loop "disarms" a number that is already closed.
 *
 * The fix (ZOO_FIXED): closing an fd while a batch is being dispatched invalidates the
 * batch's remaining events for that number, as libuv's uv__platform_invalidate_fd does.
 */
#include "../common/zoo_http.h"


#define MAXEVENTS 256
#define MAX_FDS 65536

struct conn {
    struct zh_conn z;
    uint32_t interest;
};

static int epfd = -1;
static struct conn *watchers[MAX_FDS];
static int max_fd;
static struct epoll_event events[MAXEVENTS];
static int batch_n, batch_i; /* the batch being dispatched, and the position in it */

static void conn_close(struct conn *c)
{
    int fd = c->z.fd;
    watchers[fd] = NULL;
#ifdef ZOO_FIXED
    for (int i = batch_i + 1; i < batch_n; i++)
        if (events[i].data.fd == fd)
            events[i].data.fd = -1;
#endif
    close(fd);
    zh_conn_release(&c->z);
    free(c);
}

static void watch(struct conn *c, uint32_t interest)
{
    struct epoll_event ev = {.events = interest | EPOLLRDHUP, .data.fd = c->z.fd};
    if (c->interest == interest)
        return;
    c->interest = interest;
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->z.fd, &ev) < 0)
        conn_close(c);
}

static void on_conn(struct conn *c, uint32_t ev)
{
    enum zh_next next = zh_handle(&c->z, ev);
    if (next == ZH_CLOSE)
        conn_close(c);
    else
        watch(c, next == ZH_WRITE ? EPOLLOUT : EPOLLIN);
}

/* The peer already sent its FIN or a reset (TCP state CLOSE_WAIT or CLOSE) and nothing is
 * left to answer: the connection only holds a slot. */
static int peer_gone(const struct conn *c)
{
    return zh_peer_gone(c->z.fd) && c->z.inlen == 0 && !zh_pending(&c->z);
}

/* Before each accept: drop every connection whose peer is gone, to reclaim its fd. */
static void reclaim(void)
{
    for (int fd = 0; fd <= max_fd; fd++)
        if (watchers[fd] && peer_gone(watchers[fd]))
            conn_close(watchers[fd]);
}

static void on_listener(struct zh_listener *l)
{
    struct conn *c;
    int fd;

    reclaim();
    if ((fd = zh_accept_next(l)) < 0 || !(c = zh_conn_new(fd, sizeof *c, MAX_FDS)))
        return;
    c->interest = EPOLLIN;
    if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, (uint64_t)fd) < 0) {
        close(fd);
        zh_conn_release(&c->z);
        free(c);
        return;
    }
    watchers[fd] = c;
    if (fd > max_fd)
        max_fd = fd;
}

/* New clients first: the listener's event, if the batch has one, moves to its head (the
 * others keep their order), so accepting never waits behind the connections' work. */
static void accept_first(int lfd)
{
    for (int i = 1; i < batch_n; i++) {
        if (events[i].data.fd == lfd) {
            struct epoll_event l = events[i];
            memmove(&events[1], &events[0], (size_t)i * sizeof events[0]);
            events[0] = l;
            return;
        }
    }
}

int main(int argc, char **argv)
{
    struct zh_listener l;
    int lfd = zh_start(argc, argv);

    epfd = zh_epoll(&l, lfd, (uint32_t)lfd);
    zh_ready();
    while (!stop_flag) {
        batch_n = zh_wait(epfd, events, MAXEVENTS, zh_listener_timeout(&l, 300));
        if (batch_n < 0)
            break;
        accept_first(lfd);
        for (batch_i = 0; batch_i < batch_n; batch_i++) {
            int fd = events[batch_i].data.fd;
            struct conn *w;
            if (fd == lfd) {
                on_listener(&l);
                continue;
            }
            if (fd < 0)
                continue; /* invalidated: its fd was closed earlier in this batch */
            w = watchers[fd];
            if (w == NULL) {
                /* a descriptor we stopped watching: disarm it */
                epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &events[batch_i]);
                continue;
            }
            on_conn(w, events[batch_i].events);
        }
        batch_n = 0;
    }
    return 0;
}
