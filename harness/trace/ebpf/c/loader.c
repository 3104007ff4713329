/*
 * afterclose-ebpf: loads tracer.bpf.o, traces the given processes and their children, and
 * prints what the program hands over as lines, until SIGINT or SIGTERM.
 *
 *     afterclose-ebpf OBJECT [--ring-kb N] [--map-keys N] [--all-io] PID...
 *
 * --ring-kb: the ring buffer's size (rounded up to a power of two pages); --map-keys: entries
 * of each hash map (threads, processes, fds); --all-io: no de-duplication (see tracer.bpf.c).
 *
 * Output (stdout, fully buffered; harness/trace/ebpf/output.py reads it):
 *
 *     B <ns>            every probe is attached (CLOCK_MONOTONIC, the program's clock)
 *     op pid tid in out flags fd arg data events ret      a record (see tracer.bpf.c)
 *     T <n>             a wait returned more events than the program reads
 *     X <pid> <tid> <ns>  a traced process called execve
 *     E <pid> <ns>      the last thread of a traced process exited
 *     R <tid> <count> <first_in> <last_out> <in> <out>   repeated waits (see tracer.bpf.c)
 *     S <ns>            the stop: the program prints nothing after this
 *     @wr[<tid>]: (<count>, <first_in>, <last_out>, <in>, <out>)   repeats not yet handed over
 *     Lost <n> events   lines the ring buffer had no room for
 *     @n: <n>           lines the program handed over, or tried to (the lost ones)
 *
 * Stopping: the signal sets the program's halt switch, then the loader reads the ring buffer
 * until it is empty, waits for probes already past the switch, reads it again, and prints the
 * counts.  Errors go to stderr, one line each, and exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/types.h>

#include "record.h"

#define POLL_MS 20
/* Probes already past the halt switch hand their lines over within microseconds, unless the
 * scheduler preempts one: a line handed over after the last read is still counted in @n, and
 * the harness reports it as not written out (the run's evidence is then incomplete). */
#define SETTLE_NS 20000000L

static volatile sig_atomic_t stopping;

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("afterclose-ebpf: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static unsigned long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static int print_libbpf(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    if (level == LIBBPF_DEBUG)
        return 0;
    return vfprintf(stderr, fmt, ap);
}

static unsigned long long lines_read;

static int on_line(void *ctx, void *data, size_t size)
{
    const struct ac_line_rec *r = data;
    (void)ctx;
    if (size < sizeof(*r))
        return 0;
    lines_read++;
    switch (r->line) {
    case AC_LINE_RECORD:
        printf("%d %u %u %llu %llu %d %d %d %llu %u %lld\n", r->op, r->pid, r->tid,
               (unsigned long long)r->in, (unsigned long long)r->out, r->flags, r->fd, r->arg,
               (unsigned long long)r->data, r->events, (long long)r->ret);
        break;
    case AC_LINE_TRUNCATED:
        printf("T %lld\n", (long long)r->ret);
        break;
    case AC_LINE_EXEC:
        printf("X %u %u %llu\n", r->pid, r->tid, (unsigned long long)r->in);
        break;
    case AC_LINE_EXIT:
        printf("E %u %llu\n", r->pid, (unsigned long long)r->in);
        break;
    case AC_LINE_REPEATS:
        printf("R %u %llu %llu %llu %llu %llu\n", r->tid, (unsigned long long)r->data,
               (unsigned long long)r->in, (unsigned long long)r->out,
               (unsigned long long)r->ret, (unsigned long long)r->extra);
        break;
    default:
        fprintf(stderr, "afterclose-ebpf: unknown line kind %u\n", r->line);
    }
    return 0;
}

static unsigned long number(const char *what, const char *text, unsigned long max)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(text, &end, 10);
    if (errno || *text == '\0' || *end != '\0' || v == 0 || v > max)
        fail("%s must be a whole number from 1 to %lu, not \"%s\"", what, max, text);
    return v;
}

static struct bpf_map *map_named(struct bpf_object *obj, const char *suffix)
{
    struct bpf_map *map;
    size_t n = strlen(suffix);
    bpf_object__for_each_map(map, obj)
    {
        const char *name = bpf_map__name(map);
        size_t len = strlen(name);
        if (len >= n && strcmp(name + len - n, suffix) == 0)
            return map;
    }
    fail("%s has no map named *%s", bpf_object__name(obj), suffix);
    return NULL;
}

static void print_pending_repeats(int fd)
{
    __u32 key, next;
    struct {
        __u64 count, first_in, last_out, in, out;
    } v;
    int have = bpf_map_get_next_key(fd, NULL, &next) == 0;
    while (have) {
        key = next;
        if (bpf_map_lookup_elem(fd, &key, &v) == 0 && v.count > 0)
            printf("@wr[%u]: (%llu, %llu, %llu, %llu, %llu)\n", key, (unsigned long long)v.count,
                   (unsigned long long)v.first_in, (unsigned long long)v.last_out,
                   (unsigned long long)v.in, (unsigned long long)v.out);
        have = bpf_map_get_next_key(fd, &key, &next) == 0;
    }
}

static unsigned long long counter(int fd, __u32 which, int cpus)
{
    __u64 values[cpus];
    unsigned long long sum = 0;
    if (bpf_map_lookup_elem(fd, &which, values) != 0)
        return 0;
    for (int i = 0; i < cpus; i++)
        sum += values[i];
    return sum;
}

int main(int argc, char **argv)
{
    unsigned long ring_kb = 16384, map_keys = 16384;
    int dedup_io = 1;
    const char *object = NULL;
    __u32 pids[4096];
    int npids = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--ring-kb") == 0 && i + 1 < argc)
            ring_kb = number("--ring-kb", argv[++i], 1ul << 22);
        else if (strcmp(argv[i], "--map-keys") == 0 && i + 1 < argc)
            map_keys = number("--map-keys", argv[++i], 1ul << 24);
        else if (strcmp(argv[i], "--all-io") == 0)
            dedup_io = 0;
        else if (!object)
            object = argv[i];
        else if (npids < (int)(sizeof(pids) / sizeof(pids[0])))
            pids[npids++] = (__u32)number("a pid", argv[i], INT_MAX);
        else
            fail("at most %zu pids", sizeof(pids) / sizeof(pids[0]));
    }
    if (!object || npids == 0)
        fail("usage: afterclose-ebpf OBJECT [--ring-kb N] [--map-keys N] [--all-io] PID...");
    /* The ring buffer's size is a power of two pages. */
    unsigned long ring = 4096;
    while (ring < ring_kb << 10)
        ring <<= 1;

    libbpf_set_print(print_libbpf);
    struct bpf_object *obj = bpf_object__open_file(object, NULL);
    if (!obj)
        fail("cannot open %s: %s", object, strerror(errno));
    struct bpf_map *map;
    bpf_object__for_each_map(map, obj)
    {
        if (bpf_map__type(map) == BPF_MAP_TYPE_HASH && bpf_map__set_max_entries(map, map_keys))
            fail("cannot size map %s", bpf_map__name(map));
    }
    if (bpf_map__set_max_entries(map_named(obj, "lines"), ring))
        fail("cannot size the ring buffer to %lu bytes", ring);
    struct bpf_map *bss = map_named(obj, ".bss");
    struct ac_control ctl = {.halt = 0, .dedup_io = (__u32)dedup_io};
    if (bpf_map__value_size(bss) != sizeof(ctl))
        fail("the program's .bss is %u bytes, not the %zu of struct ac_control",
             bpf_map__value_size(bss), sizeof(ctl));
    if (bpf_map__set_initial_value(bss, &ctl, sizeof(ctl)))
        fail("cannot set the program's switches");
    int err = bpf_object__load(obj);
    if (err)
        fail("cannot load %s into the kernel: %s (see the verifier's log above)", object,
             strerror(-err));
    int traced = bpf_map__fd(map_named(obj, "traced"));
    for (int i = 0; i < npids; i++) {
        __u8 one = 1;
        if (bpf_map_update_elem(traced, &pids[i], &one, BPF_ANY))
            fail("cannot add pid %u: %s", pids[i], strerror(errno));
    }
    struct ring_buffer *rb =
        ring_buffer__new(bpf_map__fd(map_named(obj, "lines")), on_line, NULL, NULL);
    if (!rb)
        fail("cannot open the ring buffer: %s", strerror(errno));

    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj)
    {
        if (!bpf_program__attach(prog))
            fail("cannot attach %s: %s", bpf_program__name(prog), strerror(errno));
    }
    static char outbuf[1 << 20];
    setvbuf(stdout, outbuf, _IOFBF, sizeof(outbuf));
    printf("B %llu\n", now_ns());
    fflush(stdout);

    while (!stopping) {
        err = ring_buffer__poll(rb, POLL_MS);
        if (err < 0 && err != -EINTR)
            fail("reading the ring buffer: %s", strerror(-err));
    }
    /* The stop: no line after the switch, all before it read out. */
    ctl.halt = 1;
    __u32 zero = 0;
    if (bpf_map_update_elem(bpf_map__fd(bss), &zero, &ctl, BPF_ANY))
        fail("cannot set the halt switch: %s", strerror(errno));
    unsigned long long halted = now_ns();
    while (ring_buffer__consume(rb) > 0)
        ;
    struct timespec settle = {0, SETTLE_NS};
    nanosleep(&settle, NULL);
    while (ring_buffer__consume(rb) > 0)
        ;
    printf("S %llu\n", halted);
    print_pending_repeats(bpf_map__fd(map_named(obj, "repeats")));
    int cpus = libbpf_num_possible_cpus();
    if (cpus <= 0)
        fail("cannot count the CPUs: %s", strerror(-cpus));
    int counters = bpf_map__fd(map_named(obj, "counters"));
    unsigned long long lost = counter(counters, AC_LOST, cpus);
    if (lost)
        printf("Lost %llu events\n", lost);
    printf("@n: %llu\n", counter(counters, AC_PRINTED, cpus));
    if (fflush(stdout) != 0)
        fail("cannot write the output: %s", strerror(errno));
    ring_buffer__free(rb);
    bpf_object__close(obj);
    return 0;
}
