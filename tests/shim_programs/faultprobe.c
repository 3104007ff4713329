/* Syscall-fault probe: one process plays server (through libc, so the shim sees and may fault
 * its calls) and client (raw syscalls, never faulted).  Prints key=value counts.
 *
 *   faultprobe PHASE N     PHASE: accept, wait, read, write, blocking, edge, all
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static int listener(struct sockaddr_in *addr)
{
    socklen_t len = sizeof *addr;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    memset(addr, 0, sizeof *addr);
    addr->sin_family = AF_INET;
    addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)addr, sizeof *addr) || listen(fd, 64) ||
        getsockname(fd, (struct sockaddr *)addr, &len)) {
        perror("listen");
        exit(2);
    }
    return fd;
}

/* The client side: raw syscalls only. */
static int raw_connect(const struct sockaddr_in *addr)
{
    int fd = (int)syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || syscall(SYS_connect, fd, addr, sizeof *addr) != 0) {
        perror("connect");
        exit(2);
    }
    return fd;
}

static void raw_send_all(int fd, const char *p, size_t n)
{
    while (n) {
        long w = syscall(SYS_sendto, fd, p, n, MSG_NOSIGNAL, NULL, 0);
        if (w <= 0) {
            perror("client send");
            exit(2);
        }
        p += w;
        n -= (size_t)w;
    }
}

static long raw_drain(int fd)
{
    char buf[65536];
    long total = 0;
    for (;;) {
        long r = syscall(SYS_recvfrom, fd, buf, sizeof buf, MSG_DONTWAIT, NULL, 0);
        if (r <= 0)
            return total;
        total += r;
    }
}

/* Accept one connection through libc, retrying through (injected) failures. */
static int accept_one(int lfd, int n)
{
    for (int i = 0; i < 100 * n + 1000; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (fd >= 0)
            return fd;
        if (errno == EAGAIN)
            usleep(1000);
    }
    return -1;
}

static void phase_accept(int lfd, const struct sockaddr_in *addr, int n)
{
    /* n connections queued, n accepts (each retried through injected failures) */
    int cl[64], got = 0;
    if (n > 64)
        n = 64;
    for (int i = 0; i < n; i++)
        cl[i] = raw_connect(addr);
    int emfile = 0, aborted = 0, other = 0;
    for (int tries = 0; got < n && tries < 100000; tries++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (fd >= 0) {
            got++;
            close(fd);
        } else if (errno == EMFILE) {
            emfile++;
        } else if (errno == ECONNABORTED) {
            aborted++;
        } else if (errno == EAGAIN) {
            usleep(1000);
        } else {
            other++;
        }
    }
    for (int i = 0; i < n; i++)
        syscall(SYS_close, cl[i]);
    printf("accepted=%d\naccept_emfile=%d\naccept_econnaborted=%d\naccept_other=%d\n", got,
           emfile, aborted, other);
}

static void phase_wait(int sfd, int n)
{
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 42}, out[4];
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
    int ok = 0, eintr = 0, zero = 0, other = 0;
    for (int i = 0; i < n; i++) {
        int r = epoll_wait(ep, out, 4, 1000); /* data is queued: returns at once */
        if (r > 0)
            ok++;
        else if (r == 0)
            zero++;
        else if (errno == EINTR)
            eintr++;
        else
            other++;
    }
    /* timeout 0 never blocks: never EINTR */
    int poll_eintr = 0;
    for (int i = 0; i < n; i++)
        if (epoll_wait(ep, out, 4, 0) < 0 && errno == EINTR)
            poll_eintr++;
    close(ep);
    printf("wait_ok=%d\nwait_eintr=%d\nwait_zero=%d\nwait_other=%d\npoll_eintr=%d\n", ok, eintr,
           zero, other, poll_eintr);
}

static void phase_read(int sfd, int cfd, int n)
{
    char *data = malloc((size_t)n);
    memset(data, 'r', (size_t)n);
    raw_send_all(cfd, data, (size_t)n);
    usleep(20000);
    int got = 0, eagain = 0, other = 0;
    char c;
    for (int i = 0; got < n && i < 100 * n; i++) {
        ssize_t r = (i % 3 == 0) ? read(sfd, &c, 1) : (i % 3 == 1) ? recv(sfd, &c, 1, 0)
                                                                     : recvfrom(sfd, &c, 1, 0, NULL, NULL);
        if (r == 1)
            got++;
        else if (r < 0 && errno == EAGAIN)
            eagain++;
        else
            other++;
    }
    printf("read_got=%d\nread_eagain=%d\nread_other=%d\n", got, eagain, other);
    free(data);
}

/* Blocking socket and a pipe: a spurious EAGAIN there would be a lie. */
static void phase_blocking(int lfd, const struct sockaddr_in *addr, int n)
{
    int cfd = raw_connect(addr);
    int sfd = accept_one(lfd, n);
    int fl = fcntl(sfd, F_GETFL);
    fcntl(sfd, F_SETFL, fl & ~O_NONBLOCK);
    char *data = malloc((size_t)n);
    memset(data, 'b', (size_t)n);
    raw_send_all(cfd, data, (size_t)n);
    int pfd[2];
    if (pipe2(pfd, O_NONBLOCK) != 0)
        exit(2);
    int got = 0, eagain = 0, pipe_eagain = 0;
    char c;
    for (int i = 0; i < n; i++) {
        if (read(sfd, &c, 1) == 1)
            got++;
        else if (errno == EAGAIN)
            eagain++;
        if (write(pfd[1], "p", 1) == 1 && read(pfd[0], &c, 1) < 0 && errno == EAGAIN)
            pipe_eagain++;
    }
    printf("blocking_got=%d\nblocking_eagain=%d\npipe_eagain=%d\n", got, eagain, pipe_eagain);
    close(pfd[0]);
    close(pfd[1]);
    close(sfd);
    syscall(SYS_close, cfd);
    free(data);
}

/* read=eagain must spare a socket registered EPOLLET without EPOLLONESHOT (the next edge would
 * never come for bytes already queued), and may hit it once it is registered ONESHOT. */
static void phase_edge(int sfd, int cfd, int n)
{
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = 7};
    char c;
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);
    char *data = malloc((size_t)n * 2);
    memset(data, 'e', (size_t)n * 2);
    raw_send_all(cfd, data, (size_t)n * 2);
    usleep(20000);
    int et_eagain = 0, oneshot_eagain = 0;
    for (int i = 0; i < n; i++)
        if (read(sfd, &c, 1) < 0 && errno == EAGAIN)
            et_eagain++;
    ev.events = EPOLLIN | EPOLLET | EPOLLONESHOT;
    epoll_ctl(ep, EPOLL_CTL_MOD, sfd, &ev);
    for (int i = 0; i < n; i++)
        if (read(sfd, &c, 1) < 0 && errno == EAGAIN)
            oneshot_eagain++;
    epoll_ctl(ep, EPOLL_CTL_DEL, sfd, NULL);
    close(ep);
    /* drain what is left without the shim */
    while (syscall(SYS_recvfrom, sfd, data, (size_t)n * 2, MSG_DONTWAIT, NULL, 0) > 0)
        ;
    printf("et_eagain=%d\noneshot_eagain=%d\n", et_eagain, oneshot_eagain);
    free(data);
}

static void phase_write(int sfd, int cfd, int n)
{
    char buf[100];
    memset(buf, 'w', sizeof buf);
    int full = 0, shortw = 0, reset = 0, epipe = 0, other = 0;
    long sent = 0;
    for (int i = 0; i < n; i++) {
        ssize_t r;
        if (i % 3 == 0) {
            r = write(sfd, buf, sizeof buf);
        } else if (i % 3 == 1) {
            r = send(sfd, buf, sizeof buf, MSG_NOSIGNAL);
        } else {
            struct iovec iov[3] = {{buf, 30}, {buf, 30}, {buf, 40}};
            r = writev(sfd, iov, 3);
        }
        if (r == (ssize_t)sizeof buf)
            full++;
        else if (r > 0)
            shortw++;
        else if (errno == ECONNRESET)
            reset++;
        else if (errno == EPIPE)
            epipe++;
        else
            other++;
        if (r > 0)
            sent += r;
        raw_drain(cfd);
    }
    printf("write_full=%d\nwrite_short=%d\nwrite_econnreset=%d\nwrite_epipe=%d\nwrite_other=%d\n"
           "write_sent=%ld\n",
           full, shortw, reset, epipe, other, sent);
}

int main(int argc, char **argv)
{
    const char *phase = argc > 1 ? argv[1] : "all";
    int n = argc > 2 ? atoi(argv[2]) : 100;
    int all = strcmp(phase, "all") == 0;
    struct sockaddr_in addr;
    signal(SIGPIPE, SIG_IGN);
    int lfd = listener(&addr);
    if (all || strcmp(phase, "accept") == 0)
        phase_accept(lfd, &addr, n < 64 ? n : 64);
    if (all || strcmp(phase, "blocking") == 0)
        phase_blocking(lfd, &addr, n);
    int cfd = raw_connect(&addr);
    int sfd = accept_one(lfd, n);
    if (sfd < 0)
        return 3;
    if (all || strcmp(phase, "wait") == 0) {
        raw_send_all(cfd, "w", 1);
        usleep(20000);
        phase_wait(sfd, n);
        char c;
        syscall(SYS_recvfrom, sfd, &c, 1, 0, NULL, 0); /* consume the wake-up byte, unfaulted */
    }
    if (all || strcmp(phase, "read") == 0)
        phase_read(sfd, cfd, n);
    if (all || strcmp(phase, "edge") == 0)
        phase_edge(sfd, cfd, n);
    if (all || strcmp(phase, "write") == 0)
        phase_write(sfd, cfd, n);
    close(sfd);
    syscall(SYS_close, cfd);
    close(lfd);
    return 0;
}
