/* Every behaviour of the storm's mix, step for step as harness/client/behaviours.py performs
 * it (the same operations in the same order, the same counts). */
#include "engine.h"

#include <math.h>

static int keepalive(struct conn *c)
{
    PT_BEGIN;
    AWAIT_OK(op_connect(c));
    for (c->i = 0; c->i < c->act->a; c->i++) {
        if (c->i) AWAIT_OK(op_check_quiet(c, 0));
        prepare(c, 1, T_KEEPALIVE);
        AWAIT_OK(op_send(c));
        AWAIT_OK(op_read_reply(c));
        if (!c->keep) {
            AWAIT(op_read_to_eof(c));
            return DONE;
        }
    }
    AWAIT(op_check_quiet(c, 0));
    PT_END;
}

static int close_after_one(struct conn *c)
{
    PT_BEGIN;
    AWAIT_OK(op_connect(c));
    prepare(c, 1, T_CLOSE);
    AWAIT_OK(op_send(c));
    AWAIT_OK(op_read_reply(c));
    if (!c->keep) {
        AWAIT(op_read_to_eof(c));
    } else {
        AWAIT(op_check_quiet(c, 0));
        if (c->r) plain_close(c);
    }
    PT_END;
}

static int idle_drop(struct conn *c)
{
    PT_BEGIN;
    AWAIT_OK(op_connect(c));
    AWAIT(op_check_quiet(c, c->act->a / 1000.0));
    PT_END;
}

static int malformed(struct conn *c)
{
    PT_BEGIN;
    AWAIT_OK(op_connect(c));
    prepare_malformed(c, c->act->a, 0);
    AWAIT_OK(op_send(c));
    count(C_MALFORMED_SENT, 1);
    AWAIT(op_read_reply(c));
    if (!c->r) {
        if (c->gone) count(C_MALFORMED_CLOSED, 1);
        return DONE;
    }
    count(C_MALFORMED_ANSWERED, 1);
    if (c->keep) AWAIT(op_check_quiet(c, 0));
    else AWAIT(op_read_to_eof(c));
    PT_END;
}

static int slow_sender(struct conn *c)
{
    uint8_t request[4096];
    size_t len, step, at;
    PT_BEGIN;
    AWAIT_OK(op_connect(c));
    c->expected = new_tag(c);
    len = request_bytes(c, T_KEEPALIVE, c->expected, request, sizeof request);
    step = (len + c->act->a - 1) / c->act->a;
    c->pieces = (int)((len + step - 1) / step);
    for (c->i = 0; c->i < c->pieces; c->i++) {
        if (c->i) AWAIT(op_pause(c, c->act->b / 1000.0));
        /* Rebuilt after every resume: only the tag (in expected) is kept. */
        len = request_bytes(c, T_KEEPALIVE, c->expected, request, sizeof request);
        step = (len + c->act->a - 1) / c->act->a;
        at = (size_t)c->i * step;
        prepare_piece(c, request + at, at + step >= len ? len - at : step,
                      c->i == c->pieces - 1 ? c->expected : NOTHING);
        AWAIT_OK(op_send(c));
    }
    count(C_SLOW_REQUESTS, 1);
    AWAIT(op_read_reply(c));
    if (c->r) AWAIT(op_check_quiet(c, 0));
    PT_END;
}

static int half_close(struct conn *c)
{
    PT_BEGIN;
    disturb(c);
    AWAIT_OK(op_connect(c));
    if (c->act->flags) {
        prepare(c, c->act->a, T_KEEPALIVE);
        AWAIT_OK(op_send(c));
    } else {
        for (c->i = 0; c->i < c->act->a; c->i++) {
            prepare(c, 1, T_KEEPALIVE);
            AWAIT_OK(op_send(c));
        }
    }
    if (!shutdown_write(c)) return DONE;
    while (c->await_n) {
        AWAIT_OK(op_read_reply(c));
    }
    AWAIT(op_read_to_eof(c));
    PT_END;
}

static int race(struct conn *c)
{
    PT_BEGIN;
    disturb(c);
    AWAIT_OK(op_connect(c));
    prepare_malformed(c, c->act->a, c->act->flags & RACE_VALID_FIRST);
    AWAIT_OK(op_send(c));
    count(C_MALFORMED_SENT, 1);
    AWAIT(op_wait_us(c, c->act->b));
    if (c->act->flags & RACE_RST) {
        rst(c);
        return DONE;
    }
    if (!shutdown_write(c)) return DONE;
    c->answered = c->broke = 0;
    while (c->await_n) {
        c->i = c->await[c->await_head] == NONE; /* the malformed one */
        AWAIT(op_read_reply(c));
        if (!c->r) {
            c->broke = 1;
            break;
        }
        c->answered |= c->i;
    }
    if (!c->broke) AWAIT(op_read_to_eof(c));
    if (c->answered) count(C_MALFORMED_ANSWERED, 1);
    else if (c->gone) count(C_MALFORMED_CLOSED, 1);
    else count(C_MALFORMED_UNANSWERED, 1);
    PT_END;
}

static int reset(struct conn *c)
{
    PT_BEGIN;
    disturb(c);
    AWAIT_OK(op_connect(c));
    switch (c->act->a) {
    case P_BEFORE:
        AWAIT(op_check_quiet(c, 0));
        break;
    case P_MID_REQUEST:
        prepare_half(c, T_KEEPALIVE);
        AWAIT_OK(op_send(c));
        count(C_PARTIAL_REQUESTS, 1);
        break;
    case P_AFTER:
        prepare(c, 1, T_KEEPALIVE);
        AWAIT_OK(op_send(c));
        break;
    case P_MID_RESPONSE:
        prepare(c, c->act->b, T_LARGE);
        AWAIT_OK(op_send(c));
        AWAIT_OK(op_read_some(c, c->act->c));
        break;
    default: /* mid-handshake: without TLS, right after connect */
        break;
    }
    rst(c);
    PT_END;
}

int behave(struct conn *c)
{
    switch (c->act->kind) {
    case K_KEEPALIVE: return keepalive(c);
    case K_CLOSE: return close_after_one(c);
    case K_IDLE_DROP: return idle_drop(c);
    case K_MALFORMED: return malformed(c);
    case K_SLOW: return slow_sender(c);
    case K_HALF_CLOSE: return half_close(c);
    case K_RACE: return race(c);
    default: return reset(c);
    }
}
