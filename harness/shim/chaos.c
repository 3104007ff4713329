/*
 * chaos.c - schedule perturbation.  AFTERCLOSE_CHAOS is a level L from 0 to AC_CHAOS_MAX (the
 * names of --chaos are turned into levels by harness/syscall_faults.py): with probability L*5 %
 * a thread is held up for up to L*20 us at the points where lifecycle races live: after
 * epoll_wait returned events (before the caller sees them), before close, before epoll_ctl, and
 * after a read returned 0 (before the caller reacts to the EOF).  A quarter of the holds are
 * sched_yield() ("preempted right here": cheap, and it lets another runnable thread on this CPU
 * go first); the rest are delays of 1 us..L*20 us.  A delay under 50 us busy-waits on the vDSO
 * clock, because nanosleep cannot sleep that short: the default timer slack alone is 50 us.
 * Longer ones nanosleep, which really deschedules the thread so others run on its CPU (a
 * busy-wait would hold the CPU the racing thread needs).  Raw syscalls: no cancellation point,
 * no interposer in between.  Delays sit outside the call's seq_in..seq_out window, so the
 * trace's happens-before facts are unchanged.
 */
#include "shim.h"

static uint64_t g_chaos_p;      /* threshold on a 32-bit draw */
static uint64_t g_chaos_max_ns; /* longest delay */
#define CHAOS_SPIN_NS 50000ull  /* below this a delay busy-waits (default timer slack) */

unsigned chaos_setup(const char *level)
{
    uint64_t n;
    if (!parse_u64(level, &n) || n > AC_CHAOS_MAX) {
        pt_complain("chaos", "AFTERCLOSE_CHAOS", "unknown level", level, strlen(level),
                    "(a level from 0 to " AC_STR(AC_CHAOS_MAX)
                    ", as harness/syscall_faults.py writes it)");
        return 0;
    }
    if (n == 0)
        return 0;
    g_chaos_p = AC_FAULT_ONE * n * 5 / 100;
    g_chaos_max_ns = n * 20000;
    return PT_CHAOS;
}

static void chaos_spin(uint64_t ns)
{
    uint64_t until = now_ns() + ns;
    while (now_ns() < until)
        ;
}

__attribute__((noinline)) void chaos_roll(void)
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
