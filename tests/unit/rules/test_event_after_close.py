"""event-after-close: an event through a registration kept alive by a dup or a fork's copy
fires; an event that raced the close, or for a file with no reference left, does not."""

from __future__ import annotations

from tracebuild import EP, IN, A, TraceBuilder, conn, counts, server


def test_event_that_raced_a_close_is_not_reported() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=9)  # keeps the file, and its registration, alive
    w = t.begin(t.wait, tid=1, epfd=EP, events=[(IN, A)])
    t.close(tid=2, fd=7)
    t.end(w)
    assert counts(t.check()) == {}


def test_fork_keeps_registration_alive_after_parent_close() -> None:
    """epoll(7): the parent closed 7, but the child's copy keeps the file and its epitem."""
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.close(tid=1, fd=7)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {"event-after-close": 1}
    assert "fd 7#1 (pid 200)" in v.violations[0].summary


def test_event_after_close_of_the_registered_fd_with_a_dup_open() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=9)
    t.close(tid=2, fd=7)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {"event-after-close": 2}
    assert "fd 9#1" in v.violations[0].summary


def test_no_event_after_close_when_no_reference_is_left() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])  # cannot be 7#1's: its epitem is gone
    assert counts(t.check()) == {}
