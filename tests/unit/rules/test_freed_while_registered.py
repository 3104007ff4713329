"""freed-while-registered: free() of live, armed epoll data with a wait in the kernel before
the registration stops fires; teardown before the next wait and disarmed ONESHOT items do not."""

from __future__ import annotations

from tracebuild import EP, ET, IN, ONESHOT, RDHUP, A, B, TraceBuilder, conn, counts, server


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


def test_a_rearm_still_returning_when_the_number_is_reused_set_nothing_on_the_new_one() -> None:
    """seed-fixed under a storm: worker T4 re-arms connection 7#1 (data A) with MOD; the
    re-armed item fires at once with the peer's FIN, worker T5 deletes, closes and frees it,
    and the acceptor hands 7 to a new connection (data B), all before T4's MOD returns.  The
    MOD may have named either incarnation; the event just after it says it re-armed 7#1,
    and the new connection's own data comes back with its events: A was never 7#2's."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A, events=IN | RDHUP | ONESHOT | ET)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=4, fd=7)
    t.write(tid=4, fd=7)
    rearm = t.begin(t.ctl_mod, tid=4, epfd=EP, fd=7, data=A, events=IN | RDHUP | ONESHOT | ET)
    t.wait(tid=1, epfd=EP, events=[(IN | RDHUP, A)])
    t.read(tid=5, fd=7, ret=0)
    t.ctl_del(tid=5, epfd=EP, fd=7)
    t.close(tid=5, fd=7)
    conn(t, 7, B, events=IN | RDHUP | ONESHOT | ET)
    t.end(rearm)
    t.free(tid=5, ptr=A)
    t.wait(tid=1, epfd=EP, events=[(IN, B)])
    t.read(tid=5, fd=7)
    assert counts(t.check()) == {}
