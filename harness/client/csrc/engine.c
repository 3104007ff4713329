/* The loop: one worker's share of the plan (connections worker, worker + processes, ...),
 * connection i started no earlier than start + i / rate, at most ``cap`` open at once, nothing
 * new after ``stop`` or once the stop flag (counters[0]) is up; then what is still open gets
 * until the deadline (+ 50 ms, as harness/client/engine.py's _work) before it is cut.  One
 * epoll instance, edge-triggered: an event or a due timer resumes the connection's behaviour,
 * whose operations retry their syscall and wait again on EAGAIN. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define DRAIN_S 0.05
#define FLAG_POLL_S 0.05 /* longest wait between two looks at the stop flag */
#define BATCH 256

const struct ac_config *CFG;
struct ac_result *OUT;

struct timer {
    double at;
    uint32_t slot, gen;
};

static struct {
    int epfd;
    struct conn *conns;
    uint8_t *active;
    uint32_t *free_slots;
    uint32_t free_n;
    struct timer *heap;
    size_t heap_n, heap_cap;
    int64_t errors;
    int fatal;
} L;

int ac_abi(void) { return AC_ABI; }

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void count(int what, int64_t n)
{
    OUT->counts[what] += n;
    if (what == C_GARBAGE || (what >= C_TIMEOUT_CONNECT && what <= C_TIMEOUT_CLOSE)) L.errors += n;
}

void count_status(int status)
{
    if (status >= 0 && status < AC_STATUSES) OUT->status[status]++;
}

void count_errno(int64_t *table, int err)
{
    table[err > 0 && err < AC_ERRNOS ? err : 0]++;
    L.errors++;
}

void event(struct conn *c, int kind, int context, const uint8_t *data, size_t len)
{
    if (OUT->events >= AC_EVENTS) {
        OUT->counts[C_EVENTS_OVER]++;
        return;
    }
    struct ac_event *e = &OUT->event[OUT->events++];
    memset(e, 0, offsetof(struct ac_event, data));
    e->kind = kind, e->context = context, e->conn = (int32_t)c->index;
    e->status = c->status, e->idle_s = c->idle_s;
    e->last = c->last_answered;
    if (kind == E_DROPPED) {
        e->count = c->dropped, e->reset = c->dropped_reset;
        for (int k = 0; k < c->await_n; k++) {
            int32_t req = c->await[(c->await_head + k) % AWAIT_MAX];
            if (req != NONE) {
                e->req = req & ~UNECHOED;
                break;
            }
        }
    } else {
        e->req = c->expected == NONE ? NONE : c->expected & ~UNECHOED;
    }
    e->total_len = (uint32_t)len;
    e->shown_len = (uint32_t)(len < AC_EVENT_BYTES ? len : AC_EVENT_BYTES);
    if (data) memcpy(e->data, data, e->shown_len);
}

int watch(struct conn *c)
{
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET};
    ev.data.u32 = (uint32_t)c->slot;
    return epoll_ctl(L.epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

/* ------------------------------------------------------------------ timers: a binary heap */

void arm(struct conn *c, double at)
{
    if (L.heap_n == L.heap_cap) {
        size_t cap = L.heap_cap ? L.heap_cap * 2 : 1024;
        struct timer *grown = realloc(L.heap, cap * sizeof *grown);
        if (!grown) return; /* the next op retry still sees its time run out */
        L.heap = grown, L.heap_cap = cap;
    }
    size_t k = L.heap_n++;
    struct timer t = {at, (uint32_t)c->slot, c->gen};
    while (k && L.heap[(k - 1) / 2].at > at) {
        L.heap[k] = L.heap[(k - 1) / 2];
        k = (k - 1) / 2;
    }
    L.heap[k] = t;
}

static struct timer pop_timer(void)
{
    struct timer top = L.heap[0], last = L.heap[--L.heap_n];
    size_t k = 0;
    for (;;) {
        size_t child = 2 * k + 1;
        if (child >= L.heap_n) break;
        if (child + 1 < L.heap_n && L.heap[child + 1].at < L.heap[child].at) child++;
        if (L.heap[child].at >= last.at) break;
        L.heap[k] = L.heap[child];
        k = child;
    }
    if (L.heap_n) L.heap[k] = last;
    return top;
}

/* ------------------------------------------------------------------ connections */

static void finish(struct conn *c, int r)
{
    if (r == DEADLINE) count(C_CUT_BY_DEADLINE, 1);
    if (r == FATAL) L.fatal = 1;
    plain_close(c);
    free(c->buf), free(c->out);
    c->buf = c->out = NULL;
    L.active[c->slot] = 0;
    L.free_slots[L.free_n++] = (uint32_t)c->slot;
    OUT->counts[C_DONE]++;
}

static void step(struct conn *c)
{
    int r = behave(c);
    if (r != PENDING) finish(c, r);
}

static void begin(uint32_t index)
{
    uint32_t slot = L.free_slots[--L.free_n];
    struct conn *c = &L.conns[slot];
    uint32_t gen = c->gen + 1;
    memset(c, 0, sizeof *c);
    c->gen = gen, c->slot = (int)slot, c->fd = -1, c->index = index;
    c->act = &CFG->actions[index];
    c->last_answered = NONE, c->expected = NONE;
    L.active[slot] = 1;
    OUT->counts[C_STARTED]++;
    step(c);
}

static void publish(void)
{
    volatile int64_t *live = CFG->counters + 1 + 4 * CFG->worker;
    live[0] = OUT->counts[C_STARTED];
    live[1] = OUT->counts[C_DONE];
    live[2] = OUT->counts[C_CONNECTIONS];
    live[3] = L.errors;
}

int ac_run(const struct ac_config *cfg, struct ac_result *out)
{
    memset(out, 0, sizeof *out);
    memset(&L, 0, sizeof L);
    CFG = cfg, OUT = out;
    uint32_t cap = cfg->cap ? cfg->cap : 1;
    L.epfd = epoll_create1(EPOLL_CLOEXEC);
    L.conns = calloc(cap, sizeof *L.conns);
    L.active = calloc(cap, 1);
    L.free_slots = calloc(cap, sizeof *L.free_slots);
    if (L.epfd < 0 || !L.conns || !L.active || !L.free_slots) {
        out->fatal_errno = L.epfd < 0 ? errno : ENOMEM;
        goto out;
    }
    for (uint32_t s = 0; s < cap; s++) L.free_slots[L.free_n++] = cap - 1 - s;
    uint32_t i = cfg->worker;
    int64_t mine = cfg->planned > cfg->worker
                       ? (cfg->planned - cfg->worker + cfg->processes - 1) / cfg->processes : 0;
    int starting = 1, noted_wait = 0;
    double drain_until = 0;
    struct epoll_event evs[BATCH];
    for (;;) {
        double now = now_s(), next = now + FLAG_POLL_S;
        while (starting) {
            double at = cfg->rate > 0 ? cfg->start + i / cfg->rate : cfg->start;
            if (i >= cfg->planned || L.fatal || at >= cfg->stop || cfg->counters[0]) {
                starting = 0;
                break;
            }
            if (at > now) {
                if (at < next) next = at;
                break;
            }
            if (!L.free_n) {
                if (!noted_wait) count(C_WAITED_FOR_SLOT, 1);
                noted_wait = 1;
                break;
            }
            noted_wait = 0;
            begin(i);
            i += cfg->processes;
            now = now_s();
            if (now >= cfg->stop) starting = 0;
        }
        publish();
        if (!starting) {
            if (L.free_n == cap || L.fatal) break;
            if (drain_until == 0) drain_until = cfg->deadline + DRAIN_S;
            if (now >= drain_until) break;
            if (drain_until < next) next = drain_until;
        }
        if (L.heap_n && L.heap[0].at < next) next = L.heap[0].at;
        double wait = next - now_s();
        struct timespec ts = {0, 0};
        if (wait > 0) {
            ts.tv_sec = (time_t)wait;
            ts.tv_nsec = (long)((wait - (double)ts.tv_sec) * 1e9);
        }
        int n = epoll_pwait2(L.epfd, evs, BATCH, &ts, NULL);
        for (int k = 0; k < n; k++) {
            uint32_t slot = evs[k].data.u32;
            if (!L.active[slot]) continue;
            L.conns[slot].events = evs[k].events;
            if (evs[k].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                L.conns[slot].readable = 1;
            step(&L.conns[slot]);
        }
        now = now_s();
        while (L.heap_n && L.heap[0].at <= now) {
            struct timer t = pop_timer();
            struct conn *c = &L.conns[t.slot];
            if (L.active[t.slot] && c->gen == t.gen) {
                c->events = 0;
                step(c);
            }
        }
    }
    /* Whatever is still open at the end was cut by the deadline (or by a fatal error). */
    for (uint32_t s = 0; s < cap; s++)
        if (L.active[s]) finish(&L.conns[s], DEADLINE);
    out->counts[C_NOT_STARTED] = mine - out->counts[C_STARTED];
    publish();
out:
    if (L.epfd >= 0) close(L.epfd);
    free(L.conns), free(L.active), free(L.free_slots), free(L.heap);
    return out->fatal_errno ? -1 : 0;
}
