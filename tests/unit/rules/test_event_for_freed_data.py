"""event-for-freed-data: fires only for a pointer freed before the wait began and not set
again since."""

from __future__ import annotations

from tracebuild import EP, IN, ONESHOT, A, TraceBuilder, conn, counts, server


def test_event_that_raced_the_free_is_not_event_for_freed_data() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A, events=IN | ONESHOT)
    w = t.begin(t.wait, tid=1, epfd=EP, events=[(IN, A)])
    t.free(tid=2, ptr=A)
    t.end(w)
    v = t.check()
    # The delivery raced the free: freed-while-registered (it could fire), no freed event.
    assert counts(v) == {"freed-while-registered": 1}


def test_data_set_again_before_the_wait_returned() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.free(tid=2, ptr=A)
    w = t.begin(t.wait, tid=1, epfd=EP, events=[(IN, A)])
    t.ctl_mod(tid=1, epfd=EP, fd=7, data=A, events=IN | ONESHOT)  # realloc'd to the same address
    t.end(w)
    assert counts(t.check()) == {}
