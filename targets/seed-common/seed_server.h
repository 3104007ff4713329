/* What seed-buggy and seed-fixed share besides HTTP (http_server.h): the architecture.  An
 * epoll thread accepts and queues client events to NWORKERS workers; a separate error thread
 * gets malformed requests through its own queue.  Each seed brings its own connection type,
 * workers, error thread and accepting; the queues, the globals, main()'s start-up and the epoll
 * thread's loop are here.  Include it after defining _GNU_SOURCE. */
#ifndef AFTERCLOSE_SEED_SERVER_H
#define AFTERCLOSE_SEED_SERVER_H

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "../common/queue.h"
#include "http_server.h"

#define NWORKERS 4
#define MAXEVENTS 256
#define BUFSZ 8192

/* ---- start-up --------------------------------------------------------------------------- */

static int epfd = -1;
static int lfd = -1;
static char listener_tag;
static struct queue work_q, error_q;

struct seed_threads {
    void *(*worker_main)(void *);
    void *(*error_main)(void *);
    void *(*epoll_main)(void *);
    pthread_t workers[NWORKERS], error_thread, epoll_thread;
};

/* main() up to the seed's own ending: signals, the listener, epoll, the queues, the threads,
 * READY on stdout.  Returns 0 once the epoll thread ended (SIGTERM/SIGINT), else the exit
 * status of a failed start. */
static int seed_serve(int argc, char **argv, const char *prog, struct seed_threads *t)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    stop_on_signals();
    lfd = listen_on(prog, argv[1], argv[2]);
    if (lfd < 0)
        return 1;
    epfd = epoll_watching("epoll", lfd, (epoll_data_t){.ptr = &listener_tag});
    if (epfd < 0)
        return 1;
    queue_init(&work_q);
    queue_init(&error_q);
    /* The stop signals go to the epoll thread alone: a signal the kernel hands to any other
     * thread leaves epoll_wait asleep, and the loop sees stop_flag only when its 300 ms
     * timeout ends.  Threads inherit their creator's mask. */
    sigset_t stop_signals, unblocked;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, &unblocked);
    for (int i = 0; i < NWORKERS; i++)
        pthread_create(&t->workers[i], NULL, t->worker_main, NULL);
    pthread_create(&t->error_thread, NULL, t->error_main, NULL);
    pthread_sigmask(SIG_SETMASK, &unblocked, NULL);
    pthread_create(&t->epoll_thread, NULL, t->epoll_main, NULL);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    printf("READY\n");
    fflush(stdout);

    pthread_join(t->epoll_thread, NULL);
    return 0;
}

/* ---- the epoll thread ------------------------------------------------------------------- */

/* The epoll thread's loop, until SIGTERM/SIGINT: an event for the listener calls ACCEPT_ALL,
 * every other one goes to the workers' queue, and UNQUEUED gets the connection of an event
 * the queue had no memory for.  Each epoll_wait sleeps at most 300 ms, or what SHORTEN makes
 * of that (NULL: 300).  At the end the queues close, which ends the workers and the error
 * thread. */
static void seed_epoll_loop(void (*accept_all)(void), int (*shorten)(int timeout),
                            void (*unqueued)(void *c))
{
    struct epoll_event events[MAXEVENTS];

    while (!stop_flag) {
        int n = epoll_wait(epfd, events, MAXEVENTS, shorten ? shorten(300) : 300);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == &listener_tag)
                accept_all();
            else if (queue_push(&work_q, events[i].data.ptr, events[i].events) < 0)
                unqueued(events[i].data.ptr);
        }
    }
    queue_close(&work_q);
    queue_close(&error_q);
}

#endif
