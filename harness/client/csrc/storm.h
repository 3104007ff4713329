/* The storm's compiled engine: one worker's share of a drawn plan, performed on non-blocking
 * sockets and one epoll instance.  The layout of every struct here is mirrored by ctypes in
 * harness/client/native.py (NATIVE_ABI must match AC_ABI). */
#ifndef AC_STORM_H
#define AC_STORM_H

#include <stdint.h>
#include <sys/socket.h>

#define AC_ABI 1

/* Action kinds (harness/client/behaviours.py, one each). */
enum { K_KEEPALIVE, K_CLOSE, K_IDLE_DROP, K_MALFORMED, K_SLOW, K_HALF_CLOSE, K_RACE, K_RESET };
/* Reset phases, in RESET_PHASES order, then mid-handshake. */
enum { P_BEFORE, P_MID_REQUEST, P_AFTER, P_MID_RESPONSE, P_MID_HANDSHAKE };
#define RACE_RST 1
#define RACE_VALID_FIRST 2

struct ac_action {
    uint8_t kind, flags;
    uint16_t a, b, c;
};

/* A request template: prefix, then the tag (when has_tag), then suffix. */
struct ac_tpl {
    const uint8_t *pre;
    const uint8_t *post;
    uint32_t pre_len, post_len;
    int32_t has_tag;
};
enum { T_KEEPALIVE, T_CLOSE, T_LARGE, T_MALFORMED0, AC_TEMPLATES = T_MALFORMED0 + 8 };

struct ac_config {
    struct sockaddr_storage addr;
    uint32_t addrlen;
    int32_t family;
    double start, stop, deadline, rate, io_timeout; /* CLOCK_MONOTONIC seconds; rate 0: none */
    uint32_t worker, processes, cap, planned;
    int32_t echoes, has_large;
    const char *run_id;
    const struct ac_action *actions; /* all of the plan: ours are worker, worker+processes... */
    struct ac_tpl tpl[AC_TEMPLATES];
    volatile int64_t *counters; /* [0]: stop flag; [1 + 4 * worker ...]: live counts */
};

/* Counts, in COUNT_NAMES order (native.py). */
enum {
    C_CONNECTIONS, C_REQUESTS, C_RESPONSES, C_RESET_BY_PEER, C_CLOSED_BY_PEER,
    C_CLOSED_WITHOUT_ANSWER, C_DROPPED_REQUESTS, C_TRUNCATED, C_RST_SENT, C_FIN_SENT,
    C_PARTIAL_REQUESTS, C_MALFORMED_SENT, C_MALFORMED_ANSWERED, C_MALFORMED_CLOSED,
    C_MALFORMED_UNANSWERED, C_SLOW_REQUESTS, C_CUT_BY_DEADLINE, C_WAITED_FOR_SLOT,
    C_NOT_STARTED, C_GARBAGE, C_TIMEOUT_CONNECT, C_TIMEOUT_SEND, C_TIMEOUT_RESPONSE,
    C_TIMEOUT_CLOSE, C_STARTED, C_DONE, C_EVENTS_OVER, AC_COUNTS
};
#define AC_ERRNOS 160
#define AC_STATUSES 1000

/* Evidence the Python side turns into observations (details need the protocol's tags). */
enum { E_UNSOLICITED, E_FOREIGN, E_GARBAGE_TAGGED, E_DROPPED };
/* Where unsolicited bytes came (Conn.unsolicited's contexts). */
enum { U_BEFORE_ANY, U_AFTER_ANSWER, U_NOT_DUE, U_WAITING_CLOSE };
#define AC_EVENT_BYTES 1024
#define AC_EVENTS 128

struct ac_event {
    int32_t kind, context, conn, req, last, status, count, reset;
    uint32_t total_len, shown_len;
    double idle_s;
    uint8_t data[AC_EVENT_BYTES];
};

struct ac_result {
    int64_t counts[AC_COUNTS];
    int64_t status[AC_STATUSES];
    int64_t connect_errno[AC_ERRNOS], send_errno[AC_ERRNOS], shutdown_errno[AC_ERRNOS];
    int32_t fatal_errno; /* the harness's own trouble (EMFILE...): the run stopped */
    int32_t events;
    struct ac_event event[AC_EVENTS];
};

int ac_abi(void);
int ac_run(const struct ac_config *cfg, struct ac_result *out);

#endif
