/* A tiny blocking HTTP server for the Docker runner tests.
 *
 *   echo_server HOST PORT [--no-sigterm]
 *
 * GET /crash  dereferences NULL (SIGSEGV);  GET /fork  starts a child that sleeps;
 * GET /hog    allocates memory until the kernel stops it;  GET /whoami  answers "uid=N";
 * any other path is echoed back as the body.  Prints READY once it listens.  With
 * --no-sigterm it installs no SIGTERM handler (as PID 1 in a container it then ignores
 * SIGTERM: the kernel drops unhandled signals sent to a PID namespace's init).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig)
{
    (void)sig;
    _exit(0);
}

static void reply(int fd, const char *body)
{
    char buf[4096];
    int n = snprintf(buf, sizeof buf,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n%s",
                     strlen(body), body);
    if (n > 0)
        (void)write(fd, buf, (size_t)n);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST PORT [--no-sigterm]\n", argv[0]);
        return 2;
    }
    if (!(argc > 3 && strcmp(argv[3], "--no-sigterm") == 0))
        signal(SIGTERM, on_term);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "bad host %s\n", argv[1]);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 64) < 0) {
        perror("bind/listen");
        return 1;
    }
    printf("READY on %s:%s\n", argv[1], argv[2]);
    fflush(stdout);
    fprintf(stderr, "echo_server: stderr works\n");

    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            continue;
        char req[2048];
        ssize_t got = 0;
        while (got < (ssize_t)sizeof req - 1) {
            ssize_t r = read(fd, req + got, sizeof req - 1 - (size_t)got);
            if (r <= 0)
                break;
            got += r;
            req[got] = '\0';
            if (strstr(req, "\r\n\r\n"))
                break;
        }
        req[got > 0 ? got : 0] = '\0';
        char path[1024] = "/";
        sscanf(req, "GET %1023s", path);
        if (strcmp(path, "/crash") == 0) {
            fprintf(stderr, "echo_server: crashing on purpose\n");
            fflush(stderr);
            volatile int *p = NULL;
            *p = 1;
        }
        if (strcmp(path, "/hog") == 0) {
            for (;;) {
                char *block = malloc(1 << 20);
                if (block == NULL)
                    abort();
                memset(block, 1, 1 << 20);
            }
        }
        if (strcmp(path, "/whoami") == 0)
            snprintf(path, sizeof path, "uid=%d", (int)getuid());
        if (strcmp(path, "/fork") == 0 && fork() == 0) {
            close(fd);
            close(lfd);
            sleep(600);
            _exit(0);
        }
        reply(fd, path);
        close(fd);
    }
}
