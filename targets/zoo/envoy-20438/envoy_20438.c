/*
 * envoy-20438: a write-ready event dispatched after the read callback already closed the
 * connection.
 *
 *   usage: envoy_20438 HOST PORT      (prints READY on stdout once listening)
 *
 * One thread, one edge-triggered epoll registration per connection for EPOLLIN | EPOLLOUT |
 * EPOLLRDHUP, the way a proxy's connection object watches its socket.  An event is dispatched
 * to the connection's read callback first and then to its write callback.  Either callback may
 * finish the connection (answers flushed, FIN sent, fd closed); the object itself is deleted
 * only after the whole batch, so a callback never touches freed memory.
 *
 * The bug (ZOO_FIXED undefined): the dispatcher does not look at the connection's state
 * between the two callbacks.  An edge-triggered event on a writable socket always carries
 * EPOLLOUT, so when the read callback closes the connection (the peer's FIN, "Connection:
 * close", a reset), the write callback runs anyway and ends the stream on an fd that is
 * already closed: shutdown() and read() on a closed number (EBADF), or, once the number is
 * reused, on somebody else's connection.
 *
 * The fix (ZOO_FIXED): the dispatcher returns once a callback closed the connection.
 */
#include "../common/zoo_http.h"


struct conn {
    struct zh_conn z;
    int closed;
    int end_stream; /* our side is done: FIN once the answers are out */
    int read_more;  /* reading stopped on back-pressure: with edge triggering, no new EPOLLIN */
    struct conn *next_deferred;
};

static int epfd = -1;
static struct conn *deferred; /* closed, deleted after the batch */

static void conn_close(struct conn *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->z.fd, NULL);
    close(c->z.fd);
    if (!c->closed) {
        c->closed = 1;
        c->next_deferred = deferred;
        deferred = c;
    }
}

/* Our answers are out and our side is done: FIN, drain, close. */
static void conn_end(struct conn *c)
{
    zh_finish(&c->z);
    conn_close(c);
}

static void on_read(struct conn *c, uint32_t events)
{
    int r;
    if (events & (EPOLLERR | EPOLLHUP)) {
        conn_close(c);
        return;
    }
    if (events & EPOLLRDHUP)
        c->z.peer_eof = 1;
    if (zh_read_serve(&c->z) < 0) {
        conn_close(c);
        return;
    }
    if (c->z.close_after_flush || c->z.peer_eof)
        c->end_stream = 1;
    r = zh_flush(&c->z);
    if (r < 0)
        conn_close(c);
    else if (r == 0)
        c->read_more = 1;
    else if (c->end_stream)
        conn_end(c);
}

static void on_write(struct conn *c)
{
    int r = zh_flush(&c->z);
    if (r < 0) {
        conn_close(c);
        return;
    }
    if (r == 0)
        return; /* the next EPOLLOUT edge continues */
    if (c->end_stream) {
        conn_end(c);
        return;
    }
    if (c->read_more) {
        c->read_more = 0;
        on_read(c, 0);
    }
}

static void dispatch(void *p, uint32_t events)
{
    struct conn *c = p;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
        on_read(c, events);
#ifdef ZOO_FIXED
    if (c->closed)
        return;
#endif
    if (events & EPOLLOUT)
        on_write(c);
}

static void accept_all(struct zh_listener *l)
{
    struct conn *c;
    ZH_EACH_ACCEPTED(l, fd, c, INT_MAX) {
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                     (uintptr_t)c) < 0) {
            close(fd);
            free(c);
        }
    }
}

static void delete_deferred(void)
{
    while (deferred) {
        struct conn *c = deferred;
        deferred = c->next_deferred;
        zh_conn_release(&c->z);
        free(c);
    }
}

int main(int argc, char **argv)
{
    struct zh_listener l;
    int lfd = zh_start(argc, argv);

    epfd = zh_epoll(&l, lfd, 0);
    zh_ready();
    zh_run(&(struct zh_loop){.epfd = epfd,
                             .l = &l,
                             .accept = accept_all,
                             .dispatch = dispatch,
                             .after = delete_deferred});
    close(epfd);
    close(lfd);
    return 0;
}
