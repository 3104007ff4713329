/*
 * netty-42577: a RST on a half-closed connection leaves a stale channel, and the loop spins
 * (Netty CVE-2026-42577, GHSA-rwm7-x88c-3g2p; fixed by netty/netty#16689).
 *
 *   usage: netty_42577 HOST PORT      (prints READY on stdout once listening)
 *
 * One thread, level-triggered, half-closure allowed: when the peer's FIN arrives the server
 * answers what it received and keeps the connection open with its input shut; the channel is
 * closed later, by a sweep every SWEEP_MS that closes connections half-closed since the sweep
 * before (the application's own close, which a half-closure-aware handler decides when it
 * likes).  A channel asks epoll only for what it still wants: EPOLLIN|EPOLLRDHUP while its
 * input is open, EPOLLOUT while an answer is queued; the loop hands an event to a channel only
 * if it asked for something.
 *
 * The bug (ZOO_FIXED undefined): once the input is shut and every answer written, the channel
 * wants nothing, and its registration is modified to an interest mask of 0.  epoll_ctl(2):
 * EPOLLERR and EPOLLHUP are reported whatever the mask says.  A RST on the half-closed
 * connection makes it report both, level-triggered: every epoll_wait returns at once with an
 * event the loop does not hand on (the channel asked for nothing), so the channel is never
 * told it broke, and the loop spins at 100% CPU until the sweep closes the connection.
 *
 * The fix (ZOO_FIXED): an interest mask of 0 removes the registration (EPOLL_CTL_DEL), as the
 * JDK's NIO does; nothing is reported for the connection until it is registered again.
 */
#include "../common/zoo_http.h"

#define MAXEVENTS 256
#define MAX_FDS 65536
#define SWEEP_MS 50

struct conn {
    struct zh_conn z;
    uint32_t interest; /* what the channel asked epoll for; 0 = nothing */
    int registered;
    int half_closed; /* input shut, every answer written: waiting for the sweep */
    int swept_once;  /* a sweep has seen it half-closed */
};

static int epfd = -1;
static struct conn *conns[MAX_FDS];

static void conn_close(struct conn *c)
{
    conns[c->z.fd] = NULL;
    close(c->z.fd);
    zh_conn_release(&c->z);
    free(c);
}

static int set_interest(struct conn *c, uint32_t interest)
{
    struct epoll_event ev = {.events = interest, .data.u64 = (uint64_t)c->z.fd};
    if (interest == c->interest && c->registered)
        return 0;
#ifdef ZOO_FIXED
    if (interest == 0) {
        c->interest = 0;
        c->registered = 0;
        return epoll_ctl(epfd, EPOLL_CTL_DEL, c->z.fd, NULL);
    }
#endif
    c->interest = interest;
    if (!c->registered) {
        c->registered = 1;
        return epoll_ctl(epfd, EPOLL_CTL_ADD, c->z.fd, &ev);
    }
    return epoll_ctl(epfd, EPOLL_CTL_MOD, c->z.fd, &ev);
}

/* The channel's handler: read and answer, then say what it wants next. */
static void on_conn(struct conn *c, uint32_t events)
{
    int r;
    uint32_t want;

    if (events & (EPOLLERR | EPOLLHUP)) {
        conn_close(c);
        return;
    }
    if (!c->z.peer_eof && zh_read_serve(&c->z) < 0) { /* reads up to the FIN, if any */
        conn_close(c);
        return;
    }
    r = zh_flush(&c->z);
    if (r < 0) {
        conn_close(c);
        return;
    }
    if (r == 1 && c->z.close_after_flush) {
        zh_finish(&c->z);
        conn_close(c);
        return;
    }
    want = r == 0 ? EPOLLOUT : 0;
    if (!c->z.peer_eof)
        want |= EPOLLIN | EPOLLRDHUP;
    c->half_closed = want == 0;
    if (set_interest(c, want) < 0)
        conn_close(c);
}

static void on_listener(struct zh_listener *l)
{
    struct conn *c;
    ZH_EACH_ACCEPTED(l, fd, c, MAX_FDS) {
        if (set_interest(c, EPOLLIN | EPOLLRDHUP) < 0) {
            close(fd);
            free(c);
            continue;
        }
        conns[fd] = c;
    }
}

/* Closes the connections that were already half-closed at the sweep before. */
static void sweep(void)
{
    for (int fd = 0; fd < MAX_FDS; fd++) {
        struct conn *c = conns[fd];
        if (c == NULL || !c->half_closed)
            continue;
        if (c->swept_once)
            conn_close(c);
        else
            c->swept_once = 1;
    }
}

int main(int argc, char **argv)
{
    struct epoll_event events[MAXEVENTS];
    struct zh_listener l;
    int lfd = zh_start(argc, argv);
    int64_t next_sweep;

    epfd = zh_epoll(&l, lfd, UINT64_MAX);
    next_sweep = zh_now_ms() + SWEEP_MS;
    zh_ready();
    while (!stop_flag) {
        int64_t left = next_sweep - zh_now_ms();
        int n = zh_wait(epfd, events, MAXEVENTS, zh_listener_timeout(&l, left < 0 ? 0 : (int)left));
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
            if (c == NULL || c->interest == 0)
                continue; /* the channel asked for nothing: nothing to handle */
            on_conn(c, events[i].events);
        }
        if (zh_now_ms() >= next_sweep) {
            sweep();
            next_sweep = zh_now_ms() + SWEEP_MS;
        }
    }
    return 0;
}
