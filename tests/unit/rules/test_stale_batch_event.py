"""stale-batch-event: a handler closes an fd whose event is still ahead in the batch, accept
reuses the number, and the loop comes back to the new connection with the old event; a new
connection registered (and read) at once by its accept handler, or an event handled before
the close, or a connection the thread opened itself on the number, is not reported."""

from __future__ import annotations

from tracebuild import EP, IN, LISTEN, RDHUP, TraceBuilder, counts, server

X, Y = 7, 8  # a connection whose request is handled, and an idle one it evicts


def _batch(t: TraceBuilder) -> None:
    server(t)
    for fd in (X, Y):
        t.accept(tid=1, ret=fd)
        t.ctl_add(tid=1, epfd=EP, fd=fd, data=fd)
    # One batch: X's request, the listener, then Y's FIN.
    t.wait(tid=1, epfd=EP, events=[(IN, X), (IN, LISTEN), (IN | RDHUP, Y)])
    t.read(tid=1, fd=X)
    t.write(tid=1, fd=X)


def test_stale_event_dispatched_to_the_new_connection() -> None:
    t = TraceBuilder()
    _batch(t)
    t.close(tid=1, fd=Y)  # X's handler evicts the idle Y: Y's event is still ahead
    t.accept(tid=1, ret=Y)  # the listener's handler: Y's number for a stranger
    t.ctl_add(tid=1, epfd=EP, fd=Y, data=Y)
    t.accept(tid=1, ret=-1, err=11)
    t.read(tid=1, fd=Y, ret=-1, err=11)  # Y's FIN event, run by the new connection's handler
    v = t.check()
    assert counts(v) == {"stale-batch-event": 1}
    summary = v.violations[0].summary
    assert "fd 8#1" in summary and "fd 8#2" in summary


def test_new_connection_read_at_once_by_its_accept_handler() -> None:
    t = TraceBuilder()
    _batch(t)
    t.close(tid=1, fd=Y)
    t.accept(tid=1, ret=Y)
    t.ctl_add(tid=1, epfd=EP, fd=Y, data=Y)
    t.read(tid=1, fd=Y, ret=-1, err=11)  # an eager first read: part of the accept
    t.accept(tid=1, ret=-1, err=11)
    t.write(tid=1, fd=Y)  # a flush of what that read answered
    assert counts(t.check()) == {}


def test_event_handled_before_the_close() -> None:
    t = TraceBuilder()
    _batch(t)
    t.read(tid=1, fd=Y, ret=0)  # Y's own event: the peer is gone
    t.close(tid=1, fd=Y)
    t.accept(tid=1, ret=Y)
    t.ctl_add(tid=1, epfd=EP, fd=Y, data=Y)
    t.accept(tid=1, ret=-1, err=11)
    t.read(tid=1, fd=Y, ret=-1, err=11)
    assert counts(t.check()) == {}


def test_the_next_batch_starts_afresh() -> None:
    t = TraceBuilder()
    _batch(t)
    t.close(tid=1, fd=Y)
    t.accept(tid=1, ret=Y)
    t.ctl_add(tid=1, epfd=EP, fd=Y, data=Y)
    t.accept(tid=1, ret=-1, err=11)
    t.wait(tid=1, epfd=EP, events=[(IN, Y)])  # the new connection's own event
    t.read(tid=1, fd=Y)
    assert counts(t.check()) == {}


def test_a_del_before_the_close_is_part_of_the_close() -> None:
    t = TraceBuilder()
    _batch(t)
    t.ctl_del(tid=1, epfd=EP, fd=Y)
    t.close(tid=1, fd=Y)
    t.accept(tid=1, ret=Y)
    t.ctl_add(tid=1, epfd=EP, fd=Y, data=Y)
    t.accept(tid=1, ret=-1, err=11)
    t.read(tid=1, fd=Y, ret=-1, err=11)
    assert counts(t.check()) == {"stale-batch-event": 1}


def test_an_outgoing_connection_on_the_number_is_the_threads_own() -> None:
    # A proxy's backend connection: socket(), a turn to the client's fd, then a speculative
    # recv() before the registration.
    t = TraceBuilder()
    _batch(t)
    t.close(tid=1, fd=Y)
    t.socket(tid=1, ret=Y)
    t.write(tid=1, fd=X)
    t.read(tid=1, fd=Y, ret=-1, err=11)
    t.ctl_add(tid=1, epfd=EP, fd=Y, data=Y)
    assert counts(t.check()) == {}
