/*
 * perturb.c - what syscall faults (faults.c) and chaos (chaos.c) share: the environment, read
 * once per process image, and the per-thread PRNG streams both draw from.
 *
 * The values come validated and encoded from harness/syscall_faults.py; the shim parses no user
 * syntax.  A malformed value prints one line to stderr and turns that perturbation off (tracing
 * goes on).
 *
 * Reproducibility: AFTERCLOSE_FAULT_SEED (u64, default 0) seeds per-thread streams: the
 * process's first thread is ordinal 0, the n-th thread made by pthread_create (wrapped while a
 * perturbation is on) ordinal n; threads made otherwise get ordinals in order of first use.  A
 * fork child starts a new lineage from the parent's and its fork count.  A single-threaded
 * program therefore sees the same faults for the same seed; a multi-threaded one the same per
 * thread as far as the scheduler lets the calls themselves repeat.  Faults and chaos draw from
 * separate streams: turning chaos on does not move the faults.
 */
#include "shim.h"

unsigned g_pt;
uint64_t g_thread_next;
uint64_t g_forks;
static uint64_t g_seed;
static uint64_t g_lineage;      /* 0 in the first image; derived anew in each fork child */
static uint64_t g_foreign_next; /* ordinals of threads first seen without one */

/* One line on stderr: "afterclose-shim: WHAT disabled: VAR: PROBLEM 'ITEM'HINT". */
void pt_complain(const char *what, const char *var, const char *problem, const char *item,
                 size_t item_len, const char *hint)
{
    char msg[1024];
    size_t pos = 0;
    put_strs(msg, sizeof msg, &pos, "afterclose-shim: ", what, " disabled: ", var, ": ",
             problem, " '", (char *)NULL);
    put_mem(msg, sizeof msg, &pos, item, item_len);
    put_str(msg, sizeof msg, &pos, "'");
    if (hint) {
        put_str(msg, sizeof msg, &pos, " ");
        put_str(msg, sizeof msg, &pos, hint);
    }
    put_str(msg, sizeof msg, &pos, "\n");
    syscall(SYS_write, 2, msg, pos);
}

/* Read the environment once per process image.  Calls can arrive before our constructor, so
 * this runs lazily like ensure_init; a thread racing with the initialising one waits. */
__attribute__((noinline)) unsigned pt_init(void)
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
    if (seed_ok && faults && *faults)
        pt |= faults_setup(faults);
    if (seed_ok && chaos && *chaos)
        pt |= chaos_setup(chaos);
    if (pt & PT_ANY)
        atfork_once(); /* a fork child must start its own lineage of streams */
    __atomic_store_n(&g_pt, pt | PT_READY, __ATOMIC_RELEASE);
    t.pt_initialising = 0;
    errno = saved_errno;
    return pt | PT_READY;
}

static inline uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__attribute__((noinline)) void rng_setup(void)
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
void pt_child(void)
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
