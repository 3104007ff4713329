/* CHECK(x) for the shim's test programs: a failed check names its line and errno on stderr and
 * exits 2. */
#ifndef AFTERCLOSE_SHIM_PROGRAMS_CHECK_H
#define AFTERCLOSE_SHIM_PROGRAMS_CHECK_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(x)                                                                              \
    do {                                                                                       \
        if (!(x)) {                                                                            \
            fprintf(stderr, "check failed at line %d: %s (errno %d)\n", __LINE__, #x, errno);   \
            exit(2);                                                                           \
        }                                                                                      \
    } while (0)

#endif
