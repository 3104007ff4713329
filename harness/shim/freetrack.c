/*
 * freetrack.c - free() of pointers that were once epoll data (the FREE records the free()
 * rules read).  Every epoll data value ever passed to ADD/MOD goes into an open-addressing
 * table (never deleted); free() records the pointers it finds there and passes every other
 * one straight through.
 *
 * The table is 8 MiB: a probe of it is a cache and TLB miss (hundreds of cycles in a VM).  Two
 * small filters keep the probes off the hot paths, and both can only say "look in the table":
 *  - a bitmap of 64 KiB (one bit per hash, set before the key is stored, never cleared) that
 *    free() checks first: most pointers freed were never epoll data and stop there;
 *  - a per-thread cache (256 keys, two-way) of keys this thread found or stored in the
 *    table: a server that re-arms a connection (EPOLL_CTL_MOD with the same data on every
 *    request) finds it there.  Keys are never deleted, so a cached key is always in the
 *    table; a fork child's copies of the table, the bitmap and the forking thread's cache
 *    agree.
 */
#include "shim.h"

#define FT_MAX_PROBE 4096u
#define FT_BITS (1u << 19)
static uint64_t *g_ft;
static uint64_t g_ft_bits[FT_BITS / 64];
uint64_t g_ft_used;

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

/* The bitmap's bit for hash h: bits of h the table's slot index does not use. */
static inline uint64_t *ft_word(uint64_t h, uint64_t *bit)
{
    uint32_t b = (uint32_t)(h >> 40) & (FT_BITS - 1);
    *bit = 1ull << (b & 63);
    return &g_ft_bits[b / 64];
}

/* This thread's cache: two-way sets (heap pointers a fixed stride apart collide often in a
 * direct-mapped one), the most recent key first; Fibonacci hashing picks the set. */
static inline uint64_t *ft_cache_set(uint64_t key)
{
    return &t.ft_cache[((key * 0x9e3779b97f4a7c15ull) >> (64 - FT_CACHE_BITS)) & ~1ull];
}

static inline void ft_cache_put(uint64_t *set, uint64_t key)
{
    set[1] = set[0];
    set[0] = key;
}

void ft_insert(uint64_t key)
{
    if (!g_free_on || key == 0)
        return;
    uint64_t *cached = ft_cache_set(key);
    if (cached[0] == key || cached[1] == key)
        return;
    uint64_t *tab = ft_table();
    if (!tab) {
        ft_set_full();
        return;
    }
    uint64_t h = mix64(key), bit;
    uint64_t *word = ft_word(h, &bit);
    if (!(__atomic_load_n(word, __ATOMIC_RELAXED) & bit))
        __atomic_fetch_or(word, bit, __ATOMIC_RELEASE);
    uint32_t i = (uint32_t)h & (FT_SLOTS - 1);
    for (uint32_t n = 0; n < FT_MAX_PROBE; n++, i = (i + 1) & (FT_SLOTS - 1)) {
        uint64_t cur = __atomic_load_n(&tab[i], __ATOMIC_ACQUIRE);
        if (cur == key) {
            ft_cache_put(cached, key);
            return;
        }
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
            ft_cache_put(cached, key);
            return;
        }
        if (cur == key) { /* another thread inserted the same key into this slot */
            ft_cache_put(cached, key);
            return;
        }
    }
    ft_set_full();
}

static inline int ft_contains(uint64_t key)
{
    uint64_t *tab = __atomic_load_n(&g_ft, __ATOMIC_ACQUIRE);
    if (!tab)
        return 0;
    uint64_t h = mix64(key), bit;
    if (!(__atomic_load_n(ft_word(h, &bit), __ATOMIC_ACQUIRE) & bit))
        return 0;
    uint32_t i = (uint32_t)h & (FT_SLOTS - 1);
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
