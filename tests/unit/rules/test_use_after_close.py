"""use-after-close: an EBADF or ENOTSOCK the trace proves came from a closed incarnation fires;
raced closes, closefrom() sweeps and numbers of unknown origin do not."""

from __future__ import annotations

from tracebuild import EBADF, ENOTSOCK, EP, IN, LISTEN, A, B, TraceBuilder, conn, counts, server

from afterclose.harness.trace.format import IoKind


def test_del_racing_the_close_is_not_reported() -> None:
    """A DEL that began before the close returned may see the fd or not: no proof either way."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    c = t.begin(t.close, tid=2, fd=7)
    t.ctl_del(tid=3, epfd=EP, fd=7, err=EBADF)
    t.end(c)
    assert counts(t.check()) == {}


def test_del_after_interrupted_close_is_use_after_close() -> None:
    """Linux releases the fd even when close() fails with EINTR: a later DEL gets EBADF."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7, err=4)  # EINTR
    t.ctl_del(tid=2, epfd=EP, fd=7, err=EBADF)
    assert counts(t.check()) == {"use-after-close": 1}


def test_fork_child_close_sweep_is_not_use_after_close() -> None:
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.close(tid=200, fd=7, pid=200)
    for fd in range(3, 12):  # closefrom(3)
        err = 0 if fd in (LISTEN, EP) else EBADF
        t.close(tid=200, fd=fd, err=err, pid=200)
    assert counts(t.check()) == {}


def test_fork_child_double_close_outside_a_sweep_fires() -> None:
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.close(tid=200, fd=7, pid=200)
    t.close(tid=200, fd=7, err=EBADF, pid=200)
    v = t.check()
    assert counts(v) == {"use-after-close": 1}
    assert "pid 200" in v.violations[0].details


def test_fork_table_is_copied_as_of_the_fork_entry() -> None:
    """A close that returned before the fork began is not in the child's table."""
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.close(tid=1, fd=7)
    t.fork(tid=1, child=200)
    t.read(tid=200, fd=7, err=EBADF, pid=200)  # no incarnation of 7 in the child: no proof
    assert counts(t.check()) == {}


def test_double_close_same_thread() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.read(tid=2, fd=8)  # breaks any would-be sweep
    t.close(tid=2, fd=7, err=EBADF)
    v = t.check()
    assert counts(v) == {"use-after-close": 1}
    assert "double close" in v.violations[0].summary
    assert "same thread" in v.violations[0].summary


def test_use_after_close_ops() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.read(tid=3, fd=7, err=EBADF)
    t.write(tid=3, fd=7, err=EBADF)
    t.shutdown(tid=3, fd=7, err=EBADF)
    t.ctl_mod(tid=3, epfd=EP, fd=7, data=A, err=EBADF)
    t.close(tid=1, fd=LISTEN)
    t.accept(tid=1, ret=-1, fd=LISTEN, err=EBADF)
    v = t.check()
    assert counts(v) == {"use-after-close": 5}


def test_ebadf_racing_the_close_is_not_reported() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    c = t.begin(t.close, tid=2, fd=7)
    t.read(tid=3, fd=7, err=EBADF)
    t.end(c)
    assert counts(t.check()) == {}
    # The EBADF inside the close did not confuse the model: the close still owns the release.
    t.read(tid=3, fd=7, err=EBADF)
    v = t.check()
    assert counts(v) == {"use-after-close": 1}
    # Threads are named in order of appearance: tid 3's read returned before tid 2's close.
    assert "closed at seq 14 by T3" in v.violations[0].summary
    assert "T3 (tid 2)" in v.violations[0].details


def test_enotsock_on_reused_number() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.fdnew(tid=4, ret=7)  # open() got the number
    t.shutdown(tid=3, fd=7, err=ENOTSOCK)
    t.read(tid=3, fd=7, err=ENOTSOCK, kind=IoKind.RECV)
    v = t.check()
    assert counts(v) == {"use-after-close": 2}
    assert "non-socket" in v.violations[0].summary


def test_close_range_ends_incarnations() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close_range(tid=2, first=6)
    t.read(tid=3, fd=7, err=EBADF)
    v = t.check()
    assert counts(v) == {"use-after-close": 1}
    assert "close_range" in v.violations[0].summary


def test_dup2_silently_closes_its_target() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    conn(t, 8, B)
    t.dup2(tid=1, fd=7, newfd=8)  # ends 8#1 (and its registration: last reference)
    t.wait(tid=1, epfd=EP, events=[(IN, B)])  # cannot be 8#1's
    t.close(tid=1, fd=8)
    t.write(tid=2, fd=8, err=EBADF)
    v = t.check()
    assert counts(v) == {"use-after-close": 1}
    assert "fd 8#2" in v.violations[0].summary
    assert "silently closing fd 8#1" in v.violations[0].details


def test_fork_known_only_from_the_child_header() -> None:
    """The parent's FORK record was lost; the child's header still tells when it forked."""
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.skip()
    t.pids[200] = (100, t.seq)
    t.close(tid=1, fd=7)
    t.read(tid=200, fd=7, pid=200)
    t.close(tid=200, fd=7, pid=200)
    t.close(tid=200, fd=7, err=EBADF, pid=200)
    v = t.check()
    assert counts(v) == {"use-after-close": 1}
    assert v.stats.processes == 2
