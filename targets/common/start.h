/* What every C target (the seeds, the static pair, the zoo and afterclose's own test servers)
 * does at start-up: the stop signals and the listening socket. */
#ifndef AFTERCLOSE_START_H
#define AFTERCLOSE_START_H

#include <errno.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop_flag;

static inline void on_stop_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

/* SIGTERM and SIGINT set stop_flag, which ends the server's loop; SIGPIPE is ignored, so that a
 * write to a reset connection fails with EPIPE instead of killing the server. */
static inline void stop_on_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* The listening socket: non-blocking, close-on-exec, SO_REUSEADDR, backlog 1024, on the first
 * address HOST:PORT resolves to that binds.  -1 (with a message naming PROG) if none does. */
static inline int listen_on(const char *prog, const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res, *ai;
    int fd = -1, one = 1, rc = getaddrinfo(host, port, &hints, &res);

    if (rc != 0) {
        fprintf(stderr, "%s: %s:%s: %s\n", prog, host, port, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 1024) == 0)
            break;
        close(fd);
        fd = -1;
    }
    if (fd < 0)
        fprintf(stderr, "%s: cannot listen on %s:%s: %s\n", prog, host, port, strerror(errno));
    freeaddrinfo(res);
    return fd;
}

#endif
