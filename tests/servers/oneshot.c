/*
 * oneshot: a correct pre-forking HTTP server whose workers each serve one connection and then
 * exit without closing it (the kernel closes every fd of a process that exits).  Used by
 * tests/integration/ebpf/test_exited_process.py: a process that exits holding a connection whose
 * peer is gone has not leaked it.
 *
 *   usage: oneshot HOST PORT         (prints READY on stdout once listening)
 *
 * The parent listens and keeps WORKERS workers alive, forking a new one whenever one exits.  A
 * worker accepts one connection, answers "GET /path HTTP/1.x" with 200 and body "/path\n" until
 * the peer leaves (read returns 0 or fails) or asks to close, then exits holding the
 * connection.  SIGTERM/SIGINT: the parent stops its workers and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUFSZ 8192
#include "common.h"

#define WORKERS 4

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void serve_one(int lfd)
{
    int fd;
    do
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    while (fd < 0 && (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN));
    if (fd < 0)
        _exit(1);
    char buf[BUFSZ];
    size_t len = 0;
    for (;;) {
        char *end = memmem(buf, len, "\r\n\r\n", 4);
        if (end == NULL) {
            if (len == sizeof buf)
                break;
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
    _exit(0); /* fd is still open: exit closes it */
}

static pid_t start_worker(int lfd)
{
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        serve_one(lfd);
    }
    return pid;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int lfd = listen_on(argv[0], argv[1], argv[2]);
    if (lfd < 0)
        return 1;
    /* Blocking accept in the workers: they sleep in the kernel until a client comes. */
    fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) & ~O_NONBLOCK);
    pid_t workers[WORKERS];
    for (int i = 0; i < WORKERS; i++)
        workers[i] = start_worker(lfd);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: waitpid returns EINTR and the loop ends */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("READY\n");
    fflush(stdout);
    while (!stop_flag) {
        pid_t done = waitpid(-1, NULL, 0);
        if (done < 0)
            continue;
        for (int i = 0; i < WORKERS; i++)
            if (workers[i] == done)
                workers[i] = start_worker(lfd);
    }
    for (int i = 0; i < WORKERS; i++)
        if (workers[i] > 0)
            kill(workers[i], SIGTERM);
    while (waitpid(-1, NULL, 0) > 0)
        ;
    return 0;
}
