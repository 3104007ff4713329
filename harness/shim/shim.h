/*
 * shim.h - what the parts of the afterclose LD_PRELOAD shim share (private to the library).
 *
 * The shim is one library built from these files (harness/trace/shim.py):
 *   records.c    the trace file: set-up, the mapped file and its chunks, the shared sequence
 *                counter, fork children, the crash marker
 *   wrappers.c   the interposed libc calls, each recording what it did
 *   real.c       the real libc functions behind them (dlsym RTLD_NEXT)
 *   perturb.c    what syscall faults and chaos share: the environment, the per-thread PRNGs
 *   faults.c     syscall-fault injection (the encoded spec, eligibility checks)
 *   chaos.c      schedule perturbation
 *   freetrack.c  free() of pointers that were once epoll data
 * format.h (the trace format) is generated from harness/trace/format.py.
 *
 * Design notes (the OS/glibc quirks that shaped the shim):
 *  - Calls can arrive before our constructor runs (other preloaded libraries' constructors, libc
 *    start-up), so every wrapper initialises lazily; the constructor only makes it happen early.
 *  - dlsym() may call malloc/calloc/free.  We never interpose malloc; our free() wrapper leaks a
 *    pointer handed to it while *this thread* is inside dlsym resolving free itself (dlerror's
 *    buffer, at most once per thread) instead of recursing.
 *  - The shim's own open/close go through raw syscall(2) and run with a thread-local "inside"
 *    flag, so nothing the shim does is recorded and no wrapper recurses.
 *  - glibc-internal calls (stdio's read/write, fopen's open, posix_spawn's dup2/close) bind to
 *    hidden symbols, not to the PLT, so they are never seen here - neither their opens nor their
 *    closes, which keeps the model consistent.
 *  - A record write can be interrupted by a signal handler that makes traced calls itself: each
 *    nesting level of writers on a thread fills its own chunk (see struct tstate), so a nested
 *    writer never shares a slot or a count with the writer it interrupted.
 *  - fork(): the child inherits the parent's MAP_SHARED trace mapping; it must never write there.
 *    A pthread_atfork child handler (and our _Fork wrapper, which skips atfork handlers) unmaps
 *    it, resets the thread-local chunk state and starts a new file.  vfork() is turned into fork():
 *    a vfork child shares our memory and TLS, so its dup2/close before exec would otherwise be
 *    recorded as the parent's.
 *  - struct epoll_event is packed (12 bytes) on x86-64: always go through the libc definition.
 *  - Everything declared here is hidden: the parts reach each other's state PC-relative, as one
 *    file's statics would, and nothing but the interposed calls leaves the library.  The hot
 *    paths (trace_begin, record, the perturbation checks) are inline functions here, so no call
 *    crosses a file boundary on the common path.
 *
 * Perturbation (faults.c, chaos.c and harness/syscall_faults.py): the shim can also inject
 * syscall failures (AFTERCLOSE_SYSCALL_FAULTS) and delay threads at the points where fd-lifecycle
 * races live (AFTERCLOSE_CHAOS), both drawn from per-thread PRNGs seeded by AFTERCLOSE_FAULT_SEED.
 * Both work without tracing too: with AFTERCLOSE_TRACE_DIR unset and a perturbation asked for,
 * the shim only perturbs (no trace, no message).  An injected result is recorded like a real one
 * with REC_INJECTED set in the record's flags.
 */
#ifndef AFTERCLOSE_SHIM_H
#define AFTERCLOSE_SHIM_H

#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE /* we define open/read/...: glibc's fortify inline wrappers would clash */
#endif
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "format.h"

/* After the system headers: their declarations (read, close, ...) keep default visibility. */
#pragma GCC visibility push(hidden)

#define TLS __thread __attribute__((tls_model("initial-exec")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define AC_STR_(x) #x
#define AC_STR(x) AC_STR_(x)

/* ------------------------------------------------------------------------------ state -- */

enum { ST_UNINIT = 0, ST_INITIALISING = 1, ST_ON = 2, ST_OFF = 3 };

/* records.c */
extern int g_state;
extern struct ac_header *g_hdr;
extern char *g_chunks;
extern uint32_t g_chunk_records;
extern uint64_t *g_seq;
extern int g_free_on;

/* Thread-local state.  A record writer can be interrupted by a signal handler that makes traced
 * calls and so writes records itself.  Handlers nest strictly (LIFO), so each nesting level of
 * writers gets its own chunk: a writer only ever touches its own level's chunk and count, which
 * nobody else touches while it runs, and no update needs to be atomic against signals.  Level 0
 * is the normal case; deeper levels take a chunk only when a handler really wrote mid-record.
 * Reset in a fork child (only the forking thread survives there, and its chunks lie in the
 * parent's file). */
#define LEVELS 4
#define FT_CACHE_BITS 8 /* freetrack.c */
#define FT_CACHE (1u << FT_CACHE_BITS)
struct tlevel {
    struct ac_chunk *chunk;
    uint32_t used; /* records written and published in chunk */
};
struct tstate {
    struct tlevel lv[LEVELS];
    uint32_t depth;    /* writers active on this thread; nets to zero across any handler */
    int inside;        /* the shim itself is running: pass everything through */
    int resolving_free;
    uint32_t tid;      /* cached gettid(): a syscall in glibc */
    uint64_t fork_seq; /* seq_in of the fork() in flight, read by the child */
    /* Perturbation (syscall faults and chaos): two xorshift64* streams, seeded on first use
     * from the seed, the process lineage and this thread's creation ordinal. */
    uint64_t rng_fault;
    uint64_t rng_chaos;
    uint64_t ordinal;  /* 0: the process's first thread; n: the n-th pthread_create */
    uint64_t fork_no;  /* this process's fork() count at the fork in flight, read by the child */
    uint8_t ordinal_set;
    uint8_t rng_ready;
    uint8_t pt_initialising;
    uint8_t exit_watched; /* release_chunks is armed for this thread's exit */
    uint64_t ft_cache[FT_CACHE]; /* epoll data values known to be in the free table */
};
extern TLS struct tstate t;

/* --------------------------------------------------------------------- small helpers -- */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint32_t cur_tid(void)
{
    if (UNLIKELY(t.tid == 0))
        t.tid = (uint32_t)syscall(SYS_gettid);
    return t.tid;
}

/* No stdio in these: they run before libc is fully up, in fork children and in signal
 * context.  They append to buf at *pos and keep it NUL-terminated. */
void put_str(char *buf, size_t cap, size_t *pos, const char *s);
void put_mem(char *buf, size_t cap, size_t *pos, const char *s, size_t n);
void put_u64(char *buf, size_t cap, size_t *pos, uint64_t v);
/* put_str of each string argument up to a NULL. */
void put_strs(char *buf, size_t cap, size_t *pos, ...);
/* Whole decimal number from 0 to 2**64-1; 0 when s is not one. */
int parse_u64(const char *s, uint64_t *out);

/* ------------------------------------------------------------------- records (records.c) -- */

int ensure_init(void);  /* 1 when tracing is on */
void child_reset(void); /* in a fork child, before any user code */
void atfork_once(void);
void mark_exit(void); /* the process is ending: FLAG_EXITED and exit_seq in its header */
struct ac_chunk *take_chunk(struct tlevel *lv);
void lose(void);

struct call {
    uint64_t seq_in;
    uint64_t t_ns;
};

static inline int trace_begin(struct call *c)
{
    if (UNLIKELY(__atomic_load_n(&g_state, __ATOMIC_ACQUIRE) != ST_ON) && !ensure_init())
        return 0;
    if (UNLIKELY(t.inside))
        return 0;
    c->t_ns = now_ns();
    c->seq_in = __atomic_add_fetch(g_seq, 1, __ATOMIC_SEQ_CST);
    return 1;
}

static inline uint64_t seq_next(void)
{
    return __atomic_add_fetch(g_seq, 1, __ATOMIC_SEQ_CST);
}

/* Enter a writer: returns this nesting level's state, or NULL (too deep: records are lost).
 * depth++ need not be atomic: a handler that runs between its load and store leaves depth as it
 * found it.  The signal fences keep the compiler from moving slot writes across the
 * bookkeeping; they cost no instruction. */
static inline struct tlevel *writer_enter(void)
{
    uint32_t d = t.depth;
    t.depth = d + 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    return LIKELY(d < LEVELS) ? &t.lv[d] : NULL;
}

static inline void writer_leave(void)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t.depth--;
}

/* Append one record at this level and publish it (release: the reader trusts count). */
static inline void emit(struct tlevel *lv, const struct ac_record *r)
{
    if (UNLIKELY(lv == NULL)) {
        lose();
        return;
    }
    struct ac_chunk *ch = lv->chunk;
    if (UNLIKELY(ch == NULL || lv->used >= g_chunk_records)) {
        ch = take_chunk(lv);
        if (ch == NULL) {
            lose();
            return;
        }
    }
    uint32_t i = lv->used;
    ch->recs[i] = *r;
    lv->used = i + 1;
    __atomic_store_n(&ch->count, (uint64_t)(i + 1), __ATOMIC_RELEASE);
}

static inline void put(const struct ac_record *r)
{
    struct tlevel *lv = writer_enter();
    emit(lv, r);
    writer_leave();
}

/* The record of a call that returned: takes its seq_out. */
static inline struct ac_record call_record(const struct call *c, uint16_t op, uint16_t flags,
                                           int32_t fd, int32_t arg, uint64_t data,
                                           uint32_t events, int64_t ret, int err)
{
    struct ac_record r = {
        .seq_in = c->seq_in,
        .seq_out = seq_next(),
        .t_ns = c->t_ns,
        .tid = cur_tid(),
        .op = op,
        .flags = flags,
        .fd = fd,
        .arg = arg,
        .data = data,
        .events = events,
        .err = ret < 0 ? err : 0,
        .ret = ret,
    };
    return r;
}

static inline void record(const struct call *c, uint16_t op, uint16_t flags, int32_t fd,
                          int32_t arg, uint64_t data, uint32_t events, int64_t ret, int err)
{
    struct ac_record r = call_record(c, op, flags, fd, arg, data, events, ret, err);
    put(&r);
}

/* ---------------------------------------------------------------------- real functions -- */

typedef int (*fn_socket)(int, int, int);
typedef int (*fn_accept)(int, struct sockaddr *, socklen_t *);
typedef int (*fn_accept4)(int, struct sockaddr *, socklen_t *, int);
typedef int (*fn_int)(int);
typedef int (*fn_int_int)(int, int);
typedef int (*fn_int3)(int, int, int);
typedef int (*fn_fcntl)(int, int, ...);
typedef int (*fn_epoll_ctl)(int, int, int, struct epoll_event *);
typedef int (*fn_epoll_wait)(int, struct epoll_event *, int, int);
typedef int (*fn_epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
typedef int (*fn_epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *,
                               const sigset_t *);
typedef ssize_t (*fn_read)(int, void *, size_t);
typedef ssize_t (*fn_readv)(int, const struct iovec *, int);
typedef ssize_t (*fn_recv)(int, void *, size_t, int);
typedef ssize_t (*fn_recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
typedef ssize_t (*fn_recvmsg)(int, struct msghdr *, int);
typedef ssize_t (*fn_write)(int, const void *, size_t);
typedef ssize_t (*fn_send)(int, const void *, size_t, int);
typedef ssize_t (*fn_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
typedef ssize_t (*fn_sendmsg)(int, const struct msghdr *, int);
typedef ssize_t (*fn_sendfile)(int, int, off_t *, size_t);
typedef pid_t (*fn_fork)(void);
typedef int (*fn_close_range)(unsigned int, unsigned int, int);
typedef int (*fn_open)(const char *, int, ...);
typedef int (*fn_openat)(int, const char *, int, ...);
typedef int (*fn_open2)(const char *, int);
typedef int (*fn_openat2)(int, const char *, int);
typedef int (*fn_creat)(const char *, mode_t);
typedef int (*fn_pipe)(int *);
typedef int (*fn_pipe2)(int *, int);
typedef int (*fn_socketpair)(int, int, int, int *);
typedef int (*fn_eventfd)(unsigned int, int);
typedef int (*fn_signalfd)(int, const sigset_t *, int);
typedef int (*fn_memfd)(const char *, unsigned int);
typedef int (*fn_inotify_init)(void);
typedef ssize_t (*fn_read_chk)(int, void *, size_t, size_t);
typedef ssize_t (*fn_recv_chk)(int, void *, size_t, size_t, int);
typedef ssize_t (*fn_recvfrom_chk)(int, void *, size_t, size_t, int, struct sockaddr *,
                                   socklen_t *);
typedef void (*fn_free)(void *);
typedef int (*fn_pthread_create)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

#define REAL_LIST(X)                                                                          \
    X(socket, fn_socket)                                                                       \
    X(accept, fn_accept)                                                                       \
    X(accept4, fn_accept4)                                                                     \
    X(close, fn_int)                                                                           \
    X(shutdown, fn_int_int)                                                                    \
    X(dup, fn_int)                                                                             \
    X(dup2, fn_int_int)                                                                        \
    X(dup3, fn_int3)                                                                           \
    X(fcntl, fn_fcntl)                                                                         \
    X(fcntl64, fn_fcntl)                                                                       \
    X(epoll_create, fn_int)                                                                    \
    X(epoll_create1, fn_int)                                                                   \
    X(epoll_ctl, fn_epoll_ctl)                                                                 \
    X(epoll_wait, fn_epoll_wait)                                                               \
    X(epoll_pwait, fn_epoll_pwait)                                                             \
    X(epoll_pwait2, fn_epoll_pwait2)                                                           \
    X(read, fn_read)                                                                           \
    X(readv, fn_readv)                                                                         \
    X(recv, fn_recv)                                                                           \
    X(recvfrom, fn_recvfrom)                                                                   \
    X(recvmsg, fn_recvmsg)                                                                     \
    X(write, fn_write)                                                                         \
    X(writev, fn_readv)                                                                        \
    X(send, fn_send)                                                                           \
    X(sendto, fn_sendto)                                                                       \
    X(sendmsg, fn_sendmsg)                                                                     \
    X(sendfile, fn_sendfile)                                                                   \
    X(sendfile64, fn_sendfile)                                                                 \
    X(fork, fn_fork)                                                                           \
    X(_Fork, fn_fork)                                                                          \
    X(close_range, fn_close_range)                                                             \
    X(open, fn_open)                                                                           \
    X(open64, fn_open)                                                                         \
    X(openat, fn_openat)                                                                       \
    X(openat64, fn_openat)                                                                     \
    X(__open_2, fn_open2)                                                                      \
    X(__open64_2, fn_open2)                                                                    \
    X(__openat_2, fn_openat2)                                                                  \
    X(__openat64_2, fn_openat2)                                                                \
    X(creat, fn_creat)                                                                         \
    X(creat64, fn_creat)                                                                       \
    X(pipe, fn_pipe)                                                                           \
    X(pipe2, fn_pipe2)                                                                         \
    X(socketpair, fn_socketpair)                                                               \
    X(eventfd, fn_eventfd)                                                                     \
    X(timerfd_create, fn_int_int)                                                              \
    X(signalfd, fn_signalfd)                                                                   \
    X(memfd_create, fn_memfd)                                                                  \
    X(inotify_init, fn_inotify_init)                                                           \
    X(inotify_init1, fn_int)                                                                   \
    X(__read_chk, fn_read_chk)                                                                 \
    X(__recv_chk, fn_recv_chk)                                                                 \
    X(__recvfrom_chk, fn_recvfrom_chk)                                                         \
    X(pthread_create, fn_pthread_create)

#define X_DECL(name, type)                                                                    \
    extern type real_##name;                                                                   \
    type real_resolve_##name(void);
REAL_LIST(X_DECL)
#undef X_DECL
extern fn_free real_free;

/* dlsym(RTLD_NEXT, name) with the "inside" flag set. */
void *resolve(const char *name);

/* Benign race: every thread resolves the same address.  NULL (a symbol this libc lacks, such as
 * epoll_pwait2 before glibc 2.35) is retried on every call and the wrapper fails with ENOSYS. */
#define REAL(name)                                                                            \
    (LIKELY(__atomic_load_n(&real_##name, __ATOMIC_RELAXED) != NULL)                          \
         ? real_##name                                                                        \
         : real_resolve_##name())

#define NOSYS_IF_NULL(fnptr)                                                                  \
    do {                                                                                       \
        if (UNLIKELY((fnptr) == NULL)) {                                                       \
            errno = ENOSYS;                                                                    \
            return -1;                                                                         \
        }                                                                                      \
    } while (0)

/* ---------------------------------------------------------- perturbation (perturb.c) -- */

/* g_pt: 1 << FC_* for each call class with faults, and: */
#define PT_EDGE (1u << FC_N)        /* keep the per-fd edge-triggered marks */
#define PT_CHAOS (1u << (FC_N + 1)) /* schedule perturbation on */
#define PT_ANY (((1u << FC_N) - 1) | PT_CHAOS)
#define PT_BUSY (1u << 30)
#define PT_READY (1u << 31) /* the environment was read */

extern unsigned g_pt;
extern uint64_t g_thread_next; /* ordinals handed out by our pthread_create */
extern uint64_t g_forks;       /* fork() calls of this process */

unsigned pt_init(void);
void rng_setup(void);
void pt_child(void); /* fork child: a new lineage */
/* One line on stderr: "afterclose-shim: WHAT disabled: VAR: PROBLEM 'ITEM'HINT". */
void pt_complain(const char *what, const char *var, const char *problem, const char *item,
                 size_t item_len, const char *hint);

static inline unsigned pt_get(void)
{
    unsigned pt = __atomic_load_n(&g_pt, __ATOMIC_ACQUIRE);
    return LIKELY(pt & PT_READY) ? pt : pt_init();
}

static inline uint64_t xs_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

/* --------------------------------------------------------------- syscall faults (faults.c) -- */

/* Decode AFTERCLOSE_SYSCALL_FAULTS; returns its PT_* bits (0 when empty or malformed). */
unsigned faults_setup(const char *encoded);
int fault_roll(int fc);

/* The dice for one call of class fc: FE_NONE, or the fault to inject if the call is eligible.
 * Rolled once per call of a class with faults, whatever the eligibility: the sequence of draws
 * depends only on the sequence of calls. */
static inline int fault_draw(int fc)
{
    if (LIKELY(!(pt_get() & (1u << fc))) || UNLIKELY(t.inside))
        return FE_NONE;
    return fault_roll(fc);
}

/* Per fd number: 1 = registered edge-triggered without EPOLLONESHOT.  Numbers beyond the table
 * count as marked. */
#define FDT_SIZE (1u << 20)
extern uint8_t g_fdt[FDT_SIZE];

static inline void fdt_mark(int fd, int edge)
{
    if (fd >= 0 && (unsigned)fd < FDT_SIZE)
        __atomic_store_n(&g_fdt[fd], (uint8_t)edge, __ATOMIC_RELAXED);
}

static inline int fdt_edge(int fd)
{
    return fd < 0 || (unsigned)fd >= FDT_SIZE || __atomic_load_n(&g_fdt[fd], __ATOMIC_RELAXED);
}

/* Raw checks, errno kept: -1 when the fd is not open (or not a socket, for sock_int). */
int sock_int(int fd, int opt);
int fd_getfl(int fd);
size_t iov_total(const struct iovec *iov, long cnt);
int read_fault_ok(int fd, size_t want, int dontwait);
int write_fault_arm(int fd, int fe, size_t want, size_t *k);
#define SHORT_IOV 64
int iov_cut(const struct iovec *iov, long cnt, size_t k, struct iovec *out);

/* ------------------------------------------------------------------------- chaos (chaos.c) -- */

/* Decode AFTERCLOSE_CHAOS; returns PT_CHAOS when on (0 when off or malformed). */
unsigned chaos_setup(const char *level);
void chaos_roll(void);

/* A point where lifecycle races live: maybe hold this thread up (errno kept). */
static inline void chaos_point(void)
{
    if (LIKELY(!(pt_get() & PT_CHAOS)) || UNLIKELY(t.inside))
        return;
    chaos_roll();
}

/* ------------------------------------------------------------ free tracking (freetrack.c) -- */

#define FT_SLOTS (1u << 20)
#define FT_LIMIT (FT_SLOTS / 4 * 3) /* keep unsuccessful probes short: free() pays for them */
extern uint64_t g_ft_used;
void ft_insert(uint64_t key); /* an epoll data value passed to ADD/MOD */

#pragma GCC visibility pop

#endif
