/*
 * zoo_queue.h: a growing FIFO of pointers shared by threads (mutex + condition variable).
 */
#ifndef ZOO_QUEUE_H
#define ZOO_QUEUE_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

struct zq_item {
    void *p;
    uint32_t events;
};

struct zq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct zq_item *items;
    size_t cap, head, n;
    int closed;
};

static inline void zq_init(struct zq *q)
{
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->cap = 1024;
    q->items = malloc(q->cap * sizeof *q->items);
    if (!q->items)
        abort();
}

static inline void zq_push(struct zq *q, void *p, uint32_t events)
{
    pthread_mutex_lock(&q->mu);
    if (q->n == q->cap) {
        size_t ncap = q->cap * 2;
        struct zq_item *ni = malloc(ncap * sizeof *ni);
        if (!ni)
            abort();
        for (size_t i = 0; i < q->n; i++)
            ni[i] = q->items[(q->head + i) % q->cap];
        free(q->items);
        q->items = ni;
        q->cap = ncap;
        q->head = 0;
    }
    q->items[(q->head + q->n) % q->cap] = (struct zq_item){p, events};
    q->n++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

/* 1: *out holds the next item; 0: the queue was closed. */
static inline int zq_pop(struct zq *q, struct zq_item *out)
{
    pthread_mutex_lock(&q->mu);
    while (q->n == 0 && !q->closed)
        pthread_cond_wait(&q->cv, &q->mu);
    if (q->closed) {
        pthread_mutex_unlock(&q->mu);
        return 0;
    }
    *out = q->items[q->head];
    q->head = (q->head + 1) % q->cap;
    q->n--;
    pthread_mutex_unlock(&q->mu);
    return 1;
}

static inline void zq_close(struct zq *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

#endif
