/*
 * redis-333: within one epoll_wait batch, a handler closes an fd whose number accept reuses
 * before a later event of the same batch is dispatched to it.
 *
 *   usage: redis_333 HOST PORT      (prints READY on stdout once listening)
 *
 * One thread, an ae-style loop: epoll data is the fd number; a batch is first copied into a
 * list of fired (fd, mask) pairs, then each is dispatched through the table of file events
 * indexed by fd.  The listener's handler first frees the slots of connections whose peer is
 * gone (FIN or reset received, nothing left to answer), then accepts until EAGAIN.
 *
 * The bug (ZOO_FIXED undefined): the hang-up that made such a connection reapable is often
 * an event of the same batch, still ahead in the fired list.  The number now belongs to a
 * connection accepted just after, and the stale event runs the new connection's handler: the
 * old client's FIN ends the new one.
 *
 * The fix (ZOO_FIXED): a fired event carries the generation of the file event it was
 * fetched for, and the loop drops it when the number's file event has changed since.
 */
#include "../common/zoo_http.h"


#define MAXEVENTS 256
#define MAX_FDS 65536

struct conn {
    struct zh_conn z;
    uint32_t interest;
};

struct file_event {
    struct conn *c;
    uint64_t gen; /* changes whenever the number gets a new connection */
};

struct fired {
    int fd;
    uint32_t mask;
    uint64_t gen;
};

static int epfd = -1, lfd = -1;
static struct file_event fevents[MAX_FDS];
static uint64_t gens;
static int max_fd;

static void conn_close(struct conn *c)
{
    int fd = c->z.fd;
    fevents[fd].c = NULL;
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    zh_conn_release(&c->z);
    free(c);
}

/* The peer already sent its FIN or a reset (TCP state CLOSE_WAIT or CLOSE) and nothing is
 * left to answer: the connection only holds a slot. */
static int peer_gone(const struct conn *c)
{
    return zh_peer_gone(c->z.fd) && c->z.inlen == 0 && !zh_pending(&c->z);
}

/* Before accepting: free the slots of connections whose peer is gone. */
static void reap(void)
{
    for (int fd = 0; fd <= max_fd; fd++)
        if (fevents[fd].c && peer_gone(fevents[fd].c))
            conn_close(fevents[fd].c);
}

static void on_conn(struct conn *c, uint32_t mask)
{
    enum zh_next next = zh_handle(&c->z, mask);
    uint32_t interest = next == ZH_WRITE ? EPOLLOUT : EPOLLIN;
    struct epoll_event ev = {.events = interest | EPOLLRDHUP, .data.fd = c->z.fd};

    if (next == ZH_CLOSE) {
        conn_close(c);
        return;
    }
    if (interest != c->interest) {
        c->interest = interest;
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->z.fd, &ev) < 0) {
            conn_close(c);
            return;
        }
    }
}

static void on_listener(struct zh_listener *l)
{
    reap();
    struct conn *c;
    ZH_EACH_ACCEPTED(l, fd, c, MAX_FDS) {
        c->interest = EPOLLIN;
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, (uint64_t)fd) < 0) {
            close(fd);
            free(c);
            continue;
        }
        fevents[fd].c = c;
        fevents[fd].gen = ++gens;
        if (fd > max_fd)
            max_fd = fd;
    }
}

int main(int argc, char **argv)
{
    static struct epoll_event events[MAXEVENTS];
    static struct fired fired[MAXEVENTS];
    struct zh_listener l;

    lfd = zh_start(argc, argv);
    epfd = zh_epoll(&l, lfd, (uint32_t)lfd);
    zh_ready();
    while (!stop_flag) {
        int n = zh_wait(epfd, events, MAXEVENTS, zh_listener_timeout(&l, 300));
        if (n < 0)
            break;
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            fired[i] = (struct fired){fd, events[i].events, fd == lfd ? 0 : fevents[fd].gen};
        }
        for (int i = 0; i < n; i++) {
            struct conn *c;
            if (fired[i].fd == lfd) {
                on_listener(&l);
                continue;
            }
            c = fevents[fired[i].fd].c;
            if (c == NULL)
                continue; /* closed earlier in this batch */
#ifdef ZOO_FIXED
            if (fevents[fired[i].fd].gen != fired[i].gen)
                continue; /* fetched for the number's previous connection */
#endif
            on_conn(c, fired[i].mask);
        }
    }
    return 0;
}
