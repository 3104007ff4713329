/*
 * afterclose_shim.c - LD_PRELOAD tracer of the fd lifecycle.
 *
 * Writes one trace file per process image in $AFTERCLOSE_TRACE_DIR in the binary format defined
 * by harness/trace/format.py (keep the two in step).  Every traced call takes one number from a
 * 64-bit counter shared by all traced processes (seq.bin, mapped MAP_SHARED) before the real call
 * and one after it, so "A.seq_out < B.seq_in" proves A's syscall returned before B's began.
 *
 * Design notes (the OS/glibc quirks that shaped this file):
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
 *
 * Perturbation (see "syscall faults and chaos" below and harness/syscall_faults.py): the shim can
 * also inject syscall failures (AFTERCLOSE_SYSCALL_FAULTS) and delay threads at the points where
 * fd-lifecycle races live (AFTERCLOSE_CHAOS), both drawn from per-thread PRNGs seeded by
 * AFTERCLOSE_FAULT_SEED.  Both work without tracing too: with AFTERCLOSE_TRACE_DIR unset and a
 * perturbation asked for, the shim only perturbs (no trace, no message).  An injected result is
 * recorded like a real one with REC_INJECTED set in the record's flags.
 */
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

/* ---------------------------------------------------------------- format (see format.py) -- */

#define AC_MAGIC "ACTRACE1"
#define AC_VERSION 1u
#define AC_HEADER_SIZE 4096u
#define AC_RECORD_SIZE 64u
#define AC_EXE_OFFSET 256u
#define AC_EXE_SIZE 256u

enum {
    FLAG_FREE_TRACKING = 1,
    FLAG_FREE_TABLE_FULL = 2,
    FLAG_CRASHED = 4,
};

enum {
    OP_SOCKET = 1,
    OP_ACCEPT = 2,
    OP_CLOSE = 3,
    OP_SHUTDOWN = 4,
    OP_DUP = 5,
    OP_EPOLL_CREATE = 6,
    OP_EPOLL_CTL = 7,
    OP_EPOLL_WAIT = 8,
    OP_EPOLL_EVENT = 9,
    OP_READ = 10,
    OP_WRITE = 11,
    OP_FORK = 12,
    OP_FREE = 13,
    OP_FDNEW = 14,
    OP_CLOSE_RANGE = 15,
};

/* Record flags bit: the result was injected by the shim (format.py RecordFlag.INJECTED). */
#define REC_INJECTED 0x8000u

enum { DUPK_DUP = 0, DUPK_DUP2 = 1, DUPK_DUP3 = 2, DUPK_FCNTL = 3, DUPK_FCNTL_CLOEXEC = 4 };
enum { WAITK_WAIT = 0, WAITK_PWAIT = 1, WAITK_PWAIT2 = 2 };
enum {
    IO_READ = 0,
    IO_READV = 1,
    IO_RECV = 2,
    IO_RECVFROM = 3,
    IO_RECVMSG = 4,
    IO_WRITE = 0x10,
    IO_WRITEV = 0x11,
    IO_SEND = 0x12,
    IO_SENDTO = 0x13,
    IO_SENDMSG = 0x14,
    IO_SENDFILE = 0x15,
};

struct ac_header {
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint32_t record_size;
    uint32_t chunk_records;
    uint32_t n_chunks;
    uint32_t pid;
    uint32_t ppid;
    uint32_t flags;
    uint64_t next_chunk;
    uint64_t lost_records;
    uint64_t start_ns;
    uint64_t fork_seq;
    uint64_t free_table_slots;
    uint64_t free_table_used;
    char reserved[AC_EXE_OFFSET - 88];
    char exe[AC_EXE_SIZE];
    char tail[AC_HEADER_SIZE - AC_EXE_OFFSET - AC_EXE_SIZE];
};

struct ac_record {
    uint64_t seq_in;
    uint64_t seq_out;
    uint64_t t_ns;
    uint32_t tid;
    uint16_t op;
    uint16_t flags;
    int32_t fd;
    int32_t arg;
    uint64_t data;
    uint32_t events;
    int32_t err;
    int64_t ret;
};

struct ac_chunk {
    uint32_t tid;
    uint32_t pid;
    uint64_t count; /* records committed; stored with release order */
    char pad[AC_RECORD_SIZE - 16];
    struct ac_record recs[];
};

_Static_assert(sizeof(struct ac_header) == AC_HEADER_SIZE, "header size");
_Static_assert(offsetof(struct ac_header, next_chunk) == 40, "next_chunk offset");
_Static_assert(offsetof(struct ac_header, free_table_used) == 80, "free_table_used offset");
_Static_assert(offsetof(struct ac_header, exe) == AC_EXE_OFFSET, "exe offset");
_Static_assert(sizeof(struct ac_record) == AC_RECORD_SIZE, "record size");
_Static_assert(offsetof(struct ac_record, ret) == 56, "ret offset");
_Static_assert(sizeof(struct ac_chunk) == AC_RECORD_SIZE, "chunk header size");

/* ------------------------------------------------------------------------------ state -- */

#define TLS __thread __attribute__((tls_model("initial-exec")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

enum { ST_UNINIT = 0, ST_INITIALISING = 1, ST_ON = 2, ST_OFF = 3 };

static int g_state = ST_UNINIT;
static struct ac_header *g_hdr;
static size_t g_map_size;
static char *g_chunks;
static uint32_t g_chunk_records;
static uint32_t g_n_chunks;
static size_t g_chunk_bytes;
static uint64_t *g_seq;
static uint32_t g_pid;
static int g_free_on;
static int g_warned;
static int g_atfork_done;

/* Thread-local state.  A record writer can be interrupted by a signal handler that makes traced
 * calls and so writes records itself.  Handlers nest strictly (LIFO), so each nesting level of
 * writers gets its own chunk: a writer only ever touches its own level's chunk and count, which
 * nobody else touches while it runs, and no update needs to be atomic against signals.  Level 0
 * is the normal case; deeper levels take a chunk only when a handler really wrote mid-record.
 * Reset in a fork child (only the forking thread survives there, and its chunks lie in the
 * parent's file). */
#define LEVELS 4
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
};
static TLS struct tstate t;

/* Free-tracking table: every epoll data value ever passed to ADD/MOD; never deleted. */
#define FT_SLOTS (1u << 20)
#define FT_LIMIT (FT_SLOTS / 4 * 3) /* keep unsuccessful probes short: free() pays for them */
#define FT_MAX_PROBE 4096u
static uint64_t *g_ft;
static uint64_t g_ft_used;

/* ---------------------------------------------------------------- real functions -- */

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

#define X_DECL(name, type) static type real_##name;
REAL_LIST(X_DECL)
#undef X_DECL
static fn_free real_free;

static void *resolve(const char *name)
{
    int saved = t.inside;
    t.inside = 1;
    void *p = dlsym(RTLD_NEXT, name);
    t.inside = saved;
    return p;
}

/* Benign race: every thread resolves the same address.  NULL (a symbol this libc lacks, such as
 * epoll_pwait2 before glibc 2.35) is retried on every call and the wrapper fails with ENOSYS. */
#define REAL(name)                                                                            \
    (LIKELY(__atomic_load_n(&real_##name, __ATOMIC_RELAXED) != NULL)                          \
         ? real_##name                                                                        \
         : real_resolve_##name())

#define X_RESOLVER(name, type)                                                                \
    static __attribute__((noinline)) type real_resolve_##name(void)                           \
    {                                                                                          \
        type p;                                                                                \
        void *sym = resolve(#name);                                                            \
        memcpy(&p, &sym, sizeof p);                                                            \
        __atomic_store_n(&real_##name, p, __ATOMIC_RELAXED);                                   \
        return p;                                                                              \
    }
REAL_LIST(X_RESOLVER)
#undef X_RESOLVER

#define NOSYS_IF_NULL(fnptr)                                                                  \
    do {                                                                                       \
        if (UNLIKELY((fnptr) == NULL)) {                                                       \
            errno = ENOSYS;                                                                    \
            return -1;                                                                         \
        }                                                                                      \
    } while (0)

/* ------------------------------------------------------------------ small helpers -- */

static long raw_open(const char *path, int flags, int mode)
{
    return syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}

static void raw_close(int fd)
{
    syscall(SYS_close, fd);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint32_t cur_tid(void)
{
    if (UNLIKELY(t.tid == 0))
        t.tid = (uint32_t)syscall(SYS_gettid);
    return t.tid;
}

/* Append decimal v to buf at *pos (no stdio: this runs before libc is fully up, in fork
 * children and in signal context). */
static void put_str(char *buf, size_t cap, size_t *pos, const char *s)
{
    while (*s && *pos + 1 < cap)
        buf[(*pos)++] = *s++;
    buf[*pos] = '\0';
}

static void put_u64(char *buf, size_t cap, size_t *pos, uint64_t v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && *pos + 1 < cap)
        buf[(*pos)++] = tmp[--n];
    buf[*pos] = '\0';
}

static uint64_t env_u64(const char *name, uint64_t dflt, uint64_t lo, uint64_t hi)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return dflt;
    uint64_t v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return dflt;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v > hi)
            return hi;
    }
    return v < lo ? lo : v;
}

static void disable(const char *reason, const char *detail, int err)
{
    __atomic_store_n(&g_state, ST_OFF, __ATOMIC_RELEASE);
    if (__atomic_exchange_n(&g_warned, 1, __ATOMIC_RELAXED))
        return;
    char msg[1024];
    size_t pos = 0;
    put_str(msg, sizeof msg, &pos, "afterclose-shim: tracing disabled: ");
    put_str(msg, sizeof msg, &pos, reason);
    if (detail) {
        put_str(msg, sizeof msg, &pos, " ");
        put_str(msg, sizeof msg, &pos, detail);
    }
    if (err) {
        /* strerrorname_np reads a static table; strerror may allocate (locale messages). */
        const char *name = strerrorname_np(err);
        put_str(msg, sizeof msg, &pos, ": errno ");
        put_u64(msg, sizeof msg, &pos, (uint64_t)err);
        if (name) {
            put_str(msg, sizeof msg, &pos, " ");
            put_str(msg, sizeof msg, &pos, name);
        }
    }
    put_str(msg, sizeof msg, &pos, "\n");
    syscall(SYS_write, 2, msg, pos);
}

/* ---------------------------------------------------------------------- set-up -- */

static void crash_handler(int sig, siginfo_t *si, void *uc);
static void atfork_child(void);

/* ------------------------------------------------------ syscall faults and chaos -- */

/* Syscall faults (libfiu-like), AFTERCLOSE_SYSCALL_FAULTS="call=error:probability,...":
 *
 *   epoll_wait=eintr     epoll_wait/epoll_pwait/epoll_pwait2 fail with EINTR without waiting
 *                        (no event is consumed).  Only when the wait could block (timeout != 0):
 *                        a non-blocking poll never sees a signal.
 *   read=eagain          read/readv/recv/recvfrom/recvmsg (and _chk variants) fail with EAGAIN
 *                        without reading (the bytes stay queued).  Only on a stream socket that
 *                        is non-blocking (O_NONBLOCK from fcntl(F_GETFL), or MSG_DONTWAIT) and
 *                        not registered edge-triggered without EPOLLONESHOT.
 *   write=short          write/writev/send/sendto/sendmsg/sendfile move 1..n-1 of the n bytes
 *                        asked (the real call, with a shortened count/iovec).
 *   write=econnreset     the socket is shut down both ways (raw shutdown, not recorded) and the
 *                        call fails with ECONNRESET without writing.
 *   write=epipe          the socket is shut down both ways, then the real call runs: the kernel
 *                        itself answers EPIPE (and raises SIGPIPE unless MSG_NOSIGNAL/ignored).
 *   accept=emfile        accept/accept4 fail with EMFILE / ECONNABORTED without accepting: the
 *   accept=econnaborted  connection stays in the backlog, as with a real EMFILE.
 *
 * An injected fault is a result the kernel could have given at that moment, never a lie a
 * correct server could not survive:
 *  - Eligibility is checked with raw syscalls (getsockopt SO_TYPE/SO_ACCEPTCONN, fcntl F_GETFL/
 *    F_GETFD) only after the dice said "inject", and inside the call's seq_in..seq_out window, so
 *    the common path costs one load and a branch.  O_NONBLOCK is not cached: F_SETFL, FIONBIO
 *    and fd reuse would make a cache wrong, and the check only runs on calls about to fail.
 *  - An invalid fd fails every check, so the real call runs and the kernel answers EBADF: the
 *    shim never produces EBADF and never hides a use-after-close.
 *  - A spurious EAGAIN is a lie the kernel never tells on a blocking fd, and on an edge-triggered
 *    registration (no EPOLLONESHOT) it would mean "wait for the next edge", which never comes
 *    for bytes already queued.  The same holds for a short write on an edge-triggered writer
 *    waiting for EPOLLOUT in a buffer that never filled.  So the shim remembers, per fd number,
 *    whether the last successful epoll_ctl ADD/MOD was EPOLLET without EPOLLONESHOT (cleared by
 *    DEL and close) and injects neither fault there.  A ONESHOT registration is re-armed with
 *    EPOLL_CTL_MOD, which re-checks readiness, so it is safe.  Missed closes (close_range, dup2
 *    onto the number) leave the mark set: the shim errs towards not injecting.
 *  - ECONNRESET/EPIPE: a real reset leaves the socket dead, so the shim makes it dead (shutdown
 *    SHUT_RDWR): later reads see EOF, writes EPIPE, epoll reports HUP, as after a real reset; only
 *    the peer sees a FIN instead of having sent an RST.  Faults on reads and writes hit stream
 *    sockets only: a server's log writes and eventfd/pipe wake-ups are left alone.
 *
 * Schedule perturbation, AFTERCLOSE_CHAOS=off|on|low|medium|high|0..10 (level L; low 3,
 * on/medium 5, high 8): with probability L*5 % a thread is held up for up to L*20 us at the
 * points where lifecycle races live: after epoll_wait returned events (before the caller sees
 * them), before close, before epoll_ctl, and after a read returned 0 (before the caller reacts
 * to the EOF).  A quarter of the holds are sched_yield() ("preempted right here": cheap, and it
 * lets another runnable thread on this CPU go first); the rest are delays of 1 us..L*20 us.  A
 * delay under 50 us busy-waits on the vDSO clock, because nanosleep cannot sleep that short: the
 * default timer slack alone is 50 us.  Longer ones nanosleep, which really deschedules the
 * thread so others run on its CPU (a busy-wait would hold the CPU the racing thread needs).
 * Raw syscalls: no cancellation point, no interposer in between.  Delays sit outside the
 * call's seq_in..seq_out window, so the trace's happens-before facts are unchanged.
 *
 * Reproducibility: AFTERCLOSE_FAULT_SEED (u64, default 0) seeds per-thread streams: the
 * process's first thread is ordinal 0, the n-th thread made by pthread_create (wrapped while a
 * perturbation is on) ordinal n; threads made otherwise get ordinals in order of first use.  A
 * fork child starts a new lineage from the parent's and its fork count.  A single-threaded
 * program therefore sees the same faults for the same seed; a multi-threaded one the same per
 * thread as far as the scheduler lets the calls themselves repeat.  Faults and chaos draw from
 * separate streams: turning chaos on does not move the faults.  A parse error prints one line
 * to stderr and turns that perturbation off (tracing goes on).
 */

enum { FC_WAIT = 0, FC_READ = 1, FC_WRITE = 2, FC_ACCEPT = 3, FC_N = 4 };
enum {
    FE_NONE = 0,
    FE_EINTR,
    FE_EAGAIN,
    FE_SHORT,
    FE_ECONNRESET,
    FE_EPIPE,
    FE_EMFILE,
    FE_ECONNABORTED,
};
#define PT_EDGE (1u << FC_N)          /* keep the per-fd edge-triggered marks */
#define PT_CHAOS (1u << (FC_N + 1))   /* schedule perturbation on */
#define PT_ANY (((1u << FC_N) - 1) | PT_CHAOS)
#define PT_BUSY (1u << 30)
#define PT_READY (1u << 31)

struct fault_opt {
    const char *call;
    uint8_t fc;
    const char *err;
    uint8_t fe;
};
static const struct fault_opt FAULT_OPTS[] = {
    {"epoll_wait", FC_WAIT, "eintr", FE_EINTR},
    {"read", FC_READ, "eagain", FE_EAGAIN},
    {"write", FC_WRITE, "short", FE_SHORT},
    {"write", FC_WRITE, "econnreset", FE_ECONNRESET},
    {"write", FC_WRITE, "epipe", FE_EPIPE},
    {"accept", FC_ACCEPT, "emfile", FE_EMFILE},
    {"accept", FC_ACCEPT, "econnaborted", FE_ECONNABORTED},
};
#define N_FAULT_OPTS (sizeof FAULT_OPTS / sizeof FAULT_OPTS[0])
#define MAX_PICKS 3 /* most errors one call class has */
#define P_ONE (1ull << 32) /* probability 1 as a threshold on a 32-bit draw */

struct fault_pick {
    uint8_t fe;
    uint64_t upto; /* cumulative threshold: inject fe when draw < upto */
};
static unsigned g_pt; /* PT_* and 1 << FC_*; PT_READY once the environment was read */
static struct fault_pick g_picks[FC_N][MAX_PICKS];
static uint8_t g_npicks[FC_N];
static uint64_t g_chaos_p;      /* threshold on a 32-bit draw */
static uint64_t g_chaos_max_ns; /* longest delay */
static uint64_t g_seed;
static uint64_t g_lineage;      /* 0 in the first image; derived anew in each fork child */
static uint64_t g_thread_next;  /* ordinals handed out by our pthread_create */
static uint64_t g_foreign_next; /* ordinals of threads first seen without one */
static uint64_t g_forks;        /* fork() calls of this process */
#define CHAOS_SPIN_NS 50000ull  /* below this a delay busy-waits (default timer slack) */

/* Per fd number: 1 = registered edge-triggered without EPOLLONESHOT.  1 MiB of BSS, of which
 * only the pages where fd numbers land are ever touched.  Numbers beyond it count as marked. */
#define FDT_SIZE (1u << 20)
static uint8_t g_fdt[FDT_SIZE];

static void atfork_once(void)
{
    if (!__atomic_exchange_n(&g_atfork_done, 1, __ATOMIC_ACQ_REL))
        pthread_atfork(NULL, NULL, atfork_child);
}

static void put_mem(char *buf, size_t cap, size_t *pos, const char *s, size_t n)
{
    for (size_t i = 0; i < n && *pos + 1 < cap; i++)
        buf[(*pos)++] = s[i];
    buf[*pos] = '\0';
}

/* One line on stderr: "afterclose-shim: WHAT disabled: VAR: PROBLEM 'ITEM'HINT". */
static void pt_complain(const char *what, const char *var, const char *problem, const char *item,
                        size_t item_len, const char *hint)
{
    char msg[1024];
    size_t pos = 0;
    put_str(msg, sizeof msg, &pos, "afterclose-shim: ");
    put_str(msg, sizeof msg, &pos, what);
    put_str(msg, sizeof msg, &pos, " disabled: ");
    put_str(msg, sizeof msg, &pos, var);
    put_str(msg, sizeof msg, &pos, ": ");
    put_str(msg, sizeof msg, &pos, problem);
    put_str(msg, sizeof msg, &pos, " '");
    put_mem(msg, sizeof msg, &pos, item, item_len);
    put_str(msg, sizeof msg, &pos, "'");
    if (hint) {
        put_str(msg, sizeof msg, &pos, " ");
        put_str(msg, sizeof msg, &pos, hint);
    }
    put_str(msg, sizeof msg, &pos, "\n");
    syscall(SYS_write, 2, msg, pos);
}

static int mem_is(const char *s, size_t n, const char *word)
{
    return strlen(word) == n && memcmp(s, word, n) == 0;
}

/* A probability written as a plain decimal (no sign, no exponent: strtod would follow the
 * target's LC_NUMERIC) from 0 to 1, as a threshold in [0, P_ONE].  -1: not a number, -2: > 1. */
static int parse_prob(const char *s, size_t n, uint64_t *out)
{
    size_t i = 0;
    int digits = 0, frac = 0;
    uint64_t ip = 0;
    unsigned __int128 num = 0, den = 1;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++)
        if (ip < 10)
            ip = ip * 10 + (uint64_t)(s[i] - '0');
    if (i < n && s[i] == '.') {
        for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++) {
            if (frac < 18) {
                num = num * 10 + (unsigned)(s[i] - '0');
                den *= 10;
                frac++;
            }
        }
    }
    if (i != n || digits == 0)
        return -1;
    if (ip > 1 || (ip == 1 && num != 0))
        return -2;
    *out = ip == 1 ? P_ONE : (uint64_t)((num << 32) / den);
    return 0;
}

static int parse_faults(const char *spec)
{
    static const char *const var = "AFTERCLOSE_SYSCALL_FAULTS";
    static const char *const what = "syscall faults";
    uint64_t total[FC_N] = {0};
    const char *p = spec;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        const char *colon = eq ? memchr(eq, ':', len - (size_t)(eq - p)) : NULL;
        if (!eq || !colon) {
            pt_complain(what, var, "expected call=error:probability, got", p, len, NULL);
            return 0;
        }
        size_t call_len = (size_t)(eq - p), err_len = (size_t)(colon - eq - 1);
        const struct fault_opt *opt = NULL;
        int call_known = 0;
        for (size_t i = 0; i < N_FAULT_OPTS; i++) {
            if (!mem_is(p, call_len, FAULT_OPTS[i].call))
                continue;
            call_known = 1;
            if (mem_is(eq + 1, err_len, FAULT_OPTS[i].err))
                opt = &FAULT_OPTS[i];
        }
        if (!call_known) {
            pt_complain(what, var, "unknown call in", p, len,
                        "(calls: epoll_wait, read, write, accept)");
            return 0;
        }
        if (!opt) {
            char hint[128];
            size_t pos = 0;
            put_str(hint, sizeof hint, &pos, "(");
            put_mem(hint, sizeof hint, &pos, p, call_len);
            put_str(hint, sizeof hint, &pos, ":");
            for (size_t i = 0; i < N_FAULT_OPTS; i++) {
                if (mem_is(p, call_len, FAULT_OPTS[i].call)) {
                    put_str(hint, sizeof hint, &pos, " ");
                    put_str(hint, sizeof hint, &pos, FAULT_OPTS[i].err);
                }
            }
            put_str(hint, sizeof hint, &pos, ")");
            pt_complain(what, var, "unknown error for this call in", p, len, hint);
            return 0;
        }
        uint64_t th;
        int r = parse_prob(colon + 1, len - (size_t)(colon + 1 - p), &th);
        if (r < 0) {
            pt_complain(what, var,
                        r == -2 ? "probability above 1 in" : "probability is not a number in", p,
                        len, "(a decimal from 0 to 1, e.g. 0.05)");
            return 0;
        }
        uint8_t fc = opt->fc, n = g_npicks[fc];
        for (uint8_t i = 0; i < n; i++) {
            if (g_picks[fc][i].fe == opt->fe) {
                pt_complain(what, var, "given twice:", p, len, NULL);
                return 0;
            }
        }
        total[fc] += th;
        if (total[fc] > P_ONE) {
            pt_complain(what, var, "the probabilities of one call add up to more than 1 at", p,
                        len, NULL);
            return 0;
        }
        g_picks[fc][n] = (struct fault_pick){.fe = opt->fe, .upto = total[fc]};
        g_npicks[fc] = (uint8_t)(n + 1);
        p += len;
        if (*p == ',')
            p++;
    }
    return 1;
}

static int parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    if (!*s)
        return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return 0;
        uint64_t d = (uint64_t)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

/* -1 when not a level. */
static int parse_chaos(const char *s)
{
    static const struct {
        const char *name;
        int level;
    } names[] = {{"off", 0}, {"low", 3}, {"on", 5}, {"medium", 5}, {"high", 8}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i].name) == 0)
            return names[i].level;
    uint64_t v;
    return parse_u64(s, &v) && v <= 10 ? (int)v : -1;
}

/* Read the environment once per process image.  Calls can arrive before our constructor, so
 * this runs lazily like ensure_init; a thread racing with the initialising one waits. */
static __attribute__((noinline)) unsigned pt_init(void)
{
    unsigned expected = 0;
    if (!__atomic_compare_exchange_n(&g_pt, &expected, PT_BUSY, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        if (t.pt_initialising) /* a signal handler interrupted our own set-up */
            return PT_READY;
        while (!((expected = __atomic_load_n(&g_pt, __ATOMIC_ACQUIRE)) & PT_READY))
            sched_yield();
        return expected;
    }
    t.pt_initialising = 1;
    int saved_errno = errno;
    unsigned pt = 0;
    const char *seed = getenv("AFTERCLOSE_FAULT_SEED");
    const char *faults = getenv("AFTERCLOSE_SYSCALL_FAULTS");
    const char *chaos = getenv("AFTERCLOSE_CHAOS");
    int seed_ok = !seed || !*seed || parse_u64(seed, &g_seed);
    if (!seed_ok && ((faults && *faults) || (chaos && *chaos)))
        pt_complain("syscall faults and chaos", "AFTERCLOSE_FAULT_SEED",
                    "not a whole number from 0 to 2**64-1:", seed, strlen(seed), NULL);
    if (seed_ok && faults && *faults) {
        if (parse_faults(faults)) {
            for (int fc = 0; fc < FC_N; fc++)
                if (g_npicks[fc])
                    pt |= 1u << fc;
            for (int i = 0; i < g_npicks[FC_READ]; i++)
                if (g_picks[FC_READ][i].fe == FE_EAGAIN)
                    pt |= PT_EDGE;
            for (int i = 0; i < g_npicks[FC_WRITE]; i++)
                if (g_picks[FC_WRITE][i].fe == FE_SHORT)
                    pt |= PT_EDGE;
        } else {
            memset(g_npicks, 0, sizeof g_npicks);
        }
    }
    if (seed_ok && chaos && *chaos) {
        int level = parse_chaos(chaos);
        if (level < 0) {
            pt_complain("chaos", "AFTERCLOSE_CHAOS", "unknown level", chaos, strlen(chaos),
                        "(off, on, low, medium, high or 0-10)");
        } else if (level > 0) {
            g_chaos_p = P_ONE * (uint64_t)level * 5 / 100;
            g_chaos_max_ns = (uint64_t)level * 20000;
            pt |= PT_CHAOS;
        }
    }
    if (pt & PT_ANY)
        atfork_once(); /* a fork child must start its own lineage of streams */
    __atomic_store_n(&g_pt, pt | PT_READY, __ATOMIC_RELEASE);
    t.pt_initialising = 0;
    errno = saved_errno;
    return pt | PT_READY;
}

static inline unsigned pt_get(void)
{
    unsigned pt = __atomic_load_n(&g_pt, __ATOMIC_ACQUIRE);
    return LIKELY(pt & PT_READY) ? pt : pt_init();
}

static inline uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
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

static __attribute__((noinline)) void rng_setup(void)
{
    if (!t.ordinal_set) {
        t.ordinal = cur_tid() == (uint32_t)syscall(SYS_getpid)
                        ? 0
                        : (1ull << 32) + __atomic_add_fetch(&g_foreign_next, 1, __ATOMIC_RELAXED);
        t.ordinal_set = 1;
    }
    uint64_t x = g_seed;
    uint64_t a = splitmix64(&x);
    x = a ^ __atomic_load_n(&g_lineage, __ATOMIC_RELAXED);
    uint64_t b = splitmix64(&x);
    x = b ^ t.ordinal;
    t.rng_fault = splitmix64(&x);
    t.rng_chaos = splitmix64(&x);
    if (!t.rng_fault)
        t.rng_fault = 1;
    if (!t.rng_chaos)
        t.rng_chaos = 1;
    t.rng_ready = 1;
}

/* Fork child (from child_reset): a new lineage, this thread is its ordinal 0. */
static void pt_child(void)
{
    uint64_t x = __atomic_load_n(&g_lineage, __ATOMIC_RELAXED) ^ (t.fork_no << 20);
    __atomic_store_n(&g_lineage, splitmix64(&x), __ATOMIC_RELAXED);
    __atomic_store_n(&g_thread_next, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_foreign_next, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&g_forks, 0, __ATOMIC_RELAXED);
    t.fork_no = 0;
    t.ordinal = 0;
    t.ordinal_set = 1;
    t.rng_ready = 0;
}

static __attribute__((noinline)) int fault_roll(int fc)
{
    if (UNLIKELY(!t.rng_ready))
        rng_setup();
    uint64_t r = xs_next(&t.rng_fault) >> 32;
    for (int i = 0; i < g_npicks[fc]; i++)
        if (r < g_picks[fc][i].upto)
            return g_picks[fc][i].fe;
    return FE_NONE;
}

/* The dice for one call of class fc: FE_NONE, or the fault to inject if the call is eligible.
 * Rolled once per call of a class with faults, whatever the eligibility: the sequence of draws
 * depends only on the sequence of calls. */
static inline int fault_draw(int fc)
{
    if (LIKELY(!(pt_get() & (1u << fc))) || UNLIKELY(t.inside))
        return FE_NONE;
    return fault_roll(fc);
}

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
static int sock_int(int fd, int opt)
{
    int e = errno, v = 0;
    socklen_t len = sizeof v;
    long r = syscall(SYS_getsockopt, fd, SOL_SOCKET, opt, &v, &len);
    errno = e;
    return r == 0 ? v : -1;
}

static int fd_getfl(int fd)
{
    int e = errno;
    long r = syscall(SYS_fcntl, fd, F_GETFL);
    errno = e;
    return (int)r;
}

static void raw_shutdown(int fd)
{
    int e = errno;
    syscall(SYS_shutdown, fd, SHUT_RDWR);
    errno = e;
}

static size_t iov_total(const struct iovec *iov, long cnt)
{
    size_t n = 0;
    if (!iov || cnt <= 0 || cnt > IOV_MAX)
        return 0;
    for (long i = 0; i < cnt; i++) {
        if (iov[i].iov_len > SIZE_MAX - n)
            return 0;
        n += iov[i].iov_len;
    }
    return n;
}

static int read_fault_ok(int fd, size_t want, int dontwait)
{
    if (want == 0 || fdt_edge(fd) || sock_int(fd, SO_TYPE) != SOCK_STREAM)
        return 0;
    if (dontwait)
        return 1;
    int fl = fd_getfl(fd);
    return fl >= 0 && (fl & O_NONBLOCK);
}

/* Decide a write fault for real: FE_NONE when the call is not eligible; for FE_SHORT sets
 * *k to the shortened count (1..want-1, from the fault stream). */
static int write_fault_arm(int fd, int fe, size_t want, size_t *k)
{
    if (want == 0 || sock_int(fd, SO_TYPE) != SOCK_STREAM)
        return FE_NONE;
    if (fe == FE_SHORT) {
        if (want < 2 || fdt_edge(fd))
            return FE_NONE;
        *k = 1 + (size_t)(xs_next(&t.rng_fault) % (uint64_t)(want - 1));
    } else {
        raw_shutdown(fd); /* ECONNRESET/EPIPE: the connection is dead from now on */
    }
    return fe;
}

#define SHORT_IOV 64
/* The first k bytes of iov in at most SHORT_IOV entries (fewer bytes if that runs out). */
static int iov_cut(const struct iovec *iov, long cnt, size_t k, struct iovec *out)
{
    int n = 0;
    for (long i = 0; i < cnt && n < SHORT_IOV && k > 0; i++) {
        size_t l = iov[i].iov_len < k ? iov[i].iov_len : k;
        if (l == 0)
            continue;
        out[n].iov_base = iov[i].iov_base;
        out[n].iov_len = l;
        n++;
        k -= l;
    }
    return n;
}

static void chaos_spin(uint64_t ns)
{
    uint64_t until = now_ns() + ns;
    while (now_ns() < until)
        ;
}

static __attribute__((noinline)) void chaos_roll(void)
{
    if (UNLIKELY(!t.rng_ready))
        rng_setup();
    if ((xs_next(&t.rng_chaos) >> 32) >= g_chaos_p)
        return;
    int e = errno;
    uint64_t r = xs_next(&t.rng_chaos);
    if ((r & 3) == 0) {
        syscall(SYS_sched_yield);
    } else {
        uint64_t ns = 1000 + (r >> 2) % g_chaos_max_ns;
        if (ns < CHAOS_SPIN_NS) {
            chaos_spin(ns);
        } else {
            struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)ns};
            syscall(SYS_nanosleep, &ts, NULL);
        }
    }
    errno = e;
}

/* A point where lifecycle races live: maybe hold this thread up (errno kept). */
static inline void chaos_point(void)
{
    if (LIKELY(!(pt_get() & PT_CHAOS)) || UNLIKELY(t.inside))
        return;
    chaos_roll();
}

static int map_seq(const char *dir)
{
    if (g_seq)
        return 1;
    char path[4096];
    size_t pos = 0;
    put_str(path, sizeof path, &pos, dir);
    put_str(path, sizeof path, &pos, "/seq.bin");
    if (pos + 1 >= sizeof path) {
        disable("trace folder path too long:", dir, 0);
        return 0;
    }
    /* Several processes race to create it: O_CREAT without O_EXCL, and grow it only when it is
     * short.  ftruncate to the same size never clears data, so a loser does no harm. */
    int fd = (int)raw_open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        disable("cannot open", path, errno);
        return 0;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (st.st_size < 8 && ftruncate(fd, 8) != 0)) {
        int e = errno;
        raw_close(fd);
        disable("cannot size", path, e);
        return 0;
    }
    void *m = mmap(NULL, 8, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    raw_close(fd);
    if (m == MAP_FAILED) {
        disable("cannot map", path, e);
        return 0;
    }
    g_seq = m;
    return 1;
}

static int create_trace(const char *dir, uint32_t ppid, uint64_t fork_seq)
{
    uint64_t mb = env_u64("AFTERCLOSE_TRACE_MB", 256, 1, 1u << 20);
    uint64_t cr = env_u64("AFTERCLOSE_TRACE_CHUNK", 4096, 1, 1u << 24);
    size_t chunk_bytes = (size_t)(cr + 1) * AC_RECORD_SIZE;
    uint64_t total = mb << 20;
    uint64_t n_chunks = total > AC_HEADER_SIZE ? (total - AC_HEADER_SIZE) / chunk_bytes : 0;
    if (n_chunks < 1)
        n_chunks = 1;
    if (n_chunks > UINT32_MAX)
        n_chunks = UINT32_MAX;
    size_t size = AC_HEADER_SIZE + (size_t)n_chunks * chunk_bytes;

    uint32_t pid = (uint32_t)syscall(SYS_getpid);
    char path[4096];
    int fd = -1;
    /* n counts images of the same pid: exec keeps the pid and starts a fresh shim. */
    for (uint64_t n = 0; n < 100000; n++) {
        size_t pos = 0;
        put_str(path, sizeof path, &pos, dir);
        put_str(path, sizeof path, &pos, "/trace.");
        put_u64(path, sizeof path, &pos, pid);
        put_str(path, sizeof path, &pos, ".");
        put_u64(path, sizeof path, &pos, n);
        put_str(path, sizeof path, &pos, ".bin");
        if (pos + 1 >= sizeof path) {
            disable("trace folder path too long:", dir, 0);
            return 0;
        }
        fd = (int)raw_open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd >= 0 || errno != EEXIST)
            break;
    }
    if (fd < 0) {
        disable("cannot create a trace file in", dir, errno);
        return 0;
    }
    if (ftruncate(fd, (off_t)size) != 0) {
        int e = errno;
        raw_close(fd);
        disable("cannot size", path, e);
        return 0;
    }
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int e = errno;
    raw_close(fd); /* the mapping keeps the file; the program never sees our descriptor */
    if (m == MAP_FAILED) {
        disable("cannot map", path, e);
        return 0;
    }
    struct ac_header *h = m;
    h->version = AC_VERSION;
    h->header_size = AC_HEADER_SIZE;
    h->record_size = AC_RECORD_SIZE;
    h->chunk_records = (uint32_t)cr;
    h->n_chunks = (uint32_t)n_chunks;
    h->pid = pid;
    h->ppid = ppid;
    h->flags = g_free_on ? FLAG_FREE_TRACKING : 0;
    if (__atomic_load_n(&g_ft_used, __ATOMIC_RELAXED) >= FT_LIMIT)
        h->flags |= FLAG_FREE_TABLE_FULL;
    h->start_ns = now_ns();
    h->fork_seq = fork_seq;
    h->free_table_slots = FT_SLOTS;
    h->free_table_used = __atomic_load_n(&g_ft_used, __ATOMIC_RELAXED);
    ssize_t n = readlink("/proc/self/exe", h->exe, AC_EXE_SIZE - 1);
    if (n > 0)
        h->exe[n] = '\0';
    /* The magic goes last: a file whose creator died mid-way reads as "header never written". */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(h->magic, AC_MAGIC, 8);

    g_hdr = h;
    g_map_size = size;
    g_chunks = (char *)m + AC_HEADER_SIZE;
    g_chunk_records = (uint32_t)cr;
    g_n_chunks = (uint32_t)n_chunks;
    g_chunk_bytes = chunk_bytes;
    g_pid = pid;
    return 1;
}

static void install_crash_handlers(void)
{
    const char *s = getenv("AFTERCLOSE_CRASH_HANDLER");
    if (s && s[0] == '0')
        return;
    static const int sigs[] = {SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        struct sigaction old;
        /* Only where nobody else handles it (ASan installs SEGV/BUS/FPE handlers before us:
         * those are left alone), and only with SA_ONSTACK so alternate stacks keep working. */
        if (sigaction(sigs[i], NULL, &old) != 0 || (old.sa_flags & SA_SIGINFO) ||
            old.sa_handler != SIG_DFL)
            continue;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = crash_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
        sigemptyset(&sa.sa_mask);
        sigaction(sigs[i], &sa, NULL);
    }
}

/* Returns 1 when tracing is on.  Never blocks for long: only a thread racing with the one that
 * initialises waits, and only while that thread maps two files. */
static __attribute__((noinline)) int ensure_init(void)
{
    int st = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE);
    if (st == ST_ON)
        return 1;
    if (st == ST_OFF || t.inside)
        return 0;
    int expected = ST_UNINIT;
    if (!__atomic_compare_exchange_n(&g_state, &expected, ST_INITIALISING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        while ((st = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE)) == ST_INITIALISING)
            sched_yield();
        return st == ST_ON;
    }
    t.inside = 1;
    int saved_errno = errno; /* the caller's errno must survive our set-up */
    const char *dir = getenv("AFTERCLOSE_TRACE_DIR");
    const char *ft = getenv("AFTERCLOSE_FREE_TRACKING");
    g_free_on = !(ft && ft[0] == '0');
    int ok = 0;
    if ((!dir || !*dir) && (pt_get() & PT_ANY))
        __atomic_store_n(&g_state, ST_OFF, __ATOMIC_RELEASE); /* perturb only: no trace, quietly */
    else if (!dir || !*dir)
        disable("AFTERCLOSE_TRACE_DIR is not set", NULL, 0);
    else if (map_seq(dir))
        ok = create_trace(dir, (uint32_t)getppid(), 0);
    if (ok) {
        atfork_once();
        install_crash_handlers();
        __atomic_store_n(&g_state, ST_ON, __ATOMIC_RELEASE);
    }
    t.inside = 0;
    errno = saved_errno;
    return ok;
}

__attribute__((constructor)) static void ac_constructor(void)
{
    (void)REAL(close); /* warm the most common pointers outside any hot path */
    (void)REAL(read);
    (void)REAL(write);
    pt_get();
    ensure_init();
}

/* Runs in the child of fork()/_Fork(), before any user code: the child holds the parent's
 * MAP_SHARED mapping and the parent's thread-local chunk, neither of which it may touch. */
static void child_reset(void)
{
    uint64_t fork_seq = t.fork_seq;
    t.fork_seq = 0;
    pt_child();
    memset(t.lv, 0, sizeof t.lv);
    t.depth = 0;
    t.tid = 0;
    int st = __atomic_load_n(&g_state, __ATOMIC_ACQUIRE);
    if (st == ST_OFF)
        return;
    if (st == ST_INITIALISING) {
        /* The initialising thread does not exist here: start over as a fresh process. */
        __atomic_store_n(&g_state, ST_UNINIT, __ATOMIC_RELEASE);
        return;
    }
    if (st == ST_UNINIT)
        return;
    uint32_t parent = g_pid;
    struct ac_header *old = g_hdr;
    size_t old_size = g_map_size;
    g_hdr = NULL;
    g_chunks = NULL;
    munmap(old, old_size);
    int saved_inside = t.inside;
    int saved_errno = errno;
    t.inside = 1;
    const char *dir = getenv("AFTERCLOSE_TRACE_DIR");
    if (!dir || !create_trace(dir, parent, fork_seq)) {
        if (__atomic_load_n(&g_state, __ATOMIC_RELAXED) != ST_OFF)
            disable("cannot start the trace of a forked child", NULL, 0);
    }
    t.inside = saved_inside;
    errno = saved_errno;
}

static void atfork_child(void)
{
    child_reset();
}

static void crash_handler(int sig, siginfo_t *si, void *uc)
{
    (void)si;
    (void)uc;
    struct ac_header *h = g_hdr;
    if (h)
        __atomic_fetch_or(&h->flags, (uint32_t)FLAG_CRASHED, __ATOMIC_RELAXED);
    /* SA_RESETHAND restored SIG_DFL; the re-raised signal is blocked until we return, then
     * terminates the process with the original signal (and core dump, if enabled). */
    raise(sig);
}

/* -------------------------------------------------------------------- records -- */

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

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Fault a new chunk in with one madvise instead of one write fault per 4 KiB page while
 * recording (a page fault costs microseconds in a VM, i.e. tens of ns per record).  It also
 * turns "no space for the page" (full disk or tmpfs) into an error we can count as lost records;
 * a plain store would have killed the target with SIGBUS.  Kernels before 5.14 answer EINVAL:
 * then pages fault in as they are written. */
static int g_populate = 1;
static int g_populate_failed;

static int populate(struct ac_chunk *ch)
{
    if (__atomic_load_n(&g_populate_failed, __ATOMIC_RELAXED))
        return 0;
    if (!__atomic_load_n(&g_populate, __ATOMIC_RELAXED))
        return 1;
    uintptr_t start = (uintptr_t)ch & ~(uintptr_t)4095;
    uintptr_t end = ((uintptr_t)ch + g_chunk_bytes + 4095) & ~(uintptr_t)4095;
    if (madvise((void *)start, end - start, MADV_POPULATE_WRITE) == 0)
        return 1;
    if (errno == EINVAL || errno == ENOSYS) {
        __atomic_store_n(&g_populate, 0, __ATOMIC_RELAXED);
        return 1;
    }
    __atomic_store_n(&g_populate_failed, 1, __ATOMIC_RELAXED);
    return 0;
}

static void lose(void)
{
    struct ac_header *h = g_hdr;
    if (h)
        __atomic_fetch_add(&h->lost_records, 1, __ATOMIC_RELAXED);
}

static __attribute__((noinline)) struct ac_chunk *take_chunk(struct tlevel *lv)
{
    struct ac_header *h = g_hdr;
    lv->chunk = NULL;
    lv->used = 0;
    if (!h || __atomic_load_n(&h->next_chunk, __ATOMIC_RELAXED) >= g_n_chunks)
        return NULL;
    uint64_t idx = __atomic_fetch_add(&h->next_chunk, 1, __ATOMIC_RELAXED);
    if (idx >= g_n_chunks)
        return NULL;
    struct ac_chunk *ch = (struct ac_chunk *)(g_chunks + idx * g_chunk_bytes);
    if (!populate(ch))
        return NULL;
    ch->tid = cur_tid();
    ch->pid = g_pid;
    lv->chunk = ch;
    return ch;
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

static inline void record(const struct call *c, uint16_t op, uint16_t flags, int32_t fd,
                          int32_t arg, uint64_t data, uint32_t events, int64_t ret, int err)
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
    put(&r);
}

/* -------------------------------------------------------------- free tracking -- */

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static void ft_set_full(void)
{
    struct ac_header *h = g_hdr;
    if (h)
        __atomic_fetch_or(&h->flags, (uint32_t)FLAG_FREE_TABLE_FULL, __ATOMIC_RELAXED);
}

static uint64_t *ft_table(void)
{
    uint64_t *tab = __atomic_load_n(&g_ft, __ATOMIC_ACQUIRE);
    if (LIKELY(tab != NULL))
        return tab;
    /* Anonymous and private: a fork child gets a copy, which is right since its heap is a copy
     * too.  Pages are touched only where keys land. */
    void *m = mmap(NULL, (size_t)FT_SLOTS * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    uint64_t *expected = NULL;
    if (!__atomic_compare_exchange_n(&g_ft, &expected, (uint64_t *)m, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        munmap(m, (size_t)FT_SLOTS * sizeof(uint64_t));
        return expected;
    }
    return m;
}

static void ft_insert(uint64_t key)
{
    if (!g_free_on || key == 0)
        return;
    uint64_t *tab = ft_table();
    if (!tab) {
        ft_set_full();
        return;
    }
    uint32_t i = (uint32_t)mix64(key) & (FT_SLOTS - 1);
    for (uint32_t n = 0; n < FT_MAX_PROBE; n++, i = (i + 1) & (FT_SLOTS - 1)) {
        uint64_t cur = __atomic_load_n(&tab[i], __ATOMIC_ACQUIRE);
        if (cur == key)
            return;
        if (cur != 0)
            continue;
        if (__atomic_load_n(&g_ft_used, __ATOMIC_RELAXED) >= FT_LIMIT)
            break;
        if (__atomic_compare_exchange_n(&tab[i], &cur, key, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            uint64_t used = __atomic_add_fetch(&g_ft_used, 1, __ATOMIC_RELAXED);
            struct ac_header *h = g_hdr;
            if (h)
                __atomic_store_n(&h->free_table_used, used, __ATOMIC_RELAXED);
            return;
        }
        if (cur == key) /* another thread inserted the same key into this slot */
            return;
    }
    ft_set_full();
}

static inline int ft_contains(uint64_t key)
{
    uint64_t *tab = __atomic_load_n(&g_ft, __ATOMIC_ACQUIRE);
    if (!tab)
        return 0;
    uint32_t i = (uint32_t)mix64(key) & (FT_SLOTS - 1);
    for (uint32_t n = 0; n < FT_MAX_PROBE; n++, i = (i + 1) & (FT_SLOTS - 1)) {
        uint64_t cur = __atomic_load_n(&tab[i], __ATOMIC_ACQUIRE);
        if (cur == key)
            return 1;
        if (cur == 0)
            return 0;
    }
    return 0;
}

void free(void *p)
{
    fn_free f = __atomic_load_n(&real_free, __ATOMIC_RELAXED);
    if (UNLIKELY(f == NULL)) {
        if (t.resolving_free)
            return; /* dlsym's own allocation while we resolve free: leak it, once */
        t.resolving_free = 1;
        void *sym = resolve("free");
        t.resolving_free = 0;
        if (!sym)
            return;
        memcpy(&f, &sym, sizeof f);
        __atomic_store_n(&real_free, f, __ATOMIC_RELAXED);
    }
    if (p == NULL || !g_free_on || __atomic_load_n(&g_ft_used, __ATOMIC_RELAXED) == 0 ||
        __atomic_load_n(&g_state, __ATOMIC_RELAXED) != ST_ON || t.inside ||
        !ft_contains((uint64_t)(uintptr_t)p)) {
        f(p);
        return;
    }
    struct call c;
    if (!trace_begin(&c)) {
        f(p);
        return;
    }
    int e = errno;
    f(p);
    record(&c, OP_FREE, 0, 0, 0, (uint64_t)(uintptr_t)p, 0, 0, 0);
    errno = e;
}

/* ------------------------------------------------------------------- wrappers -- */

/* Most wrappers: call, capture errno, record one record, restore errno. */
#define TRACE1(ret_type, call_expr, op, flags, fd, arg, data, events)                        \
    do {                                                                                       \
        struct call c_;                                                                        \
        if (!trace_begin(&c_))                                                                 \
            return call_expr;                                                                  \
        ret_type r_ = call_expr;                                                               \
        int e_ = errno;                                                                        \
        record(&c_, (op), (flags), (fd), (arg), (data), (events), (int64_t)r_, e_);            \
        errno = e_;                                                                            \
        return r_;                                                                             \
    } while (0)

int socket(int domain, int type, int protocol)
{
    fn_socket f = REAL(socket);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(domain, type, protocol), OP_SOCKET, 0, 0, 0, 0, 0);
}

/* accept/accept4 with faults: EMFILE or ECONNABORTED on a listening socket, without accepting
 * (the connection stays in the backlog). */
#define TRACE_ACCEPT(call_expr, kind, fd)                                                     \
    do {                                                                                       \
        int fe_ = fault_draw(FC_ACCEPT);                                                       \
        struct call c_;                                                                        \
        int traced_ = trace_begin(&c_);                                                        \
        int r_, e_;                                                                            \
        uint16_t fl_ = (kind);                                                                 \
        if (UNLIKELY(fe_ != FE_NONE) && sock_int((fd), SO_ACCEPTCONN) == 1) {                 \
            r_ = -1;                                                                           \
            e_ = fe_ == FE_EMFILE ? EMFILE : ECONNABORTED;                                     \
            fl_ |= REC_INJECTED;                                                               \
        } else {                                                                               \
            r_ = call_expr;                                                                    \
            e_ = errno;                                                                        \
        }                                                                                      \
        if (traced_)                                                                           \
            record(&c_, OP_ACCEPT, fl_, (fd), 0, 0, 0, r_, e_);                                \
        errno = e_;                                                                            \
        return r_;                                                                             \
    } while (0)

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    fn_accept f = REAL(accept);
    NOSYS_IF_NULL(f);
    TRACE_ACCEPT(f(fd, addr, len), 0, fd);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    fn_accept4 f = REAL(accept4);
    NOSYS_IF_NULL(f);
    TRACE_ACCEPT(f(fd, addr, len, flags), 4, fd);
}

int close(int fd)
{
    fn_int f = REAL(close);
    NOSYS_IF_NULL(f);
    unsigned pt = pt_get();
    if (UNLIKELY(pt & (PT_EDGE | PT_CHAOS))) {
        if (pt & PT_EDGE)
            fdt_mark(fd, 0); /* before the number can be handed out again */
        chaos_point();
    }
    TRACE1(int, f(fd), OP_CLOSE, 0, fd, 0, 0, 0);
}

int shutdown(int fd, int how)
{
    fn_int_int f = REAL(shutdown);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(fd, how), OP_SHUTDOWN, 0, fd, how, 0, 0);
}

int dup(int fd)
{
    fn_int f = REAL(dup);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(fd), OP_DUP, DUPK_DUP, fd, -1, 0, 0);
}

int dup2(int fd, int fd2)
{
    fn_int_int f = REAL(dup2);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(fd, fd2), OP_DUP, DUPK_DUP2, fd, fd2, 0, 0);
}

int dup3(int fd, int fd2, int flags)
{
    fn_int3 f = REAL(dup3);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(fd, fd2, flags), OP_DUP, DUPK_DUP3, fd, fd2, 0, 0);
}

/* glibc's own fcntl reads the third argument as a void * whatever the command; doing the same
 * passes ints (F_SETFL) and pointers (F_GETLK, F_SETOWN_EX) through unchanged on the ABI. */
static int fcntl_common(fn_fcntl f, int fd, int cmd, void *arg)
{
    NOSYS_IF_NULL(f);
    if (cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC)
        return f(fd, cmd, arg);
    int minfd = (int)(intptr_t)arg;
    TRACE1(int, f(fd, cmd, arg), OP_DUP, cmd == F_DUPFD ? DUPK_FCNTL : DUPK_FCNTL_CLOEXEC, fd,
           minfd, 0, 0);
}

int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    return fcntl_common(REAL(fcntl), fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    fn_fcntl f = REAL(fcntl64);
    return fcntl_common(f ? f : REAL(fcntl), fd, cmd, arg);
}

int epoll_create(int size)
{
    fn_int f = REAL(epoll_create);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(size), OP_EPOLL_CREATE, 0, 0, 0, 0, 0);
}

int epoll_create1(int flags)
{
    fn_int f = REAL(epoll_create1);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(flags), OP_EPOLL_CREATE, 0, 0, 0, 0, 0);
}

/* After a successful epoll_ctl: remember whether fd is edge-triggered without ONESHOT. */
static inline void ctl_mark(int op, int fd, const struct epoll_event *ev)
{
    if (op == EPOLL_CTL_DEL)
        fdt_mark(fd, 0);
    else if (ev)
        fdt_mark(fd, (ev->events & EPOLLET) && !(ev->events & EPOLLONESHOT));
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    fn_epoll_ctl f = REAL(epoll_ctl);
    NOSYS_IF_NULL(f);
    chaos_point();
    struct call c;
    if (!trace_begin(&c)) {
        int r = f(epfd, op, fd, ev);
        if (UNLIKELY(pt_get() & PT_EDGE) && r == 0)
            ctl_mark(op, fd, ev);
        return r;
    }
    int r = f(epfd, op, fd, ev);
    int e = errno;
    if (UNLIKELY(pt_get() & PT_EDGE) && r == 0)
        ctl_mark(op, fd, ev);
    uint32_t events = 0;
    uint64_t data = 0;
    /* The kernel copies the event before any other check, so unless it answered EFAULT the
     * pointer was readable; DEL ignores it (and may be NULL). */
    if (ev && op != EPOLL_CTL_DEL && !(r < 0 && e == EFAULT)) {
        events = ev->events;
        data = ev->data.u64;
        ft_insert(data);
    }
    record(&c, OP_EPOLL_CTL, (uint16_t)op, fd, epfd, data, events, r, e);
    errno = e;
    return r;
}

static void record_wait(const struct call *c, uint16_t kind, int epfd, int maxevents,
                        const struct epoll_event *evs, int r, int e)
{
    struct ac_record rec = {
        .seq_in = c->seq_in,
        .seq_out = seq_next(),
        .t_ns = c->t_ns,
        .tid = cur_tid(),
        .op = OP_EPOLL_WAIT,
        .flags = kind,
        .fd = epfd,
        .arg = maxevents,
        .err = r < 0 ? e : 0,
        .ret = r,
    };
    /* One writer for the wait and its events: they land in order in this level's chunks. */
    struct tlevel *lv = writer_enter();
    emit(lv, &rec);
    rec.op = OP_EPOLL_EVENT;
    rec.flags = 0;
    rec.ret = 0;
    rec.err = 0;
    for (int i = 0; i < r; i++) {
        rec.arg = i;
        rec.events = evs[i].events;
        rec.data = evs[i].data.u64;
        emit(lv, &rec);
    }
    writer_leave();
}

/* Waits with faults (EINTR without waiting, only when the wait could block: a poll with timeout
 * 0 never sees a signal) and chaos (after events came back, before the caller sees them). */
#define TRACE_WAIT(call_expr, kind, may_block)                                                \
    do {                                                                                       \
        int fe_ = fault_draw(FC_WAIT);                                                         \
        struct call c_;                                                                        \
        int traced_ = trace_begin(&c_);                                                        \
        int r_, e_;                                                                            \
        uint16_t fl_ = (kind);                                                                 \
        if (UNLIKELY(fe_ != FE_NONE) && maxevents > 0 && events && (may_block) &&              \
            fd_getfl(epfd) >= 0) {                                                             \
            r_ = -1;                                                                           \
            e_ = EINTR;                                                                        \
            fl_ |= REC_INJECTED;                                                               \
        } else {                                                                               \
            r_ = call_expr;                                                                    \
            e_ = errno;                                                                        \
        }                                                                                      \
        if (traced_)                                                                           \
            record_wait(&c_, fl_, epfd, maxevents, events, r_, e_);                            \
        if (r_ > 0)                                                                            \
            chaos_point();                                                                     \
        errno = e_;                                                                            \
        return r_;                                                                             \
    } while (0)

int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout)
{
    fn_epoll_wait f = REAL(epoll_wait);
    NOSYS_IF_NULL(f);
    TRACE_WAIT(f(epfd, events, maxevents, timeout), WAITK_WAIT, timeout != 0);
}

int epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout,
                const sigset_t *sigmask)
{
    fn_epoll_pwait f = REAL(epoll_pwait);
    NOSYS_IF_NULL(f);
    TRACE_WAIT(f(epfd, events, maxevents, timeout, sigmask), WAITK_PWAIT, timeout != 0);
}

int epoll_pwait2(int epfd, struct epoll_event *events, int maxevents,
                 const struct timespec *timeout, const sigset_t *sigmask)
{
    fn_epoll_pwait2 f = REAL(epoll_pwait2);
    NOSYS_IF_NULL(f);
    TRACE_WAIT(f(epfd, events, maxevents, timeout, sigmask), WAITK_PWAIT2,
               !timeout || timeout->tv_sec != 0 || timeout->tv_nsec != 0);
}

/* Reads with faults (a spurious EAGAIN without reading, see read_fault_ok) and chaos (after a
 * read returned 0: between the EOF and the caller's reaction to it, typically close). */
#define TRACE_READ(call_expr, kind, fd, want, dontwait)                                       \
    do {                                                                                       \
        int fe_ = fault_draw(FC_READ);                                                         \
        struct call c_;                                                                        \
        int traced_ = trace_begin(&c_);                                                        \
        ssize_t r_;                                                                            \
        int e_;                                                                                \
        uint16_t fl_ = (kind);                                                                 \
        if (UNLIKELY(fe_ != FE_NONE) && read_fault_ok((fd), (want), (dontwait))) {             \
            r_ = -1;                                                                           \
            e_ = EAGAIN;                                                                       \
            fl_ |= REC_INJECTED;                                                               \
        } else {                                                                               \
            r_ = call_expr;                                                                    \
            e_ = errno;                                                                        \
        }                                                                                      \
        if (traced_)                                                                           \
            record(&c_, OP_READ, fl_, (fd), 0, 0, 0, r_, e_);                                  \
        if (r_ == 0)                                                                           \
            chaos_point();                                                                     \
        errno = e_;                                                                            \
        return r_;                                                                             \
    } while (0)

/* Writes with faults.  short: short_expr is the real call with k_ bytes instead of want; the
 * record's data holds the count asked.  econnreset: no call.  epipe: the real call on the socket
 * write_fault_arm shut down, so the kernel answers it. */
#define TRACE_WRITE(call_expr, short_expr, kind, fd, want)                                    \
    do {                                                                                       \
        int fe_ = fault_draw(FC_WRITE);                                                        \
        struct call c_;                                                                        \
        int traced_ = trace_begin(&c_);                                                        \
        ssize_t r_;                                                                            \
        int e_;                                                                                \
        uint16_t fl_ = (kind);                                                                 \
        size_t k_ = 0;                                                                         \
        uint64_t asked_ = 0;                                                                   \
        if (UNLIKELY(fe_ != FE_NONE)) {                                                        \
            asked_ = (uint64_t)(want);                                                         \
            fe_ = write_fault_arm((fd), fe_, (size_t)asked_, &k_);                             \
        }                                                                                      \
        if (LIKELY(fe_ == FE_NONE)) {                                                          \
            asked_ = 0;                                                                        \
            r_ = call_expr;                                                                    \
            e_ = errno;                                                                        \
        } else if (fe_ == FE_SHORT) {                                                          \
            r_ = short_expr;                                                                   \
            e_ = errno;                                                                        \
            fl_ |= REC_INJECTED;                                                               \
        } else if (fe_ == FE_EPIPE) {                                                          \
            asked_ = 0;                                                                        \
            r_ = call_expr;                                                                    \
            e_ = errno;                                                                        \
            fl_ |= REC_INJECTED;                                                               \
        } else {                                                                               \
            asked_ = 0;                                                                        \
            r_ = -1;                                                                           \
            e_ = ECONNRESET;                                                                   \
            fl_ |= REC_INJECTED;                                                               \
        }                                                                                      \
        if (traced_)                                                                           \
            record(&c_, OP_WRITE, fl_, (fd), 0, asked_, 0, r_, e_);                            \
        errno = e_;                                                                            \
        return r_;                                                                             \
    } while (0)

ssize_t read(int fd, void *buf, size_t n)
{
    fn_read f = REAL(read);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, buf, n), IO_READ, fd, n, 0);
}

/* _FORTIFY_SOURCE builds call the checking variants, which reach the syscall through hidden
 * aliases: without these wrappers a fortified target's reads would go unseen. */
ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    fn_read_chk f = REAL(__read_chk);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, buf, n, buflen), IO_READ, fd, n, 0);
}

ssize_t readv(int fd, const struct iovec *iov, int iovcnt)
{
    fn_readv f = REAL(readv);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, iov, iovcnt), IO_READV, fd, iov_total(iov, iovcnt), 0);
}

ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    fn_recv f = REAL(recv);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, buf, n, flags), IO_RECV, fd, n, flags & MSG_DONTWAIT);
}

ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
    fn_recv_chk f = REAL(__recv_chk);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, buf, n, buflen, flags), IO_RECV, fd, n, flags & MSG_DONTWAIT);
}

ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
                 socklen_t *addrlen)
{
    fn_recvfrom f = REAL(recvfrom);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, buf, n, flags, addr, addrlen), IO_RECVFROM, fd, n, flags & MSG_DONTWAIT);
}

ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
                       struct sockaddr *addr, socklen_t *addrlen)
{
    fn_recvfrom_chk f = REAL(__recvfrom_chk);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, buf, n, buflen, flags, addr, addrlen), IO_RECVFROM, fd, n,
               flags & MSG_DONTWAIT);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    fn_recvmsg f = REAL(recvmsg);
    NOSYS_IF_NULL(f);
    TRACE_READ(f(fd, msg, flags), IO_RECVMSG, fd,
               msg ? iov_total(msg->msg_iov, (long)msg->msg_iovlen) : 0, flags & MSG_DONTWAIT);
}

static ssize_t writev_cut(fn_readv f, int fd, const struct iovec *iov, int iovcnt, size_t k)
{
    struct iovec cut[SHORT_IOV];
    return f(fd, cut, iov_cut(iov, iovcnt, k, cut));
}

static ssize_t sendmsg_cut(fn_sendmsg f, int fd, const struct msghdr *msg, int flags, size_t k)
{
    struct iovec cut[SHORT_IOV];
    struct msghdr m = *msg;
    m.msg_iov = cut;
    m.msg_iovlen = (size_t)iov_cut(msg->msg_iov, (long)msg->msg_iovlen, k, cut);
    return f(fd, &m, flags);
}

ssize_t write(int fd, const void *buf, size_t n)
{
    fn_write f = REAL(write);
    NOSYS_IF_NULL(f);
    TRACE_WRITE(f(fd, buf, n), f(fd, buf, k_), IO_WRITE, fd, n);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    fn_readv f = REAL(writev);
    NOSYS_IF_NULL(f);
    TRACE_WRITE(f(fd, iov, iovcnt), writev_cut(f, fd, iov, iovcnt, k_), IO_WRITEV, fd,
                iov_total(iov, iovcnt));
}

ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    fn_send f = REAL(send);
    NOSYS_IF_NULL(f);
    TRACE_WRITE(f(fd, buf, n, flags), f(fd, buf, k_, flags), IO_SEND, fd, n);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
               socklen_t addrlen)
{
    fn_sendto f = REAL(sendto);
    NOSYS_IF_NULL(f);
    TRACE_WRITE(f(fd, buf, n, flags, addr, addrlen), f(fd, buf, k_, flags, addr, addrlen),
                IO_SENDTO, fd, n);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    fn_sendmsg f = REAL(sendmsg);
    NOSYS_IF_NULL(f);
    TRACE_WRITE(f(fd, msg, flags), sendmsg_cut(f, fd, msg, flags, k_), IO_SENDMSG, fd,
                msg ? iov_total(msg->msg_iov, (long)msg->msg_iovlen) : 0);
}

ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)
{
    fn_sendfile f = REAL(sendfile);
    NOSYS_IF_NULL(f);
    TRACE_WRITE(f(out_fd, in_fd, offset, count), f(out_fd, in_fd, offset, k_), IO_SENDFILE,
                out_fd, count);
}

ssize_t sendfile64(int out_fd, int in_fd, off_t *offset, size_t count)
{
    fn_sendfile f = REAL(sendfile64);
    NOSYS_IF_NULL(f);
    TRACE_WRITE(f(out_fd, in_fd, offset, count), f(out_fd, in_fd, offset, k_), IO_SENDFILE,
                out_fd, count);
}

/* While a perturbation is on, threads get their creation ordinal (for their PRNG streams)
 * through a trampoline.  Its struct is freed "inside" the shim, so the free wrapper can never
 * record it even if the address was once epoll data. */
struct ac_start {
    void *(*fn)(void *);
    void *arg;
    uint64_t ordinal;
};

static void *ac_thread_start(void *p)
{
    struct ac_start s;
    memcpy(&s, p, sizeof s);
    int saved = t.inside;
    t.inside = 1;
    free(p);
    t.inside = saved;
    t.ordinal = s.ordinal;
    t.ordinal_set = 1;
    return s.fn(s.arg);
}

int pthread_create(pthread_t *th, const pthread_attr_t *attr, void *(*fn)(void *), void *arg)
{
    fn_pthread_create f = REAL(pthread_create);
    if (UNLIKELY(f == NULL))
        return ENOSYS;
    if (LIKELY(!(pt_get() & PT_ANY)))
        return f(th, attr, fn, arg);
    int saved = t.inside;
    t.inside = 1;
    struct ac_start *s = malloc(sizeof *s);
    t.inside = saved;
    if (!s)
        return f(th, attr, fn, arg);
    s->fn = fn;
    s->arg = arg;
    s->ordinal = __atomic_add_fetch(&g_thread_next, 1, __ATOMIC_RELAXED);
    int r = f(th, attr, ac_thread_start, s);
    if (r != 0) {
        t.inside = 1;
        free(s);
        t.inside = saved;
    }
    return r;
}

static pid_t fork_common(fn_fork f, int run_child_reset)
{
    NOSYS_IF_NULL(f);
    t.fork_no = __atomic_add_fetch(&g_forks, 1, __ATOMIC_RELAXED); /* read by the child */
    struct call c;
    if (!trace_begin(&c)) {
        pid_t r = f();
        if (r == 0 && run_child_reset)
            child_reset();
        return r;
    }
    t.fork_seq = c.seq_in; /* the child's TLS is a copy: it reads this in child_reset */
    pid_t r = f();
    int e = errno;
    if (r == 0) {
        if (run_child_reset)
            child_reset();
        errno = e;
        return 0;
    }
    t.fork_seq = 0;
    record(&c, OP_FORK, 0, 0, 0, 0, 0, r, e);
    errno = e;
    return r;
}

pid_t fork(void)
{
    /* glibc's fork runs the atfork child handlers, ours included. */
    return fork_common(REAL(fork), 0);
}

pid_t _Fork(void)
{
    /* _Fork (glibc 2.34+) skips atfork handlers: reset the child ourselves. */
    return fork_common(REAL(_Fork), 1);
}

pid_t vfork(void)
{
    return fork();
}

int close_range(unsigned int first, unsigned int last, int flags)
{
    fn_close_range f = REAL(close_range);
    NOSYS_IF_NULL(f);
    TRACE1(int, f(first, last, flags), OP_CLOSE_RANGE, 0, (int32_t)first, flags,
           last == ~0u ? ~0ull : (uint64_t)last, 0);
}

/* ----------------------------------------------------------------- fd creators -- */

#define FDNEW(call_expr) TRACE1(int, call_expr, OP_FDNEW, 0, 0, 0, 0, 0)

/* The mode argument exists only with O_CREAT or O_TMPFILE (which includes O_DIRECTORY). */
#define OPEN_MODE(flags, last)                                                                \
    mode_t mode = 0;                                                                           \
    if (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE) {                           \
        va_list ap;                                                                            \
        va_start(ap, last);                                                                    \
        mode = (mode_t)va_arg(ap, int);                                                        \
        va_end(ap);                                                                            \
    }

int open(const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    fn_open f = REAL(open);
    NOSYS_IF_NULL(f);
    FDNEW(f(path, flags, mode));
}

int open64(const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    fn_open f = REAL(open64);
    NOSYS_IF_NULL(f);
    FDNEW(f(path, flags, mode));
}

int openat(int dirfd, const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    fn_openat f = REAL(openat);
    NOSYS_IF_NULL(f);
    FDNEW(f(dirfd, path, flags, mode));
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    OPEN_MODE(flags, flags);
    fn_openat f = REAL(openat64);
    NOSYS_IF_NULL(f);
    FDNEW(f(dirfd, path, flags, mode));
}

int __open_2(const char *path, int flags)
{
    fn_open2 f = REAL(__open_2);
    NOSYS_IF_NULL(f);
    FDNEW(f(path, flags));
}

int __open64_2(const char *path, int flags)
{
    fn_open2 f = REAL(__open64_2);
    NOSYS_IF_NULL(f);
    FDNEW(f(path, flags));
}

int __openat_2(int dirfd, const char *path, int flags)
{
    fn_openat2 f = REAL(__openat_2);
    NOSYS_IF_NULL(f);
    FDNEW(f(dirfd, path, flags));
}

int __openat64_2(int dirfd, const char *path, int flags)
{
    fn_openat2 f = REAL(__openat64_2);
    NOSYS_IF_NULL(f);
    FDNEW(f(dirfd, path, flags));
}

int creat(const char *path, mode_t mode)
{
    fn_creat f = REAL(creat);
    NOSYS_IF_NULL(f);
    FDNEW(f(path, mode));
}

int creat64(const char *path, mode_t mode)
{
    fn_creat f = REAL(creat64);
    NOSYS_IF_NULL(f);
    FDNEW(f(path, mode));
}

/* pipe/pipe2/socketpair: two FDNEW records with the same seq_in/seq_out, fds[0] first. */
static void record_pair(const struct call *c, int r, int e, const int fds[2])
{
    struct ac_record rec = {
        .seq_in = c->seq_in,
        .seq_out = seq_next(),
        .t_ns = c->t_ns,
        .tid = cur_tid(),
        .op = OP_FDNEW,
        .err = r < 0 ? e : 0,
        .ret = r < 0 ? r : fds[0],
    };
    struct tlevel *lv = writer_enter();
    emit(lv, &rec);
    if (r >= 0) {
        rec.ret = fds[1];
        emit(lv, &rec);
    }
    writer_leave();
}

#define TRACE_PAIR(call_expr, fds)                                                            \
    do {                                                                                       \
        struct call c_;                                                                        \
        if (!trace_begin(&c_))                                                                 \
            return call_expr;                                                                  \
        int r_ = call_expr;                                                                    \
        int e_ = errno;                                                                        \
        record_pair(&c_, r_, e_, fds);                                                         \
        errno = e_;                                                                            \
        return r_;                                                                             \
    } while (0)

int pipe(int fds[2])
{
    fn_pipe f = REAL(pipe);
    NOSYS_IF_NULL(f);
    TRACE_PAIR(f(fds), fds);
}

int pipe2(int fds[2], int flags)
{
    fn_pipe2 f = REAL(pipe2);
    NOSYS_IF_NULL(f);
    TRACE_PAIR(f(fds, flags), fds);
}

int socketpair(int domain, int type, int protocol, int fds[2])
{
    fn_socketpair f = REAL(socketpair);
    NOSYS_IF_NULL(f);
    TRACE_PAIR(f(domain, type, protocol, fds), fds);
}

int eventfd(unsigned int count, int flags)
{
    fn_eventfd f = REAL(eventfd);
    NOSYS_IF_NULL(f);
    FDNEW(f(count, flags));
}

int timerfd_create(int clockid, int flags)
{
    fn_int_int f = REAL(timerfd_create);
    NOSYS_IF_NULL(f);
    FDNEW(f(clockid, flags));
}

int signalfd(int fd, const sigset_t *mask, int flags)
{
    fn_signalfd f = REAL(signalfd);
    NOSYS_IF_NULL(f);
    if (fd != -1) /* changes the mask of an existing signalfd: no fd is created */
        return f(fd, mask, flags);
    FDNEW(f(fd, mask, flags));
}

int memfd_create(const char *name, unsigned int flags)
{
    fn_memfd f = REAL(memfd_create);
    NOSYS_IF_NULL(f);
    FDNEW(f(name, flags));
}

int inotify_init(void)
{
    fn_inotify_init f = REAL(inotify_init);
    NOSYS_IF_NULL(f);
    FDNEW(f());
}

int inotify_init1(int flags)
{
    fn_int f = REAL(inotify_init1);
    NOSYS_IF_NULL(f);
    FDNEW(f(flags));
}
