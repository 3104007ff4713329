/*
 * threaded: a correct thread-per-connection HTTP server, one detached thread per accepted
 * connection, blocking I/O.  Used by tests/integration/process/test_thread_per_connection.py to
 * show that a trace keeps every record of a server that starts a thread per connection.
 *
 *   usage: threaded HOST PORT        (prints READY on stdout once listening)
 *
 * It answers "GET /path HTTP/1.x" with 200 and body "/path\n", keeps the connection alive
 * unless the request says otherwise, answers a malformed request with 400 and closes, and closes
 * every connection exactly once when its peer leaves.  SIGTERM/SIGINT exit 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFSZ 8192
#include "common.h"

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

/* Serve one connection until its peer leaves, then close it. */
static void *serve(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char buf[BUFSZ];
    size_t len = 0;
    for (;;) {
        char *end = memmem(buf, len, "\r\n\r\n", 4);
        if (end == NULL) {
            if (len == sizeof buf)
                break; /* header too large */
            ssize_t n = read(fd, buf + len, sizeof buf - len);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            len += (size_t)n;
            continue;
        }
        size_t head = (size_t)(end - buf) + 4;
        struct request rq;
        if (parse_request(buf, head, &rq) != 0 || rq.content_length > 0) {
            write_all(fd, RESP_400, sizeof RESP_400 - 1);
            break;
        }
        if (respond(fd, &rq) != 0 || rq.close)
            break;
        memmove(buf, buf + head, len - head);
        len -= head;
    }
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: accept returns EINTR and the loop ends */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int lfd = listen_on(argv[0], argv[1], argv[2]);
    if (lfd < 0)
        return 1;
    /* The listener is non-blocking (listen_on): make it blocking, one accept per connection. */
    int flags = fcntl(lfd, F_GETFL);
    fcntl(lfd, F_SETFL, flags & ~O_NONBLOCK);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    printf("READY\n");
    fflush(stdout);
    while (!stop_flag) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE) {
                usleep(10000);
                continue;
            }
            perror("accept4");
            return 1;
        }
        pthread_t th;
        int rc;
        while ((rc = pthread_create(&th, &attr, serve, (void *)(intptr_t)fd)) == EAGAIN)
            usleep(1000); /* thread limit: wait for connections to finish */
        if (rc != 0)
            close(fd);
    }
    close(lfd);
    return 0;
}
