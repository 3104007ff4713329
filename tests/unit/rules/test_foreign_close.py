"""foreign-close: a thread that held a number for an older connection closes a young one it
was never handed; not when it was handed it (an event, a call of its own), not for a closer
thread that only ever closes, not for an old silent connection (an idle timer)."""

from __future__ import annotations

from tracebuild import EBADF, EP, IN, A, B, TraceBuilder, conn, counts, server


def timer_closes_reused_number(t: TraceBuilder, *, event_first: bool = False) -> None:
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7, ret=0)
    t.close(tid=1, fd=7)  # the worker closes 7#1 on EOF
    t.close(tid=2, fd=7, err=EBADF)  # the timer thread closes its stale 7: EBADF
    conn(t, 7, B)  # 7#2, accepted and registered by T1
    if event_first:
        t.wait(tid=1, epfd=EP, events=[(IN, B)])
    t.close(tid=2, fd=7)  # the timer thread again: a stranger's connection


def test_timer_thread_closing_a_reused_number_fires_before_its_echoes() -> None:
    t = TraceBuilder()
    timer_closes_reused_number(t)
    v = t.check()
    assert counts(v) == {"foreign-close": 1, "use-after-close": 1}
    assert [x.rule for x in v.violations] == ["foreign-close", "use-after-close"]
    summary = v.violations[0].summary
    assert "closed fd 7" in summary and "7#2" in summary and "never handed" in summary
    assert ">>>" in v.violations[0].details


def test_a_thread_that_acted_for_the_old_connection_closing_the_new_one_fires() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])
    t.write(tid=2, fd=7)  # T2 serves 7#1
    t.wait(tid=2, epfd=EP)  # a new batch: not wrong-incarnation's same-batch shape
    t.close(tid=3, fd=7)
    conn(t, 7, B)
    t.close(tid=2, fd=7)
    assert counts(t.check()) == {"foreign-close": 1}


def test_an_event_for_the_new_connection_first_is_a_hand_off() -> None:
    t = TraceBuilder()
    timer_closes_reused_number(t, event_first=True)
    assert counts(t.check()) == {"use-after-close": 1}


def test_a_wait_in_flight_during_the_close_gets_the_benefit_of_the_doubt() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.write(tid=2, fd=7)
    t.close(tid=3, fd=7)
    conn(t, 7, B)
    w = t.begin(t.wait, tid=1, epfd=EP, events=[(IN, B)])  # may hand 7#2 over before ...
    t.close(tid=2, fd=7)  # ... this close begins
    t.end(w)
    assert "foreign-close" not in counts(t.check())


def test_a_closer_thread_that_only_closes_is_not_judged() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)  # handed 7#1 through a queue
    conn(t, 7, B)
    t.close(tid=2, fd=7)  # and 7#2
    assert counts(t.check()) == {}


def test_an_old_silent_connection_may_be_closed_by_an_idle_timer() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.write(tid=2, fd=7)
    t.close(tid=3, fd=7)
    conn(t, 7, B)
    t.skip(2_000_000)  # 2 s at 1 us per sequence number
    t.close(tid=2, fd=7)
    assert counts(t.check()) == {}


def test_the_accepting_thread_closing_its_own_connection_is_fine() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.write(tid=1, fd=7)
    t.close(tid=2, fd=7)
    conn(t, 7, B)
    t.close(tid=1, fd=7)
    assert counts(t.check()) == {}
