"""freed-while-registered: free() of live, armed epoll data with a wait in the kernel before
the registration stops fires; teardown before the next wait and disarmed ONESHOT items do not."""

from __future__ import annotations

from tracebuild import EP, ET, IN, ONESHOT, A, TraceBuilder, conn, counts, server


def test_oneshot_disarmed_free_then_close() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A, events=IN | ONESHOT | ET)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=2, fd=7, ret=0)
    t.free(tid=2, ptr=A)
    t.close(tid=2, fd=7)
    t.wait(tid=1, epfd=EP)
    assert counts(t.check()) == {}


def test_single_threaded_free_then_close_before_next_wait() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7, ret=0)
    t.free(tid=1, ptr=A)
    t.close(tid=1, fd=7)
    t.wait(tid=1, epfd=EP)
    assert counts(t.check()) == {}


def test_freed_while_registered_and_event_for_freed_data() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.free(tid=2, ptr=A)  # level-triggered, still registered
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {"freed-while-registered": 1, "event-for-freed-data": 1}
    text = v.occurrences["freed-while-registered"][0].timeline()
    assert any(
        ln.lstrip().startswith(">>>") and "free(0x55d0c2a0)" in ln for ln in text.splitlines()
    )
    assert "data of a live registration" in text


def test_single_thread_free_then_wait_without_close_fires() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.free(tid=1, ptr=A)
    t.wait(tid=1, epfd=EP)
    assert counts(t.check()) == {"freed-while-registered": 1}


def test_free_then_close_while_another_thread_is_blocked_in_epoll_wait() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    w = t.begin(t.wait, tid=1, epfd=EP)  # T1 blocked in epoll_wait the whole time
    t.free(tid=2, ptr=A)
    t.close(tid=2, fd=7)
    t.end(w)
    v = t.check()
    assert counts(v) == {"freed-while-registered": 1}
    assert "could return the freed pointer" in v.violations[0].summary


def test_free_with_no_wait_afterwards_is_not_reported() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.free(tid=2, ptr=A)  # the program exits without waiting again
    assert counts(t.check()) == {}
