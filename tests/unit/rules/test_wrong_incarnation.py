"""wrong-incarnation: each of the four shapes fires once per call; hand-offs and a new wait
batch do not."""

from __future__ import annotations

from tracebuild import C2, ENOENT, EP, HUP, IN, RDHUP, A, B, C, TraceBuilder, conn, counts, server


def test_wrong_incarnation_double_close_never_revealed() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN | RDHUP, A)])  # T2 owns 7#1: its event, its EOF
    t.read(tid=2, fd=7, ret=0)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.close(tid=2, fd=7)
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "closed fd 7 twice" in v.violations[0].summary


def test_close_only_thread_closing_each_handed_over_fd_is_fine() -> None:
    """A closer/logger thread that is handed fds through a queue (invisible in the trace) and
    only ever closes them: closing 7#1 and then 7#2 is two hand-offs, not a double close."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=8)  # the logger's reference to the connection
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.close(tid=2, fd=8)  # logger: 8#1
    conn(t, 7, B)
    t.dup(tid=1, fd=7, ret=8)  # 8#2, handed to the logger in turn
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.close(tid=2, fd=8)  # logger: 8#2
    conn(t, 9, C)
    t.close(tid=2, fd=9)  # a lingering close of 9#1, handed over still registered
    conn(t, 9, C2)
    t.close(tid=2, fd=9)  # and of 9#2
    assert counts(t.check()) == {}


def test_wrong_incarnation_own_event() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])  # T2 got 7#1
    t.close(tid=3, fd=7)
    t.accept(tid=1, ret=7)  # 7#2
    t.write(tid=2, fd=7)  # T2 still thinks 7 is 7#1
    t.read(tid=2, fd=7)  # same batch: same finding
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "before its next epoll_wait" in v.violations[0].summary


def test_wrong_incarnation_own_event_close() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN | HUP, A)])
    t.ctl_del(tid=3, epfd=EP, fd=7)
    t.close(tid=3, fd=7)
    conn(t, 7, B)
    t.close(tid=2, fd=7)  # T2 closes a stranger's connection
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    text = v.violations[0].details
    assert any(
        ln.lstrip().startswith(">>>") and "close(7) -> fd 7#2 ends" in ln
        for ln in text.splitlines()
    )


def test_own_event_after_a_new_wait_is_fine() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])
    t.close(tid=3, fd=7)
    t.accept(tid=1, ret=7)
    t.wait(tid=2, epfd=EP)
    t.write(tid=2, fd=7)
    assert counts(t.check()) == {}


def test_wrong_incarnation_mod_enoent() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)  # not registered yet
    t.ctl_mod(tid=3, epfd=EP, fd=7, data=A, err=ENOENT)
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "ENOENT" in v.violations[0].summary
