/* Chaos probe: N epoll_wait calls that return an event at once (a chaos point after each) and
 * N close() calls (a chaos point before each); prints the time they took in ns. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static long long now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    int efd = eventfd(1, 0); /* readable for ever: level-triggered waits return at once */
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 1}, out[1];
    epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
    long long t0 = now();
    int events = 0;
    for (int i = 0; i < n; i++)
        events += epoll_wait(ep, out, 1, 1000);
    long long t1 = now();
    for (int i = 0; i < n; i++)
        close(dup(efd));
    long long t2 = now();
    printf("waits=%d\nevents=%d\nwait_ns=%lld\nclose_ns=%lld\n", n, events, t1 - t0, t2 - t1);
    return 0;
}
