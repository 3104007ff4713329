/*
 * records.c - the trace file of one process image: set-up from the environment, the mapped
 * file and its chunks, the sequence counter shared by all traced processes, fork children and
 * the crash marker.  Layout: format.h, generated from harness/trace/format.py.
 *
 * Every traced call takes one number from a 64-bit counter shared by all traced processes
 * (seq.bin, mapped MAP_SHARED) before the real call and one after it, so "A.seq_out < B.seq_in"
 * proves A's syscall returned before B's began.
 */
#include "shim.h"

int g_state = ST_UNINIT;
struct ac_header *g_hdr;
char *g_chunks;
uint32_t g_chunk_records;
uint64_t *g_seq;
int g_free_on;
static size_t g_map_size;
static uint32_t g_n_chunks;
static size_t g_chunk_bytes;
static uint32_t g_pid;
static int g_warned;
static int g_atfork_done;

/* Chunks given back by threads that exited, with room left (see release_chunks).  Process-local:
 * a fork child starts a file of its own, so it drops the list with the parent's mapping. */
static uint32_t *g_spare;      /* stack of chunk indices, n_chunks entries (anonymous mapping) */
static uint32_t g_spare_n;
static size_t g_spare_size;
static int g_spare_lock;
static pthread_key_t g_exit_key;
static int g_exit_key_ok;

TLS struct tstate t;

static void crash_handler(int sig, siginfo_t *si, void *uc);
static void atfork_child(void);
static void release_chunks(void *arg);

/* ------------------------------------------------------------------ small helpers -- */

static long raw_open(const char *path, int flags, int mode)
{
    return syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}

static void raw_close(int fd)
{
    syscall(SYS_close, fd);
}

void put_str(char *buf, size_t cap, size_t *pos, const char *s)
{
    while (*s && *pos + 1 < cap)
        buf[(*pos)++] = *s++;
    buf[*pos] = '\0';
}

void put_strs(char *buf, size_t cap, size_t *pos, ...)
{
    va_list ap;
    va_start(ap, pos);
    for (const char *s = va_arg(ap, const char *); s; s = va_arg(ap, const char *))
        put_str(buf, cap, pos, s);
    va_end(ap);
}

void put_u64(char *buf, size_t cap, size_t *pos, uint64_t v)
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

void put_mem(char *buf, size_t cap, size_t *pos, const char *s, size_t n)
{
    for (size_t i = 0; i < n && *pos + 1 < cap; i++)
        buf[(*pos)++] = s[i];
    buf[*pos] = '\0';
}

int parse_u64(const char *s, uint64_t *out)
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

void atfork_once(void)
{
    if (!__atomic_exchange_n(&g_atfork_done, 1, __ATOMIC_ACQ_REL))
        pthread_atfork(NULL, NULL, atfork_child);
}

/* ---------------------------------------------------------------------- set-up -- */

static int map_seq(const char *dir)
{
    if (g_seq)
        return 1;
    char path[4096];
    size_t pos = 0;
    put_str(path, sizeof path, &pos, dir);
    put_str(path, sizeof path, &pos, "/" AC_SEQ_FILE);
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
    uint64_t mb = env_u64("AFTERCLOSE_TRACE_MB", AC_DEFAULT_TRACE_MB, 1, 1u << 20);
    uint64_t cr = env_u64("AFTERCLOSE_TRACE_CHUNK", AC_DEFAULT_CHUNK_RECORDS, 1, 1u << 24);
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
        put_strs(path, sizeof path, &pos, dir, "/trace.", (char *)NULL);
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
    g_spare_n = 0;
    __atomic_store_n(&g_spare_lock, 0, __ATOMIC_RELEASE);
    g_spare_size = ((size_t)n_chunks * sizeof(uint32_t) + 4095) & ~(size_t)4095;
    void *sp = mmap(NULL, g_spare_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* Without it, chunks are simply never given back (the design before reuse). */
    g_spare = sp == MAP_FAILED ? NULL : sp;
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
__attribute__((noinline)) int ensure_init(void)
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
        /* A thread's chunks go back to the file when it exits (release_chunks), so the file
         * fills with records, not with one chunk per thread a thread-per-connection server
         * ever started.  Keys survive fork, so once per process image. */
        g_exit_key_ok = pthread_key_create(&g_exit_key, release_chunks) == 0;
        atfork_once();
        install_crash_handlers();
        __atomic_store_n(&g_state, ST_ON, __ATOMIC_RELEASE);
    }
    t.inside = 0;
    errno = saved_errno;
    return ok;
}


/* Runs in the child of fork()/_Fork(), before any user code: the child holds the parent's
 * MAP_SHARED mapping and the parent's thread-local chunk, neither of which it may touch. */
void child_reset(void)
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
    if (g_spare) {
        munmap(g_spare, g_spare_size);
        g_spare = NULL;
    }
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

/* -------------------------------------------------------------- process exit -- */

/* The process is ending (exit(), a return from main, _exit()): the kernel is about to close
 * every fd it holds, so an fd still open in the trace after this point was not leaked.
 * Other threads may still record after it; their records carry later numbers. */
void mark_exit(void)
{
    struct ac_header *h = g_hdr;
    if (!h || __atomic_load_n(&g_state, __ATOMIC_ACQUIRE) != ST_ON)
        return;
    if (__atomic_load_n(&h->flags, __ATOMIC_RELAXED) & FLAG_EXITED)
        return;
    __atomic_store_n(&h->exit_seq, seq_next(), __ATOMIC_RELAXED);
    __atomic_fetch_or(&h->flags, (uint32_t)FLAG_EXITED, __ATOMIC_RELEASE);
}

/* exit() runs the library destructors; _exit() does not (wrappers.c marks it there). */
__attribute__((destructor)) static void ac_destructor(void)
{
    mark_exit();
}

/* -------------------------------------------------------------------- chunks -- */

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

void lose(void)
{
    struct ac_header *h = g_hdr;
    if (h)
        __atomic_fetch_add(&h->lost_records, 1, __ATOMIC_RELAXED);
}

static void spare_lock(void)
{
    while (__atomic_exchange_n(&g_spare_lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void spare_unlock(void)
{
    __atomic_store_n(&g_spare_lock, 0, __ATOMIC_RELEASE);
}

/* Ask for release_chunks at this thread's exit.  The value only has to be non-NULL; a key
 * below PTHREAD_KEY_2NDLEVEL_SIZE (32) is a store into the thread descriptor, no allocation. */
static void watch_exit(void)
{
    if (g_exit_key_ok && !t.exit_watched) {
        t.exit_watched = 1;
        pthread_setspecific(g_exit_key, (void *)1);
    }
}

/* The thread is exiting (a pthread key destructor: after its start routine returned or it
 * called pthread_exit; not at exit() or a fatal signal, when the process goes anyway).  Its
 * chunks go on the spare stack with what they hold: the next owner appends after the last
 * published record, so the reader, which trusts each chunk's count, needs no marker for an
 * unused tail.  Signals are blocked so that no handler writes into a chunk while it changes
 * hands.  A traced call made later in the exit path takes a chunk again and re-arms the key
 * (glibc runs destructors again, up to PTHREAD_DESTRUCTOR_ITERATIONS rounds). */
static void release_chunks(void *arg)
{
    (void)arg;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    t.exit_watched = 0;
    if (t.depth == 0 && g_spare && g_hdr) {
        spare_lock();
        for (int d = 0; d < LEVELS; d++) {
            struct tlevel *lv = &t.lv[d];
            if (lv->chunk && lv->used < g_chunk_records && g_spare_n < g_n_chunks)
                g_spare[g_spare_n++] = (uint32_t)(((char *)lv->chunk - g_chunks) / g_chunk_bytes);
            lv->chunk = NULL;
            lv->used = 0;
        }
        spare_unlock();
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

static struct ac_chunk *take_spare(struct tlevel *lv)
{
    if (!g_spare || __atomic_load_n(&g_spare_n, __ATOMIC_RELAXED) == 0)
        return NULL;
    /* A handler on this thread that took a chunk while we hold the lock would spin forever. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    struct ac_chunk *ch = NULL;
    spare_lock();
    if (g_spare_n)
        ch = (struct ac_chunk *)(g_chunks + (size_t)g_spare[--g_spare_n] * g_chunk_bytes);
    spare_unlock();
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (!ch)
        return NULL;
    lv->used = (uint32_t)__atomic_load_n(&ch->count, __ATOMIC_ACQUIRE);
    ch->tid = cur_tid();
    lv->chunk = ch;
    watch_exit();
    return ch;
}

__attribute__((noinline)) struct ac_chunk *take_chunk(struct tlevel *lv)
{
    struct ac_header *h = g_hdr;
    lv->chunk = NULL;
    lv->used = 0;
    struct ac_chunk *spare = take_spare(lv);
    if (spare)
        return spare;
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
    watch_exit();
    return ch;
}
