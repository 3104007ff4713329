/*
 * libuv-1148: a closed fd whose open file description lives on through a dup: epoll keeps
 * reporting it, and the loop spins with no other symptom.
 *
 *   usage: libuv_1148 HOST PORT      (prints READY on stdout once listening)
 *
 * One thread, level-triggered registrations whose data is (serial << 32 | fd): an event whose
 * serial does not match the connection now on that number is for a connection that is gone,
 * and the loop skips it.  One accepted connection in SAMPLE is also handed, as a dup, to a
 * sampling access-log keeper that reads the peer's address from it later and closes its dups
 * in one sweep every KEEP_MS.
 *
 * The bug (ZOO_FIXED undefined): a connection is closed with close() alone.  epoll(7)
 * registers the open file description, not the number, and the keeper's dup keeps that
 * description open: the registration survives, the peer's FIN keeps it readable, and every
 * epoll_wait returns at once with an event the loop skips, until the keeper's sweep: a busy
 * loop (kept short here so that a trace of it fits its file).
 *
 * The fix (ZOO_FIXED): EPOLL_CTL_DEL before close(), as libuv's uv__io_stop does.
 */
#include "../common/zoo_http.h"

#include <fcntl.h>

#define MAXEVENTS 256
#define MAX_FDS 65536
#define KEEP_MS 100
#define SAMPLE 8

struct conn {
    struct zh_conn z;
    uint32_t serial;
    uint32_t interest;
};

static int epfd = -1;
static struct conn *conns[MAX_FDS];
static uint32_t serials;

/* The access-log keeper: dups of connections, swept every KEEP_MS. */
static int kept[4096];
static size_t nkept;
static int64_t next_sweep;

static void keep(int fd)
{
    int d;
    if (nkept == sizeof kept / sizeof kept[0])
        return;
    d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (d >= 0)
        kept[nkept++] = d;
}

static void sweep(void)
{
    for (size_t i = 0; i < nkept; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        getpeername(kept[i], (struct sockaddr *)&ss, &len); /* the access log's peer address */
        close(kept[i]);
    }
    nkept = 0;
    next_sweep = zh_now_ms() + KEEP_MS;
}

static uint64_t data_of(const struct conn *c)
{
    return (uint64_t)c->serial << 32 | (uint32_t)c->z.fd;
}

static void conn_close(struct conn *c)
{
    int fd = c->z.fd;
    conns[fd] = NULL;
#ifdef ZOO_FIXED
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
#endif
    close(fd);
    zh_conn_release(&c->z);
    free(c);
}

static void on_conn(struct conn *c, uint32_t events)
{
    enum zh_next next = zh_handle(&c->z, events);
    uint32_t interest = next == ZH_WRITE ? EPOLLOUT : EPOLLIN;
    struct epoll_event ev = {.events = interest | EPOLLRDHUP, .data.u64 = data_of(c)};

    if (next == ZH_CLOSE) {
        conn_close(c);
        return;
    }
    if (interest != c->interest) {
        c->interest = interest;
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->z.fd, &ev) < 0)
            conn_close(c);
    }
}

static void on_listener(struct zh_listener *l)
{
    struct conn *c;
    ZH_EACH_ACCEPTED(l, fd, c, MAX_FDS) {
        c->serial = ++serials;
        c->interest = EPOLLIN;
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, data_of(c)) < 0) {
            close(fd);
            free(c);
            continue;
        }
        conns[fd] = c;
        if (c->serial % SAMPLE == 1)
            keep(fd);
    }
}

int main(int argc, char **argv)
{
    struct epoll_event events[MAXEVENTS];
    struct zh_listener l;
    int lfd = zh_start(argc, argv);

    epfd = zh_epoll(&l, lfd, UINT64_MAX);
    next_sweep = zh_now_ms() + KEEP_MS;
    zh_ready();
    while (!stop_flag) {
        int64_t left = next_sweep - zh_now_ms();
        int n = zh_wait(epfd, events, MAXEVENTS,
                        zh_listener_timeout(&l, left < 0 ? 0 : left > 300 ? 300 : (int)left));
        if (n < 0)
            break;
        for (int i = 0; i < n; i++) {
            uint64_t d = events[i].data.u64;
            struct conn *c;
            if (d == UINT64_MAX) {
                on_listener(&l);
                continue;
            }
            c = conns[(uint32_t)d];
            if (c == NULL || c->serial != d >> 32)
                continue; /* a connection that is gone: nothing to do */
            on_conn(c, events[i].events);
        }
        if (zh_now_ms() >= next_sweep)
            sweep();
    }
    sweep();
    return 0;
}
