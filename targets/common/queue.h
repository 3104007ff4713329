/* A growing FIFO of (connection, events) items shared by threads (mutex + condition
 * variable): the seeds' work and error queues and the zoo's worker queues. */
#ifndef AFTERCLOSE_QUEUE_H
#define AFTERCLOSE_QUEUE_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

struct item {
    void *c; /* the server's connection */
    uint32_t events;
};

struct queue {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct item *items;
    size_t cap, head, n;
    int closed;
};

static inline void queue_init(struct queue *q)
{
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->cap = 1024;
    q->items = malloc(q->cap * sizeof *q->items);
    if (!q->items) {
        perror("malloc");
        exit(1);
    }
}

/* -1: out of memory, nothing queued. */
static inline int queue_push(struct queue *q, void *c, uint32_t events)
{
    pthread_mutex_lock(&q->mu);
    if (q->n == q->cap) {
        size_t ncap = q->cap * 2;
        struct item *ni = malloc(ncap * sizeof *ni);
        if (!ni) {
            pthread_mutex_unlock(&q->mu);
            return -1;
        }
        for (size_t i = 0; i < q->n; i++)
            ni[i] = q->items[(q->head + i) % q->cap];
        free(q->items);
        q->items = ni;
        q->cap = ncap;
        q->head = 0;
    }
    q->items[(q->head + q->n) % q->cap] = (struct item){c, events};
    q->n++;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    return 0;
}

static inline int queue_pop(struct queue *q, struct item *out)
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

static inline void queue_close(struct queue *q)
{
    pthread_mutex_lock(&q->mu);
    q->closed = 1;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

#endif
