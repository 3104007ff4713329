/*
 * faults.c - syscall-fault injection (libfiu-like).  What each fault does to the target:
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
 *   write=econnreset     the socket is shut down both ways (the shim's own shutdown, recorded as
 *                        injected) and the call fails with ECONNRESET without writing.
 *   write=epipe          the socket is shut down both ways, then the real call runs: the kernel
 *                        itself answers EPIPE (and raises SIGPIPE unless MSG_NOSIGNAL/ignored).
 *   accept=emfile        accept/accept4 fail with EMFILE / ECONNABORTED without accepting: the
 *   accept=econnaborted  connection stays in the backlog, as with a real EMFILE.
 *
 * The spec arrives validated and encoded by harness/syscall_faults.py in AFTERCLOSE_SYSCALL_FAULTS:
 * comma-separated call:error:threshold items, the codes FC_* and FE_* of format.h, the threshold
 * a probability on the 2**32 scale of a draw.
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
 */
#include "shim.h"

struct fault_pick {
    uint8_t fe;
    uint64_t upto; /* cumulative threshold: inject fe when draw < upto */
};
static struct fault_pick g_picks[FC_N][AC_FAULT_MAX_PICKS];
static uint8_t g_npicks[FC_N];

/* 1 MiB of BSS, of which only the pages where fd numbers land are ever touched. */
uint8_t g_fdt[FDT_SIZE];

/* One call:error:threshold item at *p (advanced past it); 0 when it is not one. */
static int decode_item(const char **p, uint64_t *call, uint64_t *error, uint64_t *threshold)
{
    uint64_t *fields[3] = {call, error, threshold};
    const char *s = *p;
    for (int i = 0; i < 3; i++) {
        char digits[24];
        size_t n = 0;
        while (s[n] >= '0' && s[n] <= '9' && n + 1 < sizeof digits) {
            digits[n] = s[n];
            n++;
        }
        digits[n] = '\0';
        if (n == 0 || !parse_u64(digits, fields[i]))
            return 0;
        s += n;
        if (i < 2 && *s++ != ':')
            return 0;
    }
    if (*s != ',' && *s != '\0')
        return 0;
    *p = *s == ',' ? s + 1 : s;
    return 1;
}

static int decode_faults(const char *spec)
{
    static const int call_of[FE_N] = AC_FAULT_CALL_OF;
    const char *p = spec;
    while (*p) {
        const char *item = p;
        uint64_t fc, fe, th;
        int ok = decode_item(&p, &fc, &fe, &th);
        if (ok)
            ok = fc < FC_N && fe > FE_NONE && fe < FE_N && call_of[fe] == (int)fc &&
                 th <= AC_FAULT_ONE && g_npicks[fc] < AC_FAULT_MAX_PICKS;
        uint8_t n = ok ? g_npicks[fc] : 0;
        for (uint8_t i = 0; ok && i < n; i++)
            ok = g_picks[fc][i].fe != fe;
        uint64_t upto = ok ? (n ? g_picks[fc][n - 1].upto : 0) + th : 0;
        if (!ok || upto > AC_FAULT_ONE) {
            const char *end = strchr(item, ',');
            pt_complain("syscall faults", "AFTERCLOSE_SYSCALL_FAULTS",
                        "not the encoded spec of harness/syscall_faults.py at", item,
                        end ? (size_t)(end - item) : strlen(item),
                        "(call:error:threshold items in codes; set syscall faults with "
                        "@pytest.mark.syscall_faults)");
            return 0;
        }
        g_picks[fc][n] = (struct fault_pick){.fe = (uint8_t)fe, .upto = upto};
        g_npicks[fc] = (uint8_t)(n + 1);
    }
    return 1;
}

unsigned faults_setup(const char *encoded)
{
    if (!decode_faults(encoded)) {
        memset(g_npicks, 0, sizeof g_npicks);
        return 0;
    }
    unsigned pt = 0;
    for (int fc = 0; fc < FC_N; fc++)
        if (g_npicks[fc])
            pt |= 1u << fc;
    for (int i = 0; i < g_npicks[FC_READ]; i++)
        if (g_picks[FC_READ][i].fe == FE_EAGAIN)
            pt |= PT_EDGE;
    for (int i = 0; i < g_npicks[FC_WRITE]; i++)
        if (g_picks[FC_WRITE][i].fe == FE_SHORT)
            pt |= PT_EDGE;
    return pt;
}

__attribute__((noinline)) int fault_roll(int fc)
{
    if (UNLIKELY(!t.rng_ready))
        rng_setup();
    uint64_t r = xs_next(&t.rng_fault) >> 32;
    for (int i = 0; i < g_npicks[fc]; i++)
        if (r < g_picks[fc][i].upto)
            return g_picks[fc][i].fe;
    return FE_NONE;
}

int sock_int(int fd, int opt)
{
    int e = errno, v = 0;
    socklen_t len = sizeof v;
    long r = syscall(SYS_getsockopt, fd, SOL_SOCKET, opt, &v, &len);
    errno = e;
    return r == 0 ? v : -1;
}

int fd_getfl(int fd)
{
    int e = errno;
    long r = syscall(SYS_fcntl, fd, F_GETFL);
    errno = e;
    return (int)r;
}

/* The shim's own shutdown: recorded (inside the failing write's window, on its thread) as
 * SHUTDOWN with REC_INJECTED, so timelines show why the connection went dead and the model
 * never takes it for the server's call. */
static void raw_shutdown(int fd)
{
    int e = errno;
    struct call c;
    int traced = trace_begin(&c);
    long r = syscall(SYS_shutdown, fd, SHUT_RDWR);
    int err = r < 0 ? errno : 0;
    if (traced)
        record(&c, OP_SHUTDOWN, REC_INJECTED, fd, SHUT_RDWR, 0, 0, r, err);
    errno = e;
}

size_t iov_total(const struct iovec *iov, long cnt)
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

int read_fault_ok(int fd, size_t want, int dontwait)
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
int write_fault_arm(int fd, int fe, size_t want, size_t *k)
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

/* The first k bytes of iov in at most SHORT_IOV entries (fewer bytes if that runs out). */
int iov_cut(const struct iovec *iov, long cnt, size_t k, struct iovec *out)
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
