/* One connection's operations, as harness/client/conn.py's Conn does them: the same counts,
 * the same evidence, the same deadlines (every wait bounded by the run's deadline and the
 * endpoint's io_timeout_s).  An operation is resumable: it returns PENDING until it is done,
 * keeping its progress in the conn (ost); the loop calls it again on an epoll event or when
 * the conn's timer fires. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RECV_SIZE (64 * 1024)
#define EOF_LIMIT (1 << 20)
#define SPIN_BELOW_US 200
#define UNREAD_RST_WAIT_US 1000

/* engine.c */
extern const struct ac_config *CFG;
extern struct ac_result *OUT;
int watch(struct conn *c);
void arm(struct conn *c, double at);
void count_errno(int64_t *table, int err);
void event(struct conn *c, int kind, int context, const uint8_t *data, size_t len);

static uint8_t scratch[RECV_SIZE];

/* ------------------------------------------------------------------ bookkeeping */

static void done_op(struct conn *c) { c->ost = 0, c->waiting = 0, c->gen++; }

/* The op must wait for the socket or a time: from the first wait, it gives up at ``until``
 * (the next op deadline unless given); DEADLINE if the run's deadline has passed. */
static int wait_until(struct conn *c, double until)
{
    if (!c->waiting) {
        double now = now_s();
        if (until <= 0) {
            if (now >= CFG->deadline) return DEADLINE;
            until = now + CFG->io_timeout < CFG->deadline ? now + CFG->io_timeout : CFG->deadline;
        }
        c->until = until;
        c->waiting = 1;
        arm(c, until);
    }
    return PENDING;
}

static int timed_out(int what)
{
    if (now_s() >= CFG->deadline - 0.002) return DEADLINE;
    count(what, 1);
    return 0;
}

static int expired(struct conn *c) { return c->waiting && now_s() >= c->until; }

void disturb(struct conn *c) { c->disturbed = 1; }

static int unanswered(struct conn *c)
{
    int n = 0;
    for (int k = 0; k < c->await_n; k++)
        n += c->await[(c->await_head + k) % AWAIT_MAX] != NONE;
    return n;
}

/* After the peer's FIN: whether its close() left our bytes unread (conn.unread_when_closed:
 * a RST after the FIN, SO_ERROR = EPIPE), awaited for up to UNREAD_RST_WAIT_US. */
static int unread_when_closed(int fd)
{
    double until = now_s() + UNREAD_RST_WAIT_US / 1e6;
    for (;;) {
        int err = 0;
        socklen_t len = sizeof err;
        if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return 0;
        if (err == EPIPE) return 1;
        if (now_s() >= until) return 0;
        struct timespec pause = {0, UNREAD_RST_WAIT_US * 100};
        nanosleep(&pause, NULL);
    }
}

static void peer_gone(struct conn *c, int reset)
{
    c->gone = 1;
    count(reset ? C_RESET_BY_PEER : C_CLOSED_BY_PEER, 1);
    int n = unanswered(c);
    count(C_CLOSED_WITHOUT_ANSWER, n);
    if (n && !c->disturbed && !c->closed_first && (reset || !unread_when_closed(c->fd))) {
        count(C_DROPPED_REQUESTS, n);
        c->dropped_reset = reset;
        c->dropped = n;
        event(c, E_DROPPED, 0, NULL, 0);
    }
    c->await_n = 0;
}

static void push_await(struct conn *c, int32_t req)
{
    if (c->await_n < AWAIT_MAX) c->await[(c->await_head + c->await_n++) % AWAIT_MAX] = req;
}

static int32_t pop_await(struct conn *c)
{
    if (!c->await_n) return NONE;
    int32_t req = c->await[c->await_head];
    c->await_head = (c->await_head + 1) % AWAIT_MAX;
    c->await_n--;
    return req;
}

static void unshift_await(struct conn *c, int32_t req)
{
    c->await_head = (c->await_head + AWAIT_MAX - 1) % AWAIT_MAX;
    c->await[c->await_head] = req;
    c->await_n++;
}

static int append(struct conn *c, const uint8_t *data, size_t n)
{
    if (c->len + n > c->cap) {
        size_t cap = c->cap ? c->cap : 1024;
        while (c->len + n > cap) cap *= 2;
        uint8_t *grown = realloc(c->buf, cap);
        if (!grown) return -1;
        c->buf = grown, c->cap = cap;
    }
    memcpy(c->buf + c->len, data, n);
    c->len += n;
    return 0;
}

static void unsolicited(struct conn *c, int when, const uint8_t *data, size_t n)
{
    int context = when;
    if (!c->sent_any) context = U_BEFORE_ANY;
    else if (c->last_answered != NONE && !c->await_n) context = U_AFTER_ANSWER;
    event(c, E_UNSOLICITED, context, data, n);
}

/* One recv into the scratch buffer: > 0 bytes, 0 EOF, -1 would block, -2 reset. */
static ssize_t recv_once(struct conn *c, size_t max)
{
    ssize_t n = recv(c->fd, scratch, max < RECV_SIZE ? max : RECV_SIZE, 0);
    if (n >= 0) return n;
    if (errno == EAGAIN || errno == EINTR) {
        c->readable = 0;
        return -1;
    }
    return -2; /* ECONNRESET, or any other error: the connection is over */
}

/* recv_once where the next step is a wait anyway: with edge-triggered epoll, no read event
 * since the last EAGAIN means nothing arrived since, so the syscall is skipped (an arrival
 * queues its event, which resumes the wait).  Checks that must see what the kernel holds
 * right now (check_quiet, the peek before a request) make the call every time. */
static ssize_t recv_wait(struct conn *c, size_t max)
{
    return c->readable ? recv_once(c, max) : -1;
}

/* ------------------------------------------------------------------ requests */

int32_t new_tag(struct conn *c) { return (int32_t)c->next_req++; }

size_t request_bytes(struct conn *c, int tpl, int32_t req, uint8_t *out, size_t cap)
{
    const struct ac_tpl *t = &CFG->tpl[tpl];
    char tag[96];
    int tag_len = t->has_tag ? snprintf(tag, sizeof tag, "/ac/%s/%u/%d", CFG->run_id,
                                        c->index, req & ~UNECHOED) : 0;
    size_t n = t->pre_len + (size_t)tag_len + t->post_len;
    if (n > cap) return 0;
    memcpy(out, t->pre, t->pre_len);
    memcpy(out + t->pre_len, tag, (size_t)tag_len);
    memcpy(out + t->pre_len + tag_len, t->post, t->post_len);
    return n;
}

static void reserve_out(struct conn *c, size_t n)
{
    uint8_t *grown = realloc(c->out, n);
    if (grown) c->out = grown;
    c->out_len = c->out_off = 0;
    c->npend = 0;
}

static void add_request(struct conn *c, int tpl, int32_t req)
{
    const struct ac_tpl *t = &CFG->tpl[tpl];
    size_t most = t->pre_len + t->post_len + 96;
    uint8_t *grown = realloc(c->out, c->out_len + most);
    if (!grown) return;
    c->out = grown;
    c->out_len += request_bytes(c, tpl, req, c->out + c->out_len, most);
}

void prepare(struct conn *c, int n, int tpl)
{
    reserve_out(c, 512);
    for (int k = 0; k < n; k++) {
        int32_t req = new_tag(c) | (tpl == T_LARGE && CFG->has_large ? UNECHOED : 0);
        add_request(c, tpl == T_LARGE && !CFG->has_large ? T_KEEPALIVE : tpl, req);
        c->pend[c->npend++] = req;
    }
}

void prepare_half(struct conn *c, int tpl)
{
    reserve_out(c, 512);
    add_request(c, tpl, new_tag(c));
    c->out_len /= 2;
}

void prepare_malformed(struct conn *c, int variant, int valid_first)
{
    reserve_out(c, 512);
    if (valid_first) {
        int32_t req = new_tag(c);
        add_request(c, T_KEEPALIVE, req);
        c->pend[c->npend++] = req;
    }
    add_request(c, T_MALFORMED0 + variant, new_tag(c));
    c->pend[c->npend++] = NONE;
}

void prepare_piece(struct conn *c, const uint8_t *data, size_t len, int32_t req)
{
    reserve_out(c, len);
    memcpy(c->out, data, len);
    c->out_len = len;
    if (req != NOTHING) c->pend[c->npend++] = req;
}

/* ------------------------------------------------------------------ operations */

int op_connect(struct conn *c)
{
    if (c->ost == 0) {
        c->fd = socket(CFG->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
            OUT->fatal_errno = errno;
            return FATAL;
        }
        int one = 1;
        /* As conn.py: without TCP_NODELAY, Nagle would hold back the small later writes. */
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (now_s() >= CFG->deadline) return DEADLINE; /* closed by the loop */
        c->ost = 1;
        if (connect(c->fd, (const struct sockaddr *)&CFG->addr, CFG->addrlen) == 0) goto adopt;
        if (errno != EINPROGRESS) goto failed;
        if (watch(c) < 0) goto failed;
        return wait_until(c, 0);
    }
    /* Writable without an error: connected, no syscall needed (the socket was registered
     * while in SYN_SENT, whose poll mask is empty).  Else a second connect() tells how the
     * first one went. */
    if ((c->events & EPOLLOUT) && !(c->events & (EPOLLERR | EPOLLHUP))) goto adopt;
    if (connect(c->fd, (const struct sockaddr *)&CFG->addr, CFG->addrlen) == 0 || errno == EISCONN)
        goto adopt;
    if (errno == EALREADY || errno == EINPROGRESS) {
        if (!expired(c)) return PENDING;
        close(c->fd), c->fd = -1;
        done_op(c);
        return timed_out(C_TIMEOUT_CONNECT);
    }
failed:
    count_errno(OUT->connect_errno, errno);
    close(c->fd), c->fd = -1;
    done_op(c);
    return 0;
adopt:
    if (c->ost == 1 && !c->waiting && watch(c) < 0) goto failed;
    done_op(c);
    c->quiet_since = now_s();
    count(C_CONNECTIONS, 1);
    return 1;
}

static int peer_closed_already(struct conn *c)
{
    /* No read event since the last EAGAIN: no FIN or RST has arrived since (edge-triggered
     * epoll queues an event for each arrival).  unread_when_closed() still catches a close
     * that raced the request. */
    if (!c->readable) return 0;
    ssize_t n = recv(c->fd, scratch, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return 1;
    return n < 0 && errno != EAGAIN;
}

int op_send(struct conn *c)
{
    if (c->ost == 0) {
        int tagged = 0;
        for (int k = 0; k < c->npend; k++) tagged |= c->pend[k] != NONE;
        if (tagged) {
            c->idle_s = now_s() - c->quiet_since;
            if (!c->closed_first) c->closed_first = peer_closed_already(c);
        }
        c->ost = 1;
    }
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            if (expired(c)) {
                done_op(c);
                return timed_out(C_TIMEOUT_SEND);
            }
            return wait_until(c, 0);
        }
        int err = errno;
        done_op(c);
        if (err == ECONNRESET || err == EPIPE) peer_gone(c, 1);
        else count_errno(OUT->send_errno, err);
        return 0;
    }
    done_op(c);
    c->sent_any = 1;
    c->quiet_since = now_s();
    for (int k = 0; k < c->npend; k++) {
        push_await(c, c->pend[k]);
        if (c->pend[k] != NONE) count(C_REQUESTS, 1);
    }
    c->npend = 0;
    return 1;
}

/* Whether ``body`` carries exactly the tag of request ``req`` (protocols.base.carries). */
static int carries(struct conn *c, const uint8_t *body, size_t n, int32_t req)
{
    char tag[96];
    int len = snprintf(tag, sizeof tag, "/ac/%s/%u/%d", CFG->run_id, c->index, req);
    const uint8_t *p = body, *end = body + n;
    while ((p = memmem(p, (size_t)(end - p), tag, (size_t)len)) != NULL) {
        const uint8_t *after = p + len;
        if (after == end || !((*after >= '0' && *after <= '9') || (*after >= 'a' && *after <= 'z')
                              || (*after >= 'A' && *after <= 'Z')))
            return 1;
        p++;
    }
    return 0;
}

static void consume(struct conn *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

int op_read_reply(struct conn *c)
{
    if (c->ost == 0) {
        c->expected = pop_await(c);
        c->ost = 1;
    }
    for (;;) {
        struct reply r;
        int got = http_next(c->buf, c->len, c->eof, &r);
        if (got == REPLY_OK) {
            done_op(c);
            c->quiet_since = now_s();
            count(C_RESPONSES, 1);
            count_status(r.status);
            c->keep = r.keep_alive;
            c->status = r.status;
            int32_t expected = c->expected;
            if (expected != NONE) {
                c->last_answered = expected & ~UNECHOED;
                int echoes = CFG->echoes && !(expected & UNECHOED);
                if (echoes && r.status >= 200 && r.status < 300
                    && !carries(c, r.body, r.body_len, expected))
                    event(c, E_FOREIGN, 0, r.body, r.body_len);
            }
            if (r.owned) free((void *)r.body);
            consume(c, r.consumed);
            return 1;
        }
        if (got == REPLY_GARBAGE) {
            done_op(c);
            count(C_GARBAGE, 1);
            if (memmem(c->buf, r.partial_len, "/ac/", 4)) /* tags: judged in Python */
                event(c, E_GARBAGE_TAGGED, 0, c->buf, r.partial_len);
            return 0;
        }
        if (c->eof) {
            done_op(c);
            if (c->expected != NONE) unshift_await(c, c->expected);
            if (c->len) count(C_TRUNCATED, 1);
            peer_gone(c, 0);
            return 0;
        }
        ssize_t n = recv_wait(c, RECV_SIZE);
        if (n > 0) {
            c->waiting = 0;
            if (append(c, scratch, (size_t)n) < 0) return FATAL;
        } else if (n == 0) {
            c->eof = 1;
        } else if (n == -2) {
            done_op(c);
            if (c->expected != NONE) unshift_await(c, c->expected);
            if (c->len) count(C_TRUNCATED, 1);
            peer_gone(c, 1);
            return 0;
        } else {
            if (expired(c)) {
                done_op(c);
                return timed_out(C_TIMEOUT_RESPONSE);
            }
            return wait_until(c, 0);
        }
    }
}

int op_read_some(struct conn *c, size_t max)
{
    if (c->len) { /* what the parser had buffered: all of it is taken */
        c->len = 0;
        return 1;
    }
    ssize_t n = recv_wait(c, max);
    if (n > 0) {
        done_op(c);
        return 1;
    }
    if (n == -1) {
        if (expired(c)) {
            done_op(c);
            return timed_out(C_TIMEOUT_RESPONSE);
        }
        return wait_until(c, 0);
    }
    done_op(c);
    if (n == 0) c->eof = 1;
    peer_gone(c, n == -2);
    return 0;
}

int op_check_quiet(struct conn *c, double wait_s)
{
    if (c->ost == 0 && (c->len || c->eof)) {
        int alive = !c->eof;
        if (c->len) {
            unsolicited(c, U_NOT_DUE, c->buf, c->len);
            c->len = 0;
        }
        return alive;
    }
    c->ost = 1;
    ssize_t n = recv_once(c, RECV_SIZE);
    if (n == -1) {
        if (wait_s <= 0 || expired(c)) {
            done_op(c);
            return 1;
        }
        double until = now_s() + wait_s;
        return wait_until(c, c->waiting ? c->until : (until < CFG->deadline ? until : CFG->deadline));
    }
    done_op(c);
    if (n == -2) {
        peer_gone(c, 1);
        return 0;
    }
    if (n == 0) {
        c->eof = 1;
        peer_gone(c, 0);
        return 0;
    }
    unsolicited(c, U_NOT_DUE, scratch, (size_t)n);
    return 1;
}

int op_read_to_eof(struct conn *c)
{
    /* The buffered bytes and everything after them are the unasked-for data. */
    while (!c->eof && c->len < EOF_LIMIT) {
        ssize_t n = recv_wait(c, RECV_SIZE);
        if (n > 0) {
            c->waiting = 0;
            if (append(c, scratch, (size_t)n) < 0) return FATAL;
            continue;
        }
        if (n == 0) {
            c->eof = 1;
            break;
        }
        if (n == -2) {
            c->reset_seen = 1;
            break;
        }
        if (expired(c)) {
            done_op(c);
            if (c->len) unsolicited(c, U_WAITING_CLOSE, c->buf, c->len);
            c->len = 0;
            return timed_out(C_TIMEOUT_CLOSE);
        }
        int r = wait_until(c, 0);
        if (r == DEADLINE && c->len) {
            c->len = 0; /* as conn.py: DeadlineReached leaves what was read unreported */
        }
        return r;
    }
    done_op(c);
    if (c->len) unsolicited(c, U_WAITING_CLOSE, c->buf, c->len);
    c->len = 0;
    int reset = c->reset_seen;
    c->reset_seen = 0;
    peer_gone(c, reset);
    return 1;
}

int op_pause(struct conn *c, double seconds)
{
    if (c->ost == 0) {
        double now = now_s();
        c->ost = 1;
        c->wake = now + seconds;
        c->cut = c->wake >= CFG->deadline;
        if (c->cut) c->wake = CFG->deadline;
        c->waiting = 1, c->until = c->wake;
        arm(c, c->wake);
    }
    if (now_s() < c->wake) return PENDING;
    done_op(c);
    return c->cut ? DEADLINE : 1;
}

int op_wait_us(struct conn *c, int us)
{
    if (c->ost == 0) {
        double left = (CFG->deadline - now_s()) * 1e6;
        int left_us = left > 0 ? (int)left : 0;
        if (us > left_us) us = left_us;
        if (us < SPIN_BELOW_US) {
            /* As behaviours.spin_us: a sleep would round a short race window up to the
             * timer slack, so short waits spin, holding the other connections back. */
            double end = now_s() + us / 1e6;
            while (us > 0 && now_s() < end) {
            }
            return 1;
        }
    }
    return op_pause(c, us / 1e6);
}

int shutdown_write(struct conn *c)
{
    if (shutdown(c->fd, SHUT_WR) < 0) {
        if (errno == ENOTCONN || errno == ECONNRESET || errno == EPIPE) peer_gone(c, 1);
        else count_errno(OUT->shutdown_errno, errno);
        return 0;
    }
    count(C_FIN_SENT, 1);
    return 1;
}

void rst(struct conn *c)
{
    if (c->fd < 0) return;
    /* SO_LINGER {1, 0}: close() drops both queues and sends a RST (conn.set_rst_on_close). */
    struct linger lin = {1, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lin, sizeof lin);
    close(c->fd);
    c->fd = -1;
    c->await_n = 0;
    count(C_RST_SENT, 1);
}

void plain_close(struct conn *c)
{
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}
