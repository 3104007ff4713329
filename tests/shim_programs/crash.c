/* Some traced calls, then a segfault: the records must survive the crash. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void)
{
    for (int i = 0; i < 10; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        close(s);
    }
    fflush(stdout);
    *(volatile int *)(uintptr_t)8 = 1; /* SIGSEGV */
    return 0;
}
