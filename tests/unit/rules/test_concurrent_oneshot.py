"""concurrent-oneshot: a worker re-arms an EPOLLONESHOT connection before its last touch and
a second worker handles the next delivery meanwhile; a worker that re-arms last, and a
hand-off from one thread to another, are not reported."""

from __future__ import annotations

from tracebuild import EP, IN, ONESHOT, RDHUP, C, TraceBuilder, counts, server

FD = 7


def _delivered(t: TraceBuilder) -> None:
    server(t, tid=1)
    t.accept(tid=1, ret=FD)
    t.ctl_add(tid=1, epfd=EP, fd=FD, data=C, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN | RDHUP, C)])  # to worker 2
    t.read(tid=2, fd=FD)


def test_rearm_before_the_last_touch() -> None:
    t = TraceBuilder()
    _delivered(t)
    t.ctl_mod(tid=2, epfd=EP, fd=FD, data=C, events=IN | ONESHOT)  # re-armed too early
    t.wait(tid=1, epfd=EP, events=[(IN | RDHUP, C)])  # to worker 3
    t.write(tid=2, fd=FD)  # worker 2 still answering
    t.read(tid=3, fd=FD, ret=0)
    t.close(tid=2, fd=FD)
    t.close(tid=3, fd=FD, err=9)
    v = t.check()
    assert counts(v)["concurrent-oneshot"] == 1
    assert "armed by T" in v.occurrences["concurrent-oneshot"][0].summary


def test_overlapping_calls_of_two_threads() -> None:
    t = TraceBuilder()
    _delivered(t)
    t.ctl_mod(tid=2, epfd=EP, fd=FD, data=C, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN, C)])
    w = t.begin(t.write, tid=2, fd=FD)
    t.read(tid=3, fd=FD)  # inside worker 2's write
    t.end(w)
    t.close(tid=3, fd=FD)
    assert counts(t.check()) == {"concurrent-oneshot": 1}


def test_rearm_as_the_last_touch() -> None:
    t = TraceBuilder()
    _delivered(t)
    t.write(tid=2, fd=FD)
    t.ctl_mod(tid=2, epfd=EP, fd=FD, data=C, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN, C)])
    t.read(tid=3, fd=FD)
    t.write(tid=3, fd=FD)
    t.ctl_mod(tid=3, epfd=EP, fd=FD, data=C, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN, C)])
    t.read(tid=2, fd=FD)
    t.ctl_del(tid=2, epfd=EP, fd=FD)
    t.close(tid=2, fd=FD)
    assert counts(t.check()) == {}


def test_hand_off_to_another_thread() -> None:
    t = TraceBuilder()
    _delivered(t)
    t.read(tid=2, fd=FD)
    t.write(tid=4, fd=FD)  # worker 2 handed the connection to thread 4 and let go
    t.ctl_del(tid=4, epfd=EP, fd=FD)
    t.close(tid=4, fd=FD)
    assert counts(t.check()) == {}


def test_next_handler_starting_inside_the_rearm() -> None:
    t = TraceBuilder()
    _delivered(t)
    t.write(tid=2, fd=FD)
    m = t.begin(t.ctl_mod, tid=2, epfd=EP, fd=FD, data=C, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN | RDHUP, C)])  # armed inside the MOD
    t.read(tid=3, fd=FD, ret=0)
    t.end(m)  # worker 2's last touch
    t.ctl_del(tid=3, epfd=EP, fd=FD)
    t.close(tid=3, fd=FD)
    assert counts(t.check()) == {}
