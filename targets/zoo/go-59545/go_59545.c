/*
 * go-59545: a recycled poll descriptor delivers the previous fd's events to the new fd.
 *
 *   usage: go_59545 HOST PORT      (prints READY on stdout once listening)
 *
 * A Go-runtime-like netpoller: NTHREADS threads all wait on one epoll instance (edge
 * triggered, no EPOLLONESHOT) and each handles the events of its own batch.  Every
 * connection has a poll descriptor (struct pd: the fd, its HTTP state, a mutex); descriptors
 * are never freed but recycled through a LIFO free list, and the epoll data of a
 * registration is the descriptor's address.  A descriptor's mutex serialises the threads
 * that hold events for it; the one that sees the connection end closes the fd and puts the
 * descriptor back on the free list, where the next accept (in any thread) takes it again.
 * Go's netpoller does not wait for a descriptor another goroutine is using: it marks the
 * parked goroutine runnable and the scheduler runs it later.  So a thread whose event finds
 * the descriptor busy handles it after PARK_US (a request and the FIN after it, two edges
 * that two threads took, are such a pair), by when the other thread may have closed the fd
 * and the next accept may have taken the descriptor again.
 *
 * The bug (ZOO_FIXED undefined): an event carries only the descriptor's address, with no
 * generation.  A thread that harvested an event for the old fd and waited for the descriptor
 * while another thread closed that fd and a third accepted a new one into the recycled
 * descriptor, then handles the old fd's event (its EPOLLERR, EPOLLHUP, EPOLLIN) on the new
 * fd: it reads from it, or tears the new connection down.
 *
 * The fix (ZOO_FIXED): as Go's fdseq tag, the descriptor's generation travels in the top
 * bits of the epoll data; an event whose generation is not the descriptor's is dropped.
 */
#include "../common/zoo_http.h"

#include <pthread.h>

#define NTHREADS 4
#define MAXEVENTS 64
#define TAG_LISTENER 1
#define PTR_MASK ((UINT64_C(1) << 48) - 1)
#define PARK_US 5000

struct pd {
    struct zh_conn z;
    pthread_mutex_t mu;
    uint16_t seq;  /* generation: bumped each time the descriptor is handed out */
    int closed;    /* on the free list */
    struct pd *next_free;
};

static int epfd = -1;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static struct pd *free_pds;
static pthread_mutex_t listener_mu = PTHREAD_MUTEX_INITIALIZER;
static struct zh_listener listener;

static struct pd *pd_get(void)
{
    struct pd *pd;
    pthread_mutex_lock(&pool_mu);
    pd = free_pds;
    if (pd)
        free_pds = pd->next_free;
    pthread_mutex_unlock(&pool_mu);
    if (!pd) {
        pd = calloc(1, sizeof *pd);
        if (!pd)
            return NULL;
        pthread_mutex_init(&pd->mu, NULL);
    }
    return pd;
}

static void pd_put(struct pd *pd)
{
    pthread_mutex_lock(&pool_mu);
    pd->next_free = free_pds;
    free_pds = pd;
    pthread_mutex_unlock(&pool_mu);
}

static uint64_t pd_data(const struct pd *pd)
{
#ifdef ZOO_FIXED
    return (uint64_t)(uintptr_t)pd | (uint64_t)pd->seq << 48;
#else
    return (uint64_t)(uintptr_t)pd;
#endif
}

/* Called with pd->mu held. */
static void pd_close(struct pd *pd)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, pd->z.fd, NULL);
    close(pd->z.fd);
    zh_conn_release(&pd->z);
    pd->closed = 1;
    pd_put(pd);
}

static void on_event(uint64_t data, uint32_t events)
{
    struct pd *pd = (struct pd *)(uintptr_t)(data & PTR_MASK);
    if (pthread_mutex_trylock(&pd->mu) != 0) {
        zh_sleep_us(PARK_US); /* the goroutine runs later */
        pthread_mutex_lock(&pd->mu);
    }
#ifdef ZOO_FIXED
    if ((uint16_t)(data >> 48) != pd->seq) {
        pthread_mutex_unlock(&pd->mu); /* an event of an earlier incarnation */
        return;
    }
#endif
    if (!pd->closed && zh_handle(&pd->z, events) == ZH_CLOSE)
        pd_close(pd);
    pthread_mutex_unlock(&pd->mu);
}

static void accept_all(void)
{
    /* Waits for a thread that is accepting: the listener is level-triggered, so a thread that
     * went back to epoll_wait instead would get its event again at once, and spin. */
    pthread_mutex_lock(&listener_mu);
    int fd;
    while ((fd = zh_accept_next(&listener)) >= 0) {
        struct pd *pd = pd_get();
        if (!pd) {
            close(fd);
            continue;
        }
        pthread_mutex_lock(&pd->mu);
        zh_conn_init(&pd->z, fd);
        pd->seq++;
        pd->closed = 0;
        if (zh_watch(epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                     pd_data(pd)) < 0)
            pd_close(pd);
        pthread_mutex_unlock(&pd->mu);
    }
    pthread_mutex_unlock(&listener_mu);
}

static void *poller_main(void *arg)
{
    struct epoll_event events[MAXEVENTS];
    (void)arg;
    while (!stop_flag) {
        int timeout = 300, n;
        if (pthread_mutex_trylock(&listener_mu) == 0) {
            timeout = zh_listener_timeout(&listener, 300);
            pthread_mutex_unlock(&listener_mu);
        }
        n = zh_wait(epfd, events, MAXEVENTS, timeout);
        if (n < 0)
            break;
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == TAG_LISTENER)
                accept_all();
            else
                on_event(events[i].data.u64, events[i].events);
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t threads[NTHREADS];
    int lfd = zh_start(argc, argv);

    epfd = zh_epoll(&listener, lfd, TAG_LISTENER);
    for (int i = 0; i < NTHREADS; i++)
        pthread_create(&threads[i], NULL, poller_main, NULL);
    zh_ready();
    for (int i = 0; i < NTHREADS; i++)
        pthread_join(threads[i], NULL);
    return 0;
}
