/* What afterclose's small C test servers (tests/servers, tests/lifecycle) share: the HTTP,
 * listening and event-loop code of the built-in servers (targets/seed-common/http_server.h), a
 * blocking answer on a non-blocking socket, and the start of main().  Include it after defining
 * _GNU_SOURCE and BUFSZ. */
#ifndef AFTERCLOSE_TEST_SERVERS_COMMON_H
#define AFTERCLOSE_TEST_SERVERS_COMMON_H

#include <pthread.h>
#include <stdlib.h>

#include "../../targets/seed-common/http_server.h"

#ifndef BUFSZ
#error "define BUFSZ (the request buffer's size) before including common.h"
#endif

/* Write all of [p, p+n) with send(MSG_NOSIGNAL), waiting up to 1 s whenever the socket buffer
 * is full.  -1 if the connection broke or the client stopped reading. */
HTTP_SERVER_HELPER int write_all(int fd, const char *p, size_t n)
{
    return write_all_via(fd, p, n, VIA_SEND);
}

/* The answer to rq: 200, the path and a newline as the body. */
HTTP_SERVER_HELPER int respond(int fd, const struct request *rq)
{
    char out[BUFSZ + 256];
    int n = format_response(out, sizeof out, rq);
    return n < 0 ? -1 : write_all(fd, out, (size_t)n);
}

#define COUNT_OF(array) (sizeof(array) / sizeof((array)[0]))

/* The start of main() for "PROG HOST PORT MODE", MODE one of the N names in MODES (indexed by
 * the server's enum mode): *mode, SIGTERM/SIGINT to stop_flag, SIGPIPE ignored, and *lfd
 * listening on HOST:PORT.  0, or main()'s exit status after a message. */
HTTP_SERVER_HELPER int test_server_start(int argc, char **argv, const char *prog,
                                         const char *const modes[], size_t n, int *mode,
                                         int *lfd)
{
    size_t i;

    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST PORT ", argv[0]);
        for (i = 0; i < n; i++)
            fprintf(stderr, "%s%s", i ? "|" : "", modes[i]);
        fprintf(stderr, "\n");
        return 2;
    }
    for (i = 0; i < n; i++)
        if (strcmp(argv[3], modes[i]) == 0)
            break;
    if (i == n) {
        fprintf(stderr, "%s: unknown mode %s\n", prog, argv[3]);
        return 2;
    }
    *mode = (int)i;
    stop_on_signals();
    *lfd = listen_on(prog, argv[1], argv[2]);
    return *lfd < 0 ? 1 : 0;
}

/* Start FN on a thread that never takes signals, so that SIGTERM interrupts the main thread's
 * epoll_wait.  -1 after a message if it cannot start. */
HTTP_SERVER_HELPER int start_signal_free_thread(void *(*fn)(void *))
{
    sigset_t all, old;
    pthread_t thread;
    int rc;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&thread, NULL, fn, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        fprintf(stderr, "pthread_create: %s\n", strerror(rc));
        return -1;
    }
    return 0;
}

/* ---- the single-threaded test servers (tests/servers): a connection per fd number -------- */

/* A connection found by its fd number in a table; it is watched level-triggered, EPOLLIN, with
 * data.fd. */
struct fd_conn {
    char buf[BUFSZ];
    size_t len;
};

/* Keep the accepted FD as a new, empty connection in table[fd] and watch it.  -1, FD closed,
 * when the table (MAX entries) has no room for it or memory is short. */
HTTP_SERVER_HELPER int fd_conn_add(struct fd_conn **table, int max, int epfd, int fd)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};

    if (fd >= max || !(table[fd] = calloc(1, sizeof **table))) {
        close(fd);
        return -1;
    }
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

/* Stop watching FD and free its connection; the fd itself stays open. */
HTTP_SERVER_HELPER void fd_conn_forget(struct fd_conn **table, int epfd, int fd)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    free(table[fd]);
    table[fd] = NULL;
}

#endif
