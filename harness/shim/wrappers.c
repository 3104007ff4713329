/*
 * wrappers.c - the interposed libc calls.  Each runs the real call and records what it did
 * (records.c); the calls where lifecycle races live also roll the dice of syscall faults
 * (faults.c) and chaos (chaos.c).
 */
#include "shim.h"

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

/* The start of a wrapper with syscall faults of class fc: roll the dice (fe_), start tracing
 * (c_, traced_); the result goes in r_ and e_, the record's flags in fl_. */
#define PERTURBED_BEGIN(fc, ret_type, kind)                                                   \
    int fe_ = fault_draw(fc);                                                                  \
    struct call c_;                                                                            \
    int traced_ = trace_begin(&c_);                                                            \
    ret_type r_;                                                                               \
    int e_;                                                                                    \
    uint16_t fl_ = (kind)

/* PERTURBED_BEGIN, then either inject (r_ = -1, e_ = err, REC_INJECTED in fl_) when inject
 * holds or make the real call. */
#define PERTURBED_CALL(fc, ret_type, kind, inject, err, call_expr)                            \
    PERTURBED_BEGIN(fc, ret_type, kind);                                                       \
    if (inject) {                                                                              \
        r_ = -1;                                                                               \
        e_ = (err);                                                                            \
        fl_ |= REC_INJECTED;                                                                   \
    } else {                                                                                   \
        r_ = call_expr;                                                                        \
        e_ = errno;                                                                            \
    }

/* accept/accept4 with faults: EMFILE or ECONNABORTED on a listening socket, without accepting
 * (the connection stays in the backlog). */
#define TRACE_ACCEPT(call_expr, kind, fd)                                                     \
    do {                                                                                       \
        PERTURBED_CALL(FC_ACCEPT, int, kind,                                                   \
                       UNLIKELY(fe_ != FE_NONE) && sock_int((fd), SO_ACCEPTCONN) == 1,         \
                       fe_ == FE_EMFILE ? EMFILE : ECONNABORTED, call_expr);                   \
        if (traced_)                                                                           \
            record(&c_, OP_ACCEPT, fl_, (fd), 0, 0, 0, r_, e_);                                \
        errno = e_;                                                                            \
        return r_;                                                                             \
    } while (0)

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    fn_accept f = REAL(accept);
    NOSYS_IF_NULL(f);
    TRACE_ACCEPT(f(fd, addr, len), ACCEPTK_ACCEPT, fd);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    fn_accept4 f = REAL(accept4);
    NOSYS_IF_NULL(f);
    TRACE_ACCEPT(f(fd, addr, len, flags), ACCEPTK_ACCEPT4, fd);
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
    TRACE1(int, f(fd, cmd, arg), OP_DUP,
           cmd == F_DUPFD ? DUPK_FCNTL_DUPFD : DUPK_FCNTL_DUPFD_CLOEXEC, fd, minfd, 0, 0);
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
    struct ac_record rec = call_record(c, OP_EPOLL_WAIT, kind, epfd, maxevents, 0, 0, r, e);
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
        PERTURBED_CALL(FC_EPOLL_WAIT, int, kind,                                               \
                       UNLIKELY(fe_ != FE_NONE) && maxevents > 0 && events && (may_block) &&   \
                           fd_getfl(epfd) >= 0,                                                \
                       EINTR, call_expr);                                                      \
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
    TRACE_WAIT(f(epfd, events, maxevents, timeout), WAITK_EPOLL_WAIT, timeout != 0);
}

int epoll_pwait(int epfd, struct epoll_event *events, int maxevents, int timeout,
                const sigset_t *sigmask)
{
    fn_epoll_pwait f = REAL(epoll_pwait);
    NOSYS_IF_NULL(f);
    TRACE_WAIT(f(epfd, events, maxevents, timeout, sigmask), WAITK_EPOLL_PWAIT, timeout != 0);
}

int epoll_pwait2(int epfd, struct epoll_event *events, int maxevents,
                 const struct timespec *timeout, const sigset_t *sigmask)
{
    fn_epoll_pwait2 f = REAL(epoll_pwait2);
    NOSYS_IF_NULL(f);
    TRACE_WAIT(f(epfd, events, maxevents, timeout, sigmask), WAITK_EPOLL_PWAIT2,
               !timeout || timeout->tv_sec != 0 || timeout->tv_nsec != 0);
}

/* Reads with faults (a spurious EAGAIN without reading, see read_fault_ok) and chaos (after a
 * read returned 0: between the EOF and the caller's reaction to it, typically close). */
#define TRACE_READ(call_expr, kind, fd, want, dontwait)                                       \
    do {                                                                                       \
        PERTURBED_CALL(FC_READ, ssize_t, kind,                                                 \
                       UNLIKELY(fe_ != FE_NONE) && read_fault_ok((fd), (want), (dontwait)),    \
                       EAGAIN, call_expr);                                                     \
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
        PERTURBED_BEGIN(FC_WRITE, ssize_t, kind);                                              \
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

/* _exit skips the library destructors that mark a normal exit.  It is the exit_group system
 * call and nothing more in glibc, so it is made here rather than looked up. */
void _exit(int status)
{
    mark_exit();
    for (;;)
        syscall(SYS_exit_group, status);
}

void _Exit(int status)
{
    mark_exit();
    for (;;)
        syscall(SYS_exit_group, status);
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

/* A wrapper that records one FDNEW: name, its real function's type, the parameter list and the
 * arguments passed on. */
#define DEFINE_FDNEW(name, type, params, args)                                                \
    int name params                                                                            \
    {                                                                                          \
        type f = REAL(name);                                                                   \
        NOSYS_IF_NULL(f);                                                                      \
        FDNEW(f args);                                                                         \
    }

/* open(2)-like: the mode argument exists only with O_CREAT or O_TMPFILE (which includes
 * O_DIRECTORY), so it is read from the varargs only then. */
#define DEFINE_OPEN(name, type, params, args)                                                 \
    int name params                                                                            \
    {                                                                                          \
        mode_t mode = 0;                                                                       \
        if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) {                           \
            va_list ap;                                                                        \
            va_start(ap, flags);                                                               \
            mode = (mode_t)va_arg(ap, int);                                                    \
            va_end(ap);                                                                        \
        }                                                                                      \
        type f = REAL(name);                                                                   \
        NOSYS_IF_NULL(f);                                                                      \
        FDNEW(f args);                                                                         \
    }

DEFINE_OPEN(open, fn_open, (const char *path, int flags, ...), (path, flags, mode))
DEFINE_OPEN(open64, fn_open, (const char *path, int flags, ...), (path, flags, mode))
DEFINE_OPEN(openat, fn_openat, (int dirfd, const char *path, int flags, ...),
            (dirfd, path, flags, mode))
DEFINE_OPEN(openat64, fn_openat, (int dirfd, const char *path, int flags, ...),
            (dirfd, path, flags, mode))
DEFINE_FDNEW(__open_2, fn_open2, (const char *path, int flags), (path, flags))
DEFINE_FDNEW(__open64_2, fn_open2, (const char *path, int flags), (path, flags))
DEFINE_FDNEW(__openat_2, fn_openat2, (int dirfd, const char *path, int flags),
             (dirfd, path, flags))
DEFINE_FDNEW(__openat64_2, fn_openat2, (int dirfd, const char *path, int flags),
             (dirfd, path, flags))
DEFINE_FDNEW(creat, fn_creat, (const char *path, mode_t mode), (path, mode))
DEFINE_FDNEW(creat64, fn_creat, (const char *path, mode_t mode), (path, mode))

/* pipe/pipe2/socketpair: two FDNEW records with the same seq_in/seq_out, fds[0] first. */
static void record_pair(const struct call *c, int r, int e, const int fds[2])
{
    struct ac_record rec = call_record(c, OP_FDNEW, 0, 0, 0, 0, 0, r < 0 ? r : fds[0], e);
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

DEFINE_FDNEW(eventfd, fn_eventfd, (unsigned int count, int flags), (count, flags))
DEFINE_FDNEW(timerfd_create, fn_int_int, (int clockid, int flags), (clockid, flags))

int signalfd(int fd, const sigset_t *mask, int flags)
{
    fn_signalfd f = REAL(signalfd);
    NOSYS_IF_NULL(f);
    if (fd != -1) /* changes the mask of an existing signalfd: no fd is created */
        return f(fd, mask, flags);
    FDNEW(f(fd, mask, flags));
}

DEFINE_FDNEW(memfd_create, fn_memfd, (const char *name, unsigned int flags), (name, flags))
DEFINE_FDNEW(inotify_init, fn_inotify_init, (void), ())
DEFINE_FDNEW(inotify_init1, fn_int, (int flags), (flags))
