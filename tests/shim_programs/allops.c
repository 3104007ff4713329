/* Every intercepted call at least once; prints the fds it got as key=value lines. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define OUT(name, value) printf("%s=%lld\n", name, (long long)(value))

int main(void)
{
    char buf[64];

    int sp[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0);
    OUT("sp0", sp[0]);
    OUT("sp1", sp[1]);
    CHECK(send(sp[0], "a", 1, 0) == 1);
    CHECK(recv(sp[1], buf, 1, 0) == 1);
    CHECK(sendto(sp[0], "bb", 2, 0, NULL, 0) == 2);
    CHECK(recvfrom(sp[1], buf, 2, 0, NULL, NULL) == 2);
    struct iovec iov = {.iov_base = buf, .iov_len = 3};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    CHECK(sendmsg(sp[0], &mh, 0) == 3);
    CHECK(recvmsg(sp[1], &mh, 0) == 3);
    iov.iov_len = 4;
    CHECK(writev(sp[0], &iov, 1) == 4);
    CHECK(readv(sp[1], &iov, 1) == 4);
    CHECK(shutdown(sp[0], SHUT_WR) == 0);

    int pp[2];
    CHECK(pipe2(pp, O_CLOEXEC) == 0);
    OUT("pipe0", pp[0]);
    OUT("pipe1", pp[1]);
    int pq[2];
    CHECK(pipe(pq) == 0);
    OUT("pipeb0", pq[0]);
    OUT("pipeb1", pq[1]);

    int efd = eventfd(0, EFD_NONBLOCK);
    CHECK(efd >= 0);
    OUT("eventfd", efd);
    uint64_t u = 0;
    CHECK(read(efd, &u, 8) == -1 && errno == EAGAIN);
    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    CHECK(tfd >= 0);
    OUT("timerfd", tfd);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR1);
    int sfd = signalfd(-1, &mask, 0);
    CHECK(sfd >= 0);
    OUT("signalfd", sfd);
    CHECK(signalfd(sfd, &mask, 0) == sfd); /* not a new fd: not recorded */
    int mfd = memfd_create("afterclose", 0);
    CHECK(mfd >= 0);
    OUT("memfd", mfd);
    int ifd = inotify_init1(IN_CLOEXEC);
    CHECK(ifd >= 0);
    OUT("inotify1", ifd);
    int ifd0 = inotify_init();
    CHECK(ifd0 >= 0);
    OUT("inotify0", ifd0);

    CHECK(open("/nonexistent/afterclose", O_RDONLY) == -1 && errno == ENOENT);
    int nul = openat(AT_FDCWD, "/dev/null", O_WRONLY);
    CHECK(nul >= 0);
    OUT("devnull", nul);

    CHECK(write(mfd, "data", 4) == 4);
    off_t off = 0;
    CHECK(sendfile(pp[1], mfd, &off, 4) == 4);
    CHECK(read(pp[0], buf, 4) == 4);

    int fl = fcntl(pp[0], F_GETFL);
    CHECK(fl >= 0);
    CHECK(fcntl(pp[0], F_SETFL, fl | O_NONBLOCK) == 0);
    CHECK(fcntl(pp[0], F_GETFL) & O_NONBLOCK);
    CHECK(fcntl(pp[0], F_GETFD) == FD_CLOEXEC);
    struct flock lk = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    CHECK(fcntl(mfd, F_GETLK, &lk) == 0 && lk.l_type == F_UNLCK); /* pointer argument */
    int d1 = fcntl(pp[0], F_DUPFD, 50);
    CHECK(d1 >= 50);
    OUT("dupfd", d1);
    int d2 = fcntl(pp[0], F_DUPFD_CLOEXEC, 60);
    CHECK(d2 >= 60);
    OUT("dupfd_cloexec", d2);
    int d3 = dup(pp[0]);
    CHECK(d3 >= 0);
    OUT("dup", d3);
    CHECK(dup3(pp[0], 70, O_CLOEXEC) == 70);

    int ep = epoll_create(1);
    CHECK(ep >= 0);
    OUT("epoll", ep);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u64 = 0xfeedfacecafebeefull};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, 12345, &ev) == -1 && errno == EBADF);
    ev.events = EPOLLIN;
    ev.data.u64 = 7;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, efd, &ev) == 0);
    u = 1;
    CHECK(write(efd, &u, 8) == 8);
    struct epoll_event out[4];
    CHECK(epoll_pwait(ep, out, 4, 1000, NULL) == 1);
    struct timespec zero = {0, 0};
    int r2 = epoll_pwait2(ep, out, 4, &zero, NULL);
    CHECK(r2 == 1 || (r2 == -1 && errno == ENOSYS));
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, efd, NULL) == 0);
    CHECK(epoll_wait(ep, out, 4, 0) == 0);

    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(ls >= 0);
    OUT("unix_listen", ls);
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    snprintf(sun.sun_path + 1, sizeof sun.sun_path - 1, "afterclose-%d", (int)getpid());
    socklen_t slen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 +
                                 strlen(sun.sun_path + 1));
    CHECK(bind(ls, (struct sockaddr *)&sun, slen) == 0);
    CHECK(listen(ls, 4) == 0);
    int cs = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(cs >= 0);
    CHECK(connect(cs, (struct sockaddr *)&sun, slen) == 0);
    int as = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    CHECK(as >= 0);
    OUT("accepted4", as);

    fflush(stdout);
    pid_t pid = vfork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(d3); /* must land in the child's trace, not ours */
        _exit(0);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status));
    OUT("vfork_child", pid);

    CHECK(close_range(50, ~0u, 0) == 0);
    fflush(stdout);
    return 0;
}
