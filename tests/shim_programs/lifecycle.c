/* One connection through its whole life: the facts tests/test_shim.py checks exactly. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

int main(void)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(ls >= 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof addr;
    CHECK(bind(ls, (struct sockaddr *)&addr, sizeof addr) == 0);
    CHECK(listen(ls, 8) == 0);
    CHECK(getsockname(ls, (struct sockaddr *)&addr, &alen) == 0);
    int cs = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(cs >= 0);
    CHECK(connect(cs, (struct sockaddr *)&addr, sizeof addr) == 0);
    int as = accept(ls, NULL, NULL);
    CHECK(as >= 0);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    CHECK(ep >= 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1234};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, as, &ev) == 0);
    CHECK(write(cs, "hello", 5) == 5);
    struct epoll_event out[8];
    int n = epoll_wait(ep, out, 8, 5000);
    CHECK(n == 1);
    char buf[16];
    CHECK(read(as, buf, sizeof buf) == 5);

    void *registered = malloc(48);
    void *unregistered = malloc(48);
    CHECK(registered && unregistered);
    ev.data.ptr = registered;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, as, &ev) == 0);
    free(registered);
    free(unregistered);

    CHECK(close(cs) == 0);
    CHECK(close(cs) == -1 && errno == EBADF);
    CHECK(dup2(as, 100) == 100);

    fflush(stdout);
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        close(100);
        _exit(0);
    }
    int status;
    CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(close(100) == 0);
    CHECK(close(as) == 0);
    CHECK(close(ep) == 0);
    CHECK(close(ls) == 0);
    printf("listen=%d\nclient=%d\naccepted=%d\nepoll=%d\nregistered=%lu\nunregistered=%lu\n"
           "child=%d\n",
           ls, cs, as, ep, (unsigned long)(uintptr_t)registered,
           (unsigned long)(uintptr_t)unregistered, (int)child);
    return 0;
}
