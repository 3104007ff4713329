/* What the parts of the compiled storm engine share (not part of its ABI). */
#ifndef AC_ENGINE_H
#define AC_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "storm.h"

/* Results of a step; an op's own results are >= 0 (0: failed and counted, 1: done). */
#define PENDING (-1)
#define DEADLINE (-2) /* the run's deadline passed in the middle: cut_by_deadline */
#define FATAL (-3)    /* the harness's own trouble (socket() failed): the run stops */
#define DONE 0

enum { REPLY_MORE, REPLY_OK, REPLY_GARBAGE };

struct reply {
    int status, keep_alive, owned;
    const uint8_t *body;
    size_t body_len, consumed, partial_len;
};

int http_next(const uint8_t *buf, size_t n, int eof, struct reply *r);

#define NONE (-1)           /* an awaited request without a tag (a malformed one) */
#define NOTHING (-2)        /* a send that completes no request */
#define UNECHOED (1 << 30)  /* an awaited request whose answer need not echo its tag */
#define AWAIT_MAX 16

struct conn {
    int fd, slot, pc, ost, r;
    uint32_t index, next_req, gen;
    const struct ac_action *act;
    int gone, disturbed, closed_first, sent_any, eof, waiting, keep, status;
    int readable;    /* a read event came since the last EAGAIN */
    uint32_t events; /* what epoll said when it resumed the conn (0: a timer did) */
    int32_t last_answered, expected;
    double quiet_since, idle_s, until, wake;
    int32_t await[AWAIT_MAX];
    int await_head, await_n;
    int32_t pend[AWAIT_MAX];
    int npend;
    uint8_t *buf, *out;
    size_t len, cap, out_len, out_off;
    int i, pieces, answered, broke, reset_seen, dropped, dropped_reset, cut;
};

struct engine;
extern struct engine *E; /* one run per process at a time */

double now_s(void);
void count(int what, int64_t n);
void count_status(int status);
int behave(struct conn *c);

/* The connection's operations: resumable (PENDING until done), as harness/client/conn.py's
 * Conn methods of the same names. */
int op_connect(struct conn *c);
int op_send(struct conn *c);
int op_read_reply(struct conn *c);
int op_read_some(struct conn *c, size_t max);
int op_check_quiet(struct conn *c, double wait_s);
int op_read_to_eof(struct conn *c);
int op_pause(struct conn *c, double seconds);
int op_wait_us(struct conn *c, int us);
int shutdown_write(struct conn *c);
void rst(struct conn *c);
void plain_close(struct conn *c);
void disturb(struct conn *c);
/* Queue ``n`` requests of template ``tpl`` (fresh tags) as the next send. */
void prepare(struct conn *c, int n, int tpl);
/* The first half (rounded down) of one fresh request, completing nothing. */
void prepare_half(struct conn *c, int tpl);
/* Optionally a valid request, then malformed variant ``variant``, in one send. */
void prepare_malformed(struct conn *c, int variant, int valid_first);
/* ``len`` bytes of one request; the piece completes request ``req`` unless NOTHING. */
void prepare_piece(struct conn *c, const uint8_t *data, size_t len, int32_t req);
size_t request_bytes(struct conn *c, int tpl, int32_t req, uint8_t *out, size_t cap);
int32_t new_tag(struct conn *c);

/* Protothreads: a behaviour resumes at the AWAIT it left; its state lives in the conn. */
#define PT_BEGIN switch (c->pc) { case 0:
#define PT_END } return DONE
#define AWAIT(expr) do { c->pc = __LINE__; /* fallthrough */ case __LINE__: c->r = (expr); \
        if (c->r < 0) return c->r; } while (0)
/* AWAIT an operation that answers whether the connection is still usable (as Conn's methods
 * do); the behaviour ends when it is not. */
#define AWAIT_OK(expr) do { AWAIT(expr); if (!c->r) return DONE; } while (0)

#endif
