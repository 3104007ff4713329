/*
 * real.c - the libc functions the wrappers stand in front of, found with dlsym(RTLD_NEXT) on
 * first use, and the library's constructor.
 */
#include "shim.h"

#define X_DEF(name, type) type real_##name;
REAL_LIST(X_DEF)
#undef X_DEF
fn_free real_free;

void *resolve(const char *name)
{
    int saved = t.inside;
    t.inside = 1;
    void *p = dlsym(RTLD_NEXT, name);
    t.inside = saved;
    return p;
}

#define X_RESOLVER(name, type)                                                                \
    __attribute__((noinline)) type real_resolve_##name(void)                                  \
    {                                                                                          \
        type p;                                                                                \
        void *sym = resolve(#name);                                                            \
        memcpy(&p, &sym, sizeof p);                                                            \
        __atomic_store_n(&real_##name, p, __ATOMIC_RELAXED);                                   \
        return p;                                                                              \
    }
REAL_LIST(X_RESOLVER)
#undef X_RESOLVER

__attribute__((constructor)) static void ac_constructor(void)
{
    (void)REAL(close); /* warm the most common pointers outside any hot path */
    (void)REAL(read);
    (void)REAL(write);
    pt_get();
    ensure_init();
}
