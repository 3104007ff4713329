/* A SIGALRM handler writes to a pipe (the self-pipe trick) while the main loop reads: handlers
 * land in the middle of the shim's record writes, and no record may be lost or torn. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static int pipe_w;
static volatile sig_atomic_t handled;

static void on_alarm(int sig)
{
    (void)sig;
    char c = 's';
    ssize_t r = write(pipe_w, &c, 1); /* EAGAIN once the pipe is full: still a traced call */
    (void)r;
    handled = handled + 1;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 300000;
    int fds[2];
    if (pipe2(fds, O_NONBLOCK) != 0)
        return 2;
    pipe_w = fds[1];
    int zero = open("/dev/zero", O_RDONLY);
    if (zero < 0)
        return 3;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 50}, {0, 50}};
    setitimer(ITIMER_REAL, &it, NULL);
    char c;
    for (long i = 0; i < n; i++)
        if (read(zero, &c, 1) != 1)
            return 4;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("reads=%ld\nhandled=%d\n", n, (int)handled);
    return 0;
}
