/*
 * What the eBPF program hands its loader through the ring buffer: one fixed-size struct per
 * line of the tracer's output (see loader.c for the lines).  Shared by tracer.bpf.c and
 * loader.c.
 */
#ifndef AFTERCLOSE_EBPF_RECORD_H
#define AFTERCLOSE_EBPF_RECORD_H

/* What a ring-buffer entry is; each is printed as one line of the output. */
enum ac_line {
    AC_LINE_RECORD = 1, /* op pid tid in out flags fd arg data events ret */
    AC_LINE_TRUNCATED,  /* T ret: a wait returned more events than the program reads */
    AC_LINE_EXEC,       /* X pid tid in */
    AC_LINE_EXIT,       /* E pid in: the last thread of a traced process exited */
    AC_LINE_REPEATS,    /* R tid data(count) in(first seq_in) out(last seq_out) ret extra */
};

struct ac_line_rec {
    __u32 line; /* enum ac_line */
    __s32 op;
    __u32 pid;
    __u32 tid;
    __u64 in;
    __u64 out;
    __s32 flags;
    __s32 fd;
    __s32 arg;
    __u32 events;
    __u64 data;
    __s64 ret;
    __u64 extra;
};

/* The program's switches, in its .bss (the loader sets them). */
struct ac_control {
    __u32 halt;     /* 1: print nothing more (the loader is draining the ring to stop) */
    __u32 dedup_io; /* 1: de-duplicate repeated I/O, MODs and waits (see tracer.bpf.c) */
};

/* Indices of the per-CPU counters. */
enum ac_counter {
    AC_PRINTED = 0, /* lines the program tried to hand over (lost ones included) */
    AC_LOST,        /* lines the ring buffer had no room for */
    AC_COUNTERS,
};

#endif
