/* N threads, each doing M write+read pairs on its own pipe: 2*M records per thread. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int iters;

static void *worker(void *arg)
{
    (void)arg;
    int fds[2];
    if (pipe(fds) != 0)
        abort();
    char c = 'x';
    for (int i = 0; i < iters; i++) {
        if (write(fds[1], &c, 1) != 1 || read(fds[0], &c, 1) != 1)
            abort();
    }
    close(fds[0]);
    close(fds[1]);
    return NULL;
}

int main(int argc, char **argv)
{
    int nthreads = argc > 1 ? atoi(argv[1]) : 8;
    iters = argc > 2 ? atoi(argv[2]) : 20000;
    pthread_t th[256];
    if (nthreads < 1 || nthreads > 256)
        return 2;
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&th[i], NULL, worker, NULL) != 0)
            return 3;
    for (int i = 0; i < nthreads; i++)
        pthread_join(th[i], NULL);
    printf("done\n");
    return 0;
}
