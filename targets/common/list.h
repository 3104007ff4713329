/* A doubly linked list of connections (any struct with prev and next pointers), for the
 * targets that keep every live connection reachable.  Macros, so that each target's code
 * compiles as if written out in place; the caller holds whatever lock guards the list. */
#ifndef AFTERCLOSE_LIST_H
#define AFTERCLOSE_LIST_H

/* c becomes the first element of the list that head points to. */
#define LIST_PUSH(head, c)                                                                      \
    do {                                                                                       \
        (c)->next = (head);                                                                    \
        if (head)                                                                              \
            (head)->prev = (c);                                                                \
        (head) = (c);                                                                          \
    } while (0)

/* c leaves the list (its own prev and next are left as they were). */
#define LIST_UNLINK(head, c)                                                                    \
    do {                                                                                       \
        if ((c)->prev)                                                                         \
            (c)->prev->next = (c)->next;                                                       \
        else                                                                                   \
            (head) = (c)->next;                                                                \
        if ((c)->next)                                                                         \
            (c)->next->prev = (c)->prev;                                                       \
    } while (0)

#endif
