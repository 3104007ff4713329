/*
 * afterclose's eBPF tracer: the fd-lifecycle syscalls of one process tree, handed to loader.c
 * through a ring buffer and printed there as the records of harness/trace/format.py.  The
 * record constants (OP_*, IO_*, DUPK_*, WAITK_*, ACCEPTK_*, EPOLL_CTL_*) come as -D flags
 * generated from format.py (harness/trace/codegen.py); syscall numbers are x86_64's.
 *
 * A record line is eleven numbers:
 *
 *     op tgid tid seq_in seq_out flags fd arg data events ret
 *
 * seq_in/seq_out are bpf_ktime_get_ns() (CLOCK_MONOTONIC) at syscall entry and exit; ret is
 * the raw kernel result (-errno on failure).  An EPOLL_WAIT line carries its first event in
 * its data/events fields; the other events follow as EPOLL_EVENT lines.  The other lines are
 * listed in record.h.
 *
 * Cost.  The ring buffer is written without waking the loader (BPF_RB_NO_WAKEUP) unless it is
 * filling up: the loader polls it on a timer.  A wake-up per line raises an irq_work, a
 * self-IPI, which in a virtual machine is an exit to the hypervisor: it cost the traced
 * thread 8 µs a line.  The entry probe saves the time and the first four arguments of the
 * calls the exit probe models (a few compares decide, before the map lookup every syscall of
 * every process on the machine would otherwise pay).  A call already in the kernel when
 * tracing attached has no saved entry and is not printed.
 *
 * De-duplication (ctl.dedup_io), for the calls a busy server repeats on every request:
 *   - a successful (or EAGAIN) read or write is not printed when the same thread's previous
 *     printed call on the same fd number was one too, and since then neither did that thread
 *     return from an epoll_wait nor did any fd of its process change (no creation, close,
 *     dup or close_range);
 *   - a successful EPOLL_CTL_MOD is not printed when the last printed ADD/MOD of the same
 *     (epoll fd, fd) in the process set the same data and events, and no fd of the process
 *     changed since.
 * fd_gen[pid] holds the time of the process's last fd change, so a racing or lost update can
 * only make it differ, never repeat an old value.  Such a call tells the rules nothing new: it
 * acts on the same open file as the printed one (in the same epoll batch), and a MOD that
 * re-sets a registration's own data cannot be stale.  What is lost: the count of repeated
 * calls (timelines show the first), and the re-arm of an EPOLLONESHOT item, which only the
 * free() rules use (the eBPF tracer does not trace free()).
 *
 * Repeated waits (ctl.dedup_io too): a wait whose batch is the one the thread's last printed
 * wait returned (same call, epoll fd, maxevents, result, and every event's data and mask, as a
 * 64-bit FNV-style signature) while nothing at all was printed in the process since
 * (last_line[pid]) is counted in repeats[tid], not printed.  A spinning loop (an event nobody
 * handles, a Go netpoller polling an idle set) would otherwise print every turn.  The count is
 * handed over as an R line before the thread's next printed line or when it exits, and the
 * loader prints what is left at its exit; each names the printed wait it repeats by its
 * seq_in/seq_out, and the harness puts the waits back.
 */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "record.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define MAX_EVENTS 256
#define CLONE_THREAD 0x10000
#define EAGAIN 11
#define EFAULT 14
#define F_DUPFD 0
#define F_DUPFD_CLOEXEC 1030
/* Above this much unread data the loader is woken at once instead of at its next poll. */
#define WAKE_AT_BYTES (4u << 20)

/* The kernel's types, only the fields read here (CO-RE: libbpf finds their offsets in the
 * running kernel's BTF). */
struct pt_regs {
    unsigned long di, si, dx, r10, orig_ax;
} __attribute__((preserve_access_index));
typedef struct {
    int counter;
} atomic_t;
struct signal_struct {
    atomic_t live;
} __attribute__((preserve_access_index));
struct task_struct {
    int pid;
    struct signal_struct *signal;
} __attribute__((preserve_access_index));

struct entry {
    __u64 in;
    __u64 nr;
    __u64 a[4];
};
struct io_key {
    __u32 tid;
    __s32 fd;
};
struct io_seen {
    __u64 gen;
    __u64 epoch;
};
struct mod_key {
    __u32 pid;
    __s32 epfd;
    __s32 fd;
};
struct mod_seen {
    __u64 data;
    __u64 gen;
    __u32 events;
};
struct last_wait {
    __u64 sig, call, line, in, out;
};
struct repeats {
    __u64 count, first_in, last_out, in, out;
};
struct __attribute__((packed)) epoll_event_ {
    __u32 events;
    __u64 data;
};

#define HASH(name, k, v)                                                                        \
    struct {                                                                                    \
        __uint(type, BPF_MAP_TYPE_HASH);                                                        \
        __uint(max_entries, 16384);                                                             \
        __type(key, k);                                                                         \
        __type(value, v);                                                                       \
    } name SEC(".maps")

HASH(traced, __u32, __u8);               /* tgid: traced */
HASH(entries, __u32, struct entry);      /* tid: the call in progress */
HASH(clone_flags, __u32, __u64);         /* tid: flags of the clone in progress */
HASH(io_last, struct io_key, struct io_seen);
HASH(mod_last, struct mod_key, struct mod_seen);
HASH(fd_gen, __u32, __u64);              /* tgid: time of its last fd change */
HASH(wait_epoch, __u32, __u64);          /* tid: when its last epoll_wait returned */
HASH(last_line, __u32, __u64);           /* tgid: time of its last printed line */
HASH(waits, __u32, struct last_wait);    /* tid: its last printed wait */
HASH(repeats, __u32, struct repeats);    /* tid: waits repeated since, not printed yet */

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 24);
} lines SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, AC_COUNTERS);
    __type(key, __u32);
    __type(value, __u64);
} counters SEC(".maps");

struct ac_control ctl = {};

static __always_inline void count(__u32 which)
{
    __u64 *n = bpf_map_lookup_elem(&counters, &which);
    if (n)
        *n += 1;
}

static __always_inline void emit(struct ac_line_rec *r)
{
    __u64 flags = bpf_ringbuf_query(&lines, BPF_RB_AVAIL_DATA) >= WAKE_AT_BYTES
                      ? BPF_RB_FORCE_WAKEUP
                      : BPF_RB_NO_WAKEUP;
    count(AC_PRINTED);
    if (bpf_ringbuf_output(&lines, r, sizeof(*r), flags) != 0)
        count(AC_LOST);
}

static __always_inline void emit_record(__s32 op, __u32 pid, __u32 tid, __u64 in, __u64 out,
                                        __s32 flags, __s32 fd, __s32 arg, __u64 data,
                                        __u32 events, __s64 ret)
{
    struct ac_line_rec r = {
        .line = AC_LINE_RECORD, .op = op, .pid = pid, .tid = tid, .in = in, .out = out,
        .flags = flags, .fd = fd, .arg = arg, .events = events, .data = data, .ret = ret,
    };
    emit(&r);
}

/* Hand over the waits repeated since the thread's last printed one, if any. */
static __always_inline int flush_repeats(__u32 tid)
{
    struct repeats *rp = bpf_map_lookup_elem(&repeats, &tid);
    if (!rp || rp->count == 0)
        return 0;
    struct ac_line_rec r = {
        .line = AC_LINE_REPEATS, .tid = tid, .data = rp->count, .in = rp->first_in,
        .out = rp->last_out, .ret = (__s64)rp->in, .extra = rp->out,
    };
    emit(&r);
    bpf_map_delete_elem(&repeats, &tid);
    return 1;
}

static __always_inline int modelled(long id)
{
    switch (id) {
    case 0 ... 3:     /* read write open close */
    case 19 ... 20:   /* readv writev */
    case 22:          /* pipe */
    case 32 ... 33:   /* dup dup2 */
    case 40 ... 41:   /* sendfile socket */
    case 43 ... 48:   /* accept sendto recvfrom sendmsg recvmsg shutdown */
    case 53:          /* socketpair */
    case 56 ... 58:   /* clone fork vfork */
    case 72:          /* fcntl */
    case 85:          /* creat */
    case 213:         /* epoll_create */
    case 232 ... 233: /* epoll_wait epoll_ctl */
    case 253:         /* inotify_init */
    case 257:         /* openat */
    case 281 ... 284: /* epoll_pwait signalfd timerfd_create eventfd */
    case 288 ... 294: /* accept4 signalfd4 eventfd2 epoll_create1 dup3 pipe2 inotify_init1 */
    case 319:         /* memfd_create */
    case 435 ... 437: /* clone3 close_range openat2 */
    case 441:         /* epoll_pwait2 */
        return 1;
    }
    return 0;
}

/* The calling thread's process id (tgid) and thread id, as the host numbers them; whether its
 * process is traced. */
static __always_inline int current_traced(__u32 *pid, __u32 *tid)
{
    __u64 pt = bpf_get_current_pid_tgid();
    *pid = pt >> 32;
    *tid = (__u32)pt;
    return bpf_map_lookup_elem(&traced, pid) != NULL;
}

/* Children of traced processes (not threads) are traced from birth: the tracepoint runs in
 * the parent before the child can run. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
    __u32 pid, tid;
    if (!current_traced(&pid, &tid))
        return 0;
    __u64 *flags = bpf_map_lookup_elem(&clone_flags, &tid);
    if (flags && (*flags & CLONE_THREAD))
        return 0;
    __u32 child_pid = child->pid;
    __u8 one = 1;
    bpf_map_update_elem(&traced, &child_pid, &one, BPF_ANY);
    return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit_thread)
{
    __u32 pid, tid;
    if (!current_traced(&pid, &tid))
        return 0;
    /* do_exit() counts the thread out of signal->live before this tracepoint and closes the
     * fd table (exit_files) after it: at zero, this is the process's end. */
    struct task_struct *task = bpf_get_current_task_btf();
    if (!ctl.halt && task->signal->live.counter == 0) {
        struct ac_line_rec r = {.line = AC_LINE_EXIT, .pid = pid, .in = bpf_ktime_get_ns()};
        emit(&r);
    }
    if (!ctl.halt)
        flush_repeats(tid);
    bpf_map_delete_elem(&repeats, &tid);
    bpf_map_delete_elem(&waits, &tid);
    bpf_map_delete_elem(&entries, &tid);
    bpf_map_delete_elem(&wait_epoch, &tid);
    bpf_map_delete_elem(&clone_flags, &tid);
    return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec)
{
    __u32 pid, tid;
    if (!current_traced(&pid, &tid))
        return 0;
    __u64 now = bpf_ktime_get_ns();
    bpf_map_update_elem(&fd_gen, &pid, &now, BPF_ANY);
    bpf_map_update_elem(&last_line, &pid, &now, BPF_ANY);
    if (!ctl.halt) {
        struct ac_line_rec r = {.line = AC_LINE_EXEC, .pid = pid, .tid = tid, .in = now};
        emit(&r);
    }
    return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(on_sys_enter, struct pt_regs *regs, long id)
{
    if (!modelled(id))
        return 0;
    __u32 pid, tid;
    if (!current_traced(&pid, &tid))
        return 0;
    struct entry e = {
        .in = bpf_ktime_get_ns(),
        .nr = (__u64)id,
        .a = {regs->di, regs->si, regs->dx, regs->r10},
    };
    bpf_map_update_elem(&entries, &tid, &e, BPF_ANY);
    if (id == 56) {
        bpf_map_update_elem(&clone_flags, &tid, &e.a[0], BPF_ANY);
    } else if (id == 435) {
        __u64 flags = 0;
        bpf_probe_read_user(&flags, sizeof(flags), (void *)e.a[0]);
        bpf_map_update_elem(&clone_flags, &tid, &flags, BPF_ANY);
    }
    return 0;
}

static __always_inline __u64 fd_generation(__u32 pid)
{
    __u64 *g = bpf_map_lookup_elem(&fd_gen, &pid);
    return g ? *g : 0;
}

/* READ or WRITE; returns the lines printed. */
static __always_inline int on_io(__u32 pid, __u32 tid, struct entry *e, long nr, __s64 ret,
                                 __u64 out)
{
    __s32 fd = (__s32)e->a[0];
    if (ctl.dedup_io && (ret > 0 || ret == -EAGAIN)) {
        struct io_key k = {.tid = tid, .fd = fd};
        struct io_seen now = {.gen = fd_generation(pid)};
        __u64 *epoch = bpf_map_lookup_elem(&wait_epoch, &tid);
        now.epoch = epoch ? *epoch : 0;
        struct io_seen *last = bpf_map_lookup_elem(&io_last, &k);
        if (last && last->gen == now.gen && last->epoch == now.epoch)
            return 0;
        bpf_map_update_elem(&io_last, &k, &now, BPF_ANY);
    }
    __s32 op = OP_READ, kind = IO_READ;
    switch (nr) {
    case 19: kind = IO_READV; break;
    case 45: kind = IO_RECVFROM; break;
    case 47: kind = IO_RECVMSG; break;
    case 1: op = OP_WRITE; kind = IO_WRITE; break;
    case 20: op = OP_WRITE; kind = IO_WRITEV; break;
    case 44: op = OP_WRITE; kind = IO_SENDTO; break;
    case 46: op = OP_WRITE; kind = IO_SENDMSG; break;
    case 40: op = OP_WRITE; kind = IO_SENDFILE; break;
    }
    emit_record(op, pid, tid, e->in, out, kind, fd, 0, 0, 0, ret);
    return 1;
}

struct wait_ctx {
    __u64 base;
    __u64 sig;
    __s64 n;
    __u32 pid, tid, epfd;
    __u64 in, out;
};

static long sign_event(__u64 i, void *ctx)
{
    struct wait_ctx *w = ctx;
    struct epoll_event_ ev = {};
    if (i >= (__u64)w->n)
        return 1;
    bpf_probe_read_user(&ev, sizeof(ev), (void *)(w->base + i * sizeof(ev)));
    w->sig = (w->sig ^ ev.data) * 1099511628211ull;
    w->sig = (w->sig ^ (__u64)ev.events) * 1099511628211ull;
    return 0;
}

static long print_event(__u64 i, void *ctx)
{
    struct wait_ctx *w = ctx;
    struct epoll_event_ ev = {};
    __u64 k = i + 1; /* the first event rode on the wait's own line */
    if (k >= (__u64)w->n)
        return 1;
    bpf_probe_read_user(&ev, sizeof(ev), (void *)(w->base + k * sizeof(ev)));
    emit_record(OP_EPOLL_EVENT, w->pid, w->tid, w->in, w->out, 0, (__s32)w->epfd, (__s32)k,
                ev.data, ev.events, 0);
    return 0;
}

/* EPOLL_WAIT (and its events); returns the lines printed, and sets *printed_wait and *sig. */
static __always_inline int on_wait(__u32 pid, __u32 tid, struct entry *e, long nr, __s64 ret,
                                   __u64 out, int *printed_wait, __u64 *sig_out,
                                   __u64 *call_out)
{
    __s32 kind = nr == 232 ? WAITK_EPOLL_WAIT : (nr == 281 ? WAITK_EPOLL_PWAIT : WAITK_EPOLL_PWAIT2);
    bpf_map_update_elem(&wait_epoch, &tid, &out, BPF_ANY);
    __u64 call = ((__u64)kind << 56) ^ ((__u64)(__u32)e->a[0] << 24) ^ (__u64)(__u32)e->a[2];
    call = (call ^ (__u64)ret) * 1099511628211ull;
    __s64 n = ret < MAX_EVENTS ? ret : MAX_EVENTS;
    struct wait_ctx w = {.base = e->a[1], .sig = 1469598103934665603ull, .n = n, .pid = pid,
                         .tid = tid, .epfd = (__u32)e->a[0], .in = e->in, .out = out};
    if (ctl.dedup_io && ret > 0)
        bpf_loop(MAX_EVENTS, sign_event, &w, 0);
    *sig_out = w.sig;
    *call_out = call;
    if (ctl.dedup_io && ret <= MAX_EVENTS) {
        struct last_wait *lw = bpf_map_lookup_elem(&waits, &tid);
        __u64 *ll = bpf_map_lookup_elem(&last_line, &pid);
        if (lw && lw->sig == w.sig && lw->call == call && lw->line == (ll ? *ll : 0)) {
            /* The same batch again, nothing printed in the process since: counted. */
            struct repeats *rp = bpf_map_lookup_elem(&repeats, &tid);
            if (rp && rp->count > 0) {
                rp->count += 1;
                rp->last_out = out;
            } else {
                struct repeats fresh = {.count = 1, .first_in = e->in, .last_out = out,
                                        .in = lw->in, .out = lw->out};
                bpf_map_update_elem(&repeats, &tid, &fresh, BPF_ANY);
            }
            return 0;
        }
    }
    struct epoll_event_ first = {};
    if (ret > 0)
        bpf_probe_read_user(&first, sizeof(first), (void *)e->a[1]);
    emit_record(OP_EPOLL_WAIT, pid, tid, e->in, out, kind, (__s32)e->a[0], (__s32)e->a[2],
                first.data, first.events, ret);
    int printed = 1;
    if (n > 1) {
        bpf_loop(MAX_EVENTS, print_event, &w, 0);
        printed += (int)n - 1;
    }
    if (ret > MAX_EVENTS) {
        struct ac_line_rec r = {.line = AC_LINE_TRUNCATED, .ret = ret};
        emit(&r);
        printed++;
    }
    *printed_wait = 1;
    return printed;
}

/* EPOLL_CTL: fd = target, arg = epfd, flags = op.  The kernel copies the event first: unless
 * it said EFAULT it was readable; DEL ignores it. */
static __always_inline int on_ctl(__u32 pid, __u32 tid, struct entry *e, __s64 ret, __u64 out)
{
    __s32 epfd = (__s32)e->a[0], op = (__s32)e->a[1], fd = (__s32)e->a[2];
    struct epoll_event_ ev = {};
    if (op != EPOLL_CTL_DEL && e->a[3] != 0 && ret != -EFAULT)
        bpf_probe_read_user(&ev, sizeof(ev), (void *)e->a[3]);
    if (ctl.dedup_io && ret == 0) {
        struct mod_key k = {.pid = pid, .epfd = epfd, .fd = fd};
        struct mod_seen now = {.data = ev.data, .events = ev.events, .gen = fd_generation(pid)};
        if (op == EPOLL_CTL_MOD) {
            struct mod_seen *last = bpf_map_lookup_elem(&mod_last, &k);
            if (last && last->data == now.data && last->events == now.events &&
                last->gen == now.gen)
                return 0;
            bpf_map_update_elem(&mod_last, &k, &now, BPF_ANY);
        } else if (op == EPOLL_CTL_ADD) {
            bpf_map_update_elem(&mod_last, &k, &now, BPF_ANY);
        } else {
            bpf_map_delete_elem(&mod_last, &k);
        }
    }
    emit_record(OP_EPOLL_CTL, pid, tid, e->in, out, op, fd, epfd, ev.data, ev.events, ret);
    return 1;
}

/* Whether the call changed (or may have changed) the process's fd table. */
static __always_inline int changes_fds(long nr, __s64 ret, __u64 a1)
{
    if (nr == 3 || nr == 436)
        return 1;
    if (ret < 0)
        return 0;
    switch (nr) {
    case 43: case 288: case 41: case 213: case 291: case 32: case 33: case 292: case 22:
    case 293: case 53: case 2: case 257: case 437: case 85: case 284: case 290: case 283:
    case 282: case 289: case 319: case 253: case 294:
        return 1;
    case 72:
        return a1 == F_DUPFD || a1 == F_DUPFD_CLOEXEC;
    }
    return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(on_sys_exit, struct pt_regs *regs, long ret)
{
    long nr = (long)regs->orig_ax;
    if (!modelled(nr) || ctl.halt)
        return 0;
    __u32 pid, tid;
    if (!current_traced(&pid, &tid))
        return 0;
    /* Not deleted here: the next call's entry overwrites it, a thread's exit deletes it. */
    struct entry *e = bpf_map_lookup_elem(&entries, &tid);
    if (!e || e->in == 0 || e->nr != (__u64)nr)
        return 0;
    __u64 out = bpf_ktime_get_ns();
    __u64 in = e->in, a0 = e->a[0], a1 = e->a[1], a2 = e->a[2], a3 = e->a[3];
    int lines = 0, printed_wait = 0;
    __u64 sig = 0, call = 0;

    switch (nr) {
    case 0: case 19: case 45: case 47: case 1: case 20: case 44: case 46: case 40:
        lines = on_io(pid, tid, e, nr, ret, out);
        break;
    case 232: case 281: case 441:
        lines = on_wait(pid, tid, e, nr, ret, out, &printed_wait, &sig, &call);
        break;
    case 233:
        lines = on_ctl(pid, tid, e, ret, out);
        break;
    case 3: case 43: case 288:
        /* CLOSE; ACCEPT, flags = the AcceptKind */
        emit_record(nr == 3 ? OP_CLOSE : OP_ACCEPT, pid, tid, in, out,
                    nr == 288 ? ACCEPTK_ACCEPT4 : ACCEPTK_ACCEPT, (__s32)a0, 0, 0, 0, ret);
        lines = 1;
        break;
    case 41: case 213: case 291:
        emit_record(nr == 41 ? OP_SOCKET : OP_EPOLL_CREATE, pid, tid, in, out, 0, 0, 0, 0, 0,
                    ret);
        lines = 1;
        break;
    case 2: case 257: case 437: case 85: case 284: case 290: case 283: case 282: case 289:
    case 319: case 253: case 294:
        /* FDNEW: open openat openat2 creat eventfd eventfd2 timerfd_create signalfd signalfd4
         * memfd_create inotify_init inotify_init1 */
        emit_record(OP_FDNEW, pid, tid, in, out, 0, 0, 0, 0, 0, ret);
        lines = 1;
        break;
    case 48:
        /* SHUTDOWN: arg = how */
        emit_record(OP_SHUTDOWN, pid, tid, in, out, 0, (__s32)a0, (__s32)a1, 0, 0, ret);
        lines = 1;
        break;
    case 32: case 33: case 292:
        /* DUP: arg = the new number asked for (-1) */
        emit_record(OP_DUP, pid, tid, in, out,
                    nr == 32 ? DUPK_DUP : (nr == 33 ? DUPK_DUP2 : DUPK_DUP3), (__s32)a0,
                    nr == 32 ? -1 : (__s32)a1, 0, 0, ret);
        lines = 1;
        break;
    case 72:
        /* fcntl F_DUPFD / F_DUPFD_CLOEXEC: DUP, arg = lowest number */
        if (a1 == F_DUPFD || a1 == F_DUPFD_CLOEXEC) {
            emit_record(OP_DUP, pid, tid, in, out,
                        a1 == F_DUPFD ? DUPK_FCNTL_DUPFD : DUPK_FCNTL_DUPFD_CLOEXEC, (__s32)a0,
                        (__s32)a2, 0, 0, ret);
            lines = 1;
        }
        break;
    case 436:
        /* CLOSE_RANGE: fd = first, data = last, arg = flags */
        emit_record(OP_CLOSE_RANGE, pid, tid, in, out, 0, (__s32)a0, (__s32)a2, (__u32)a1, 0,
                    ret);
        lines = 1;
        break;
    case 22: case 293: case 53:
        /* pipe, pipe2 (fds = a0), socketpair (sv = a3): two FDNEW with the same seqs */
        if (ret < 0) {
            emit_record(OP_FDNEW, pid, tid, in, out, 0, 0, 0, 0, 0, ret);
            lines = 1;
        } else {
            __s32 fds[2] = {};
            bpf_probe_read_user(fds, sizeof(fds), (void *)(nr == 53 ? a3 : a0));
            emit_record(OP_FDNEW, pid, tid, in, out, 0, 0, 0, 0, 0, fds[0]);
            emit_record(OP_FDNEW, pid, tid, in, out, 0, 0, 0, 0, 0, fds[1]);
            lines = 2;
        }
        break;
    case 56: case 435: case 57: case 58:
        /* FORK in the parent, ret = the child's pid; a thread is no process */
        if (ret != 0) {
            __u64 flags = 0;
            if (nr == 56 || nr == 435) {
                __u64 *f = bpf_map_lookup_elem(&clone_flags, &tid);
                flags = f ? *f : 0;
            }
            if (!(flags & CLONE_THREAD)) {
                emit_record(OP_FORK, pid, tid, in, out, 0, 0, 0, 0, 0, ret);
                lines = 1;
            }
        }
        break;
    }
    /* The process's fd table changed (or may have): see the de-duplication above. */
    if (changes_fds(nr, ret, a1)) {
        bpf_map_update_elem(&fd_gen, &pid, &out, BPF_ANY);
        if (nr == 3) {
            struct io_key k = {.tid = tid, .fd = (__s32)a0};
            bpf_map_delete_elem(&io_last, &k);
        }
    }
    if (lines > 0) {
        /* Waits repeated since this thread's last printed one: handed over now, they name
         * the printed wait they repeat, and the parser puts them back there. */
        flush_repeats(tid);
        bpf_map_update_elem(&last_line, &pid, &out, BPF_ANY);
        if (printed_wait) {
            struct last_wait lw = {.sig = sig, .call = call, .line = out, .in = in, .out = out};
            bpf_map_update_elem(&waits, &tid, &lw, BPF_ANY);
        } else {
            bpf_map_delete_elem(&waits, &tid);
        }
    }
    if (nr == 56 || nr == 435)
        bpf_map_delete_elem(&clone_flags, &tid);
    return 0;
}
