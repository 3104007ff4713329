"""The traced rules on synthetic traces: each rule fires exactly where the trace proves a bug,
and stays quiet on the legitimate patterns that look like one (fd-number reuse, raced closes,
fork, dup, malloc reuse, fds the shim never saw)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
from tracebuild import EBADF, ENOENT, ENOTSOCK, ET, HUP, IN, ONESHOT, OUT, RDHUP, TraceBuilder

from afterclose.harness.oracle import verdict as V
from afterclose.harness.trace.format import Header, HeaderFlag, IoKind, Record
from afterclose.harness.trace.rules import TraceVerdict, check, check_trace

LISTEN, EP = 3, 5
A, B, C, C2 = 0x55D0C2A0, 0x55D0C400, 0x7F00AA10, 0x7F00BB20


def counts(v: TraceVerdict) -> dict[str, int]:
    return {rule: len(occ) for rule, occ in v.occurrences.items()}


def server(t: TraceBuilder, tid: int = 1) -> None:
    """A listening socket on 3 and an epoll instance on 5 watching it."""
    t.socket(tid=tid, ret=LISTEN)
    t.epoll_create(tid=tid, ret=EP)
    t.ctl_add(tid=tid, epfd=EP, fd=LISTEN, data=LISTEN)


def conn(t: TraceBuilder, fd: int, data: int, *, tid: int = 1, events: int = IN) -> None:
    t.accept(tid=tid, ret=fd)
    t.ctl_add(tid=tid, epfd=EP, fd=fd, data=data, events=events)


# -- legitimate patterns: nothing fires --------------------------------------------------------


def test_legit_reuse_with_new_data() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7, ret=0)
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.free(tid=1, ptr=A)
    conn(t, 7, B)
    t.wait(tid=1, epfd=EP, events=[(IN, B)])
    t.read(tid=1, fd=7)
    t.ctl_mod(tid=1, epfd=EP, fd=7, data=B, events=IN | OUT)
    t.write(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}, v.render()
    assert v.ok
    assert v.stats.incarnations == 4  # 3, 5, 7#1, 7#2
    assert v.stats.events == 2


def test_legit_reuse_data_fd_convention() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, 7)
    t.wait(tid=1, epfd=EP, events=[(IN, 7)])
    t.close(tid=1, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=7, events=IN | ONESHOT)
    t.ctl_mod(tid=1, epfd=EP, fd=7, data=7, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN, 7)])
    t.read(tid=1, fd=7)
    assert counts(t.check()) == {}


def test_legit_reuse_data_fd_with_garbage_high_bits() -> None:
    """``ev.data.fd = fd`` writes 4 of the union's 8 bytes: the rest is stack garbage."""
    t = TraceBuilder()
    server(t)
    conn(t, 10, 0x7F760000000A)
    t.ctl_del(tid=1, epfd=EP, fd=10)
    t.close(tid=1, fd=10)
    t.accept(tid=1, ret=10)
    t.ctl_add(tid=1, epfd=EP, fd=10, data=0x7F760000000A)
    t.ctl_mod(tid=1, epfd=EP, fd=10, data=0x55AA00000000A, events=IN | OUT)
    t.wait(tid=1, epfd=EP, events=[(IN, 0x55AA00000000A)])
    assert counts(t.check()) == {}


def test_legit_reuse_across_threads_with_event_for_new_connection() -> None:
    """T2 closes 7#1, T1 accepts 7#2, T2 then gets an event for 7#2 and closes it: T2 knew."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    conn(t, 7, B)
    t.wait(tid=2, epfd=EP, events=[(IN, B)])
    t.close(tid=2, fd=7)
    assert counts(t.check()) == {}


def test_close_after_del_and_free_after_del_close() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.ctl_del(tid=2, epfd=EP, fd=7)
    t.close(tid=2, fd=7)
    t.free(tid=2, ptr=A)
    t.wait(tid=1, epfd=EP)
    assert counts(t.check()) == {}


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
    assert counts(t.check()) == {V.USE_AFTER_CLOSE: 1}


def test_event_that_raced_a_close_is_not_reported() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=9)  # keeps the file, and its registration, alive
    w = t.begin(t.wait, tid=1, epfd=EP, events=[(IN, A)])
    t.close(tid=2, fd=7)
    t.end(w)
    assert counts(t.check()) == {}


def test_accept_racing_close_gets_the_number_the_close_released() -> None:
    """accept() returns 7 inside close(7): the new incarnation must survive the close's return."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    c = t.begin(t.close, tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.end(c)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=B)
    t.wait(tid=1, epfd=EP, events=[(IN, B)])
    t.read(tid=1, fd=7)
    t.read(tid=1, fd=7, ret=0)
    v = t.check()
    # 7#2 is open at the end with its peer gone: only possible if the close ended 7#1.
    assert counts(v) == {V.FD_LEAK: 1}, v.render()
    assert "fd 7#2" in v.occurrences[V.FD_LEAK][0].summary


def test_fork_child_closes_its_copy() -> None:
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.close(tid=200, fd=7, pid=200)
    t.close(tid=200, fd=LISTEN, pid=200)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}
    assert v.stats.processes == 2


def test_fork_child_with_inherited_epoll_fd() -> None:
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.wait(tid=200, epfd=EP, events=[(IN, A)], pid=200)
    t.read(tid=200, fd=7, pid=200)
    t.ctl_mod(tid=200, epfd=EP, fd=7, data=A, pid=200)
    assert counts(t.check()) == {}


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
    assert counts(v) == {V.USE_AFTER_CLOSE: 1}
    assert "pid 200" in v.violations[0].details


def test_fork_keeps_registration_alive_after_parent_close() -> None:
    """epoll(7): the parent closed 7, but the child's copy keeps the file and its epitem."""
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.close(tid=1, fd=7)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {V.EVENT_AFTER_CLOSE: 1}
    assert "fd 7#1 (pid 200)" in v.violations[0].summary


def test_fork_table_is_copied_as_of_the_fork_entry() -> None:
    """A close that returned before the fork began is not in the child's table."""
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.close(tid=1, fd=7)
    t.fork(tid=1, child=200)
    t.read(tid=200, fd=7, err=EBADF, pid=200)  # no incarnation of 7 in the child: no proof
    assert counts(t.check()) == {}


def test_dup_closed_while_original_registered() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=9)
    t.close(tid=1, fd=9)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7)
    assert counts(t.check()) == {}


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


def test_malloc_address_reuse() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.free(tid=1, ptr=A)
    conn(t, 8, A)  # malloc handed the same address to the next connection
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    conn(t, 7, B)
    t.read(tid=1, fd=8, ret=0)
    t.close(tid=1, fd=8)
    t.free(tid=1, ptr=A)
    conn(t, 7 + 2, C)
    t.close(tid=1, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=A)  # and again, on a reused number
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    assert counts(t.check()) == {}


def test_unknown_origin_fds_are_never_reported() -> None:
    t = TraceBuilder()
    server(t)
    t.read(tid=1, fd=0)
    t.write(tid=1, fd=1)
    t.close(tid=1, fd=2)
    t.write(tid=1, fd=2, err=EBADF)
    # A pipe the shim did not see: 10/11.
    t.write(tid=2, fd=11)
    t.read(tid=1, fd=10)
    t.ctl_add(tid=1, epfd=EP, fd=10, data=A)
    t.close(tid=1, fd=10)
    t.close(tid=1, fd=10, err=EBADF)
    t.read(tid=1, fd=10, err=EBADF)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {}
    assert v.warnings == []


# -- use-after-close ---------------------------------------------------------------------------


def test_double_close_same_thread() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.read(tid=2, fd=8)  # breaks any would-be sweep
    t.close(tid=2, fd=7, err=EBADF)
    v = t.check()
    assert counts(v) == {V.USE_AFTER_CLOSE: 1}
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
    assert counts(v) == {V.USE_AFTER_CLOSE: 5}


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
    assert counts(v) == {V.USE_AFTER_CLOSE: 1}
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
    assert counts(v) == {V.USE_AFTER_CLOSE: 2}
    assert "non-socket" in v.violations[0].summary


def test_close_range_ends_incarnations() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close_range(tid=2, first=6)
    t.read(tid=3, fd=7, err=EBADF)
    v = t.check()
    assert counts(v) == {V.USE_AFTER_CLOSE: 1}
    assert "close_range" in v.violations[0].summary


def test_close_range_cloexec_closes_nothing() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    f = t.begin(t.close_range, tid=2, first=6)
    t.end(f)
    t.records[-1] = dataclasses.replace(t.records[-1], arg=4)  # CLOSE_RANGE_CLOEXEC
    t.read(tid=3, fd=7)
    t.read(tid=3, fd=7, ret=0)
    v = t.check()
    assert counts(v) == {V.FD_LEAK: 1}  # 7#1 was never closed


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
    assert counts(v) == {V.USE_AFTER_CLOSE: 1}
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
    assert counts(v) == {V.USE_AFTER_CLOSE: 1}
    assert v.stats.processes == 2


# -- event-after-close -------------------------------------------------------------------------


def test_event_after_close_of_the_registered_fd_with_a_dup_open() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=9)
    t.close(tid=2, fd=7)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {V.EVENT_AFTER_CLOSE: 2}
    assert "fd 9#1" in v.violations[0].summary


def test_no_event_after_close_when_no_reference_is_left() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])  # cannot be 7#1's: its epitem is gone
    assert counts(t.check()) == {}


# -- stale-rearm and wrong-incarnation: the seed server's race ---------------------------------


def seed_race() -> TraceBuilder:
    """epoll thread T1 hands client c (7#1) to worker T2; error thread T3 holds c too."""
    t = TraceBuilder()
    server(t, tid=11)
    t.accept(tid=11, ret=7)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN | RDHUP, C)])
    t.read(tid=12, fd=7, ret=0)  # T2: peer closed
    t.free(tid=12, ptr=C)
    t.close(tid=12, fd=7)
    t.wait(tid=11, epfd=EP, events=[(IN, LISTEN)])
    t.accept(tid=11, ret=7)  # 7#2: a stranger
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C2, events=IN | ONESHOT | ET)
    t.shutdown(tid=13, fd=7)  # T3, still acting for c
    t.ctl_mod(tid=13, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN, C)])
    return t


def test_seed_race() -> None:
    v = seed_race().check(trace_path="/runs/x/trace")
    assert counts(v) == {V.STALE_REARM: 1, V.WRONG_INCARNATION: 1, V.EVENT_FOR_FREED_DATA: 1}
    stale = v.occurrences[V.STALE_REARM][0]
    assert stale.followups and len(stale.followups) == 1
    assert "1 event delivered with the stale data afterwards" in stale.summary
    wi = v.occurrences[V.WRONG_INCARNATION][0]
    assert wi.summary.startswith("T3 shut down fd 7#2 (a stranger's connection, accepted by T1")
    assert "while acting for fd 7#1" in wi.summary
    by_rule = {x.rule: x for x in v.violations}
    assert by_rule[V.STALE_REARM].artifacts == ("/runs/x/trace",)


def test_seed_race_twice_with_the_pointer_reused_in_between() -> None:
    t = seed_race()
    t.close(tid=11, fd=7)  # T1 got 7#2's event (with c): it closes 7#2
    t.accept(tid=11, ret=7)  # 7#3; malloc hands out c again (it was freed in round 1)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN | RDHUP, C)])
    t.read(tid=12, fd=7, ret=0)
    t.free(tid=12, ptr=C)
    t.close(tid=12, fd=7)
    t.accept(tid=11, ret=7)  # 7#4
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C2, events=IN | ONESHOT | ET)
    t.shutdown(tid=13, fd=7)
    t.ctl_mod(tid=13, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN, C)])
    v = t.check()
    assert counts(v) == {V.STALE_REARM: 2, V.WRONG_INCARNATION: 2, V.EVENT_FOR_FREED_DATA: 2}
    assert [f.fd for f in v.occurrences[V.STALE_REARM]] == [7, 7]
    assert "fd 7#4" in v.occurrences[V.STALE_REARM][1].summary


def test_seed_race_timeline() -> None:
    v = seed_race().check(trace_path="/runs/x/trace")
    text = v.occurrences[V.STALE_REARM][0].timeline()
    lines = text.splitlines()
    assert lines[0].startswith("stale-rearm: ")
    assert "trace: /runs/x/trace" in text
    marked = [ln for ln in lines if ln.lstrip().startswith(">>>")]
    assert len(marked) == 1
    assert "T3 (tid 13)" in marked[0]
    assert "epoll_ctl(5, MOD, fd 7#2, IN|ONESHOT|ET, data=0x7f00aa10)" in marked[0]
    assert "data of 7#1" in marked[0] or "data of fd 7#1" in marked[0]
    assert any("accept(3) = 7  -> fd 7#2 (new connection)" in ln for ln in lines)
    assert any("close(7) -> fd 7#1 ends" in ln and "T2 (tid 12)" in ln for ln in lines)
    assert any("free(0x7f00aa10)" in ln for ln in lines)
    assert any("-> fd 7#2" in ln and "epoll_wait(5) -> [IN data=0x7f00aa10" in ln for ln in lines)
    assert any("delivered with the stale data" in ln for ln in lines)
    assert "why it is a bug" in text
    # The wrong-incarnation report marks the shutdown.
    wi = v.occurrences[V.WRONG_INCARNATION][0].timeline()
    assert any(
        ln.lstrip().startswith(">>>") and "shutdown(7, SHUT_RDWR) on fd 7#2" in ln
        for ln in wi.splitlines()
    )
    # And the verdict's Violation carries the first occurrence's timeline.
    det = {x.rule: x.details for x in v.violations}
    assert det[V.STALE_REARM] == text


def test_stale_rearm_by_add_without_free() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=3, epfd=EP, fd=7, data=A)
    v = t.check()
    assert counts(v) == {V.STALE_REARM: 1}


def test_stale_add_not_reported_when_the_owner_add_raced_its_close() -> None:
    """T3 registers what the acceptor T2 accepts.  Its ADD of A for 7#1 is still in flight when
    T1 gets 7#1's event, closes 7#1 and frees A -- before the shim's ADD wrapper learned that A
    is epoll data, so the free leaves no record.  malloc then hands A out again for 7#2: that
    is reuse, not a stale re-arm."""
    t = TraceBuilder()
    server(t)
    t.accept(tid=2, ret=7)
    add = t.begin(t.ctl_add, tid=3, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN | HUP, A)])
    t.read(tid=1, fd=7, err=104)  # ECONNRESET
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)  # ... and free(A), unrecorded
    t.end(add)
    t.accept(tid=2, ret=7)
    t.ctl_add(tid=3, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}, v.render()
    assert not v.warnings, v.warnings


def test_stale_add_not_checked_without_free_tracking() -> None:
    t = TraceBuilder(free_tracking=False)
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=3, epfd=EP, fd=7, data=A)
    v = t.check()
    assert counts(v) == {}
    assert any("free() was not tracked" in w for w in v.warnings)


def test_stale_add_small_data_is_a_tag() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, 42)  # index/slot 42
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=42)
    assert counts(t.check()) == {}


def test_shared_tag_data_is_never_attributed() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    conn(t, 8, A)  # the same value on two live registrations: a tag
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=B)
    t.ctl_mod(tid=3, epfd=EP, fd=7, data=A)
    assert counts(t.check()) == {}


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
    assert counts(v) == {V.WRONG_INCARNATION: 1}
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


def test_event_while_its_add_is_in_flight_is_not_unattributed() -> None:
    """The kernel may deliver an event for a new registration before epoll_ctl(ADD) returns to
    the shim: the event's seq_out is then below the ADD's.  It is not a registration made
    behind the shim's back."""
    t = TraceBuilder()
    server(t)
    t.accept(tid=2, ret=7)
    add = t.begin(t.ctl_add, tid=2, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.end(add)
    t.read(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}
    assert not any("no traced epoll_ctl set" in w for w in v.warnings), v.warnings
    t.wait(tid=1, epfd=EP, events=[(IN, B)])  # B: set by nothing at all
    assert any("1 epoll events carried data" in w for w in t.check().warnings)


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
    assert counts(v) == {V.WRONG_INCARNATION: 1}
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
    assert counts(v) == {V.WRONG_INCARNATION: 1}
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
    assert counts(v) == {V.WRONG_INCARNATION: 1}
    assert "ENOENT" in v.violations[0].summary


# -- free rules --------------------------------------------------------------------------------


def test_freed_while_registered_and_event_for_freed_data() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.free(tid=2, ptr=A)  # level-triggered, still registered
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {V.FREED_WHILE_REGISTERED: 1, V.EVENT_FOR_FREED_DATA: 1}
    text = v.occurrences[V.FREED_WHILE_REGISTERED][0].timeline()
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
    assert counts(t.check()) == {V.FREED_WHILE_REGISTERED: 1}


def test_free_then_close_while_another_thread_is_blocked_in_epoll_wait() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    w = t.begin(t.wait, tid=1, epfd=EP)  # T1 blocked in epoll_wait the whole time
    t.free(tid=2, ptr=A)
    t.close(tid=2, fd=7)
    t.end(w)
    v = t.check()
    assert counts(v) == {V.FREED_WHILE_REGISTERED: 1}
    assert "could return the freed pointer" in v.violations[0].summary


def test_free_with_no_wait_afterwards_is_not_reported() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.free(tid=2, ptr=A)  # the program exits without waiting again
    assert counts(t.check()) == {}


def test_event_that_raced_the_free_is_not_event_for_freed_data() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A, events=IN | ONESHOT)
    w = t.begin(t.wait, tid=1, epfd=EP, events=[(IN, A)])
    t.free(tid=2, ptr=A)
    t.end(w)
    v = t.check()
    # The delivery raced the free: freed-while-registered (it could fire), no freed event.
    assert counts(v) == {V.FREED_WHILE_REGISTERED: 1}


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


# -- fd-leak -----------------------------------------------------------------------------------


def test_fd_leak_after_read_zero_and_after_hup() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    conn(t, 8, B)
    conn(t, 9, C)
    t.read(tid=1, fd=7, ret=0)
    t.wait(tid=1, epfd=EP, events=[(IN | RDHUP | HUP, B)])
    t.read(tid=1, fd=9, ret=0)
    t.close(tid=1, fd=9)
    v = t.check()
    assert counts(v) == {V.FD_LEAK: 2}
    assert [f.fd for f in v.occurrences[V.FD_LEAK]] == [7, 8]


def test_fd_leak_not_checked_when_closes_are_invisible() -> None:
    """libuv closes with syscall(SYS_close): the shim never sees it, but reuse proves it."""
    t = TraceBuilder()
    server(t)
    t.accept(tid=1, ret=7)
    t.read(tid=1, fd=7, ret=0)
    t.accept(tid=1, ret=7)  # 7 handed out again: 7#1 was closed behind the shim's back
    t.read(tid=1, fd=7, ret=0)
    t.wait(tid=1, epfd=EP, events=[(IN, 0xDEAD000)])  # registered through io_uring
    v = t.check()
    assert counts(v) == {}
    assert any("no traced close" in w for w in v.warnings)
    assert any("1 epoll events carried data that no traced epoll_ctl set" in w for w in v.warnings)


def test_fd_leak_cutoff() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    cutoff = t.seq
    t.skip(100)
    t.close(tid=1, fd=7)
    assert counts(t.check()) == {}
    v = t.check(cutoff_seq=cutoff)
    assert counts(v) == {V.FD_LEAK: 1}
    assert f"seq {cutoff}" in v.violations[0].summary


# -- reporting ---------------------------------------------------------------------------------


def test_lost_records_are_reported_loudly() -> None:
    t = seed_race()
    v = t.check(lost_records=12)
    assert not v.complete
    assert any("12 records were lost" in w for w in v.warnings)
    assert all("WARNING: the trace lost 12 records" in x.details for x in v.violations)
    assert "WARNING" in v.render()


def test_thread_names_are_stable_and_in_order_of_appearance() -> None:
    v = seed_race().check()
    ctx_names = [f.timeline() for f in v.occurrences[V.STALE_REARM]]
    assert "T1 (tid 11)" in ctx_names[0] and "T2 (tid 12)" in ctx_names[0]
    assert v.stats.threads == 3


def test_timeline_window_is_bounded() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    for _ in range(200):
        t.read(tid=1, fd=7)
    t.close(tid=2, fd=7)
    for _ in range(200):
        t.read(tid=1, fd=8)
    t.read(tid=3, fd=7, err=EBADF)
    for _ in range(50):
        t.write(tid=1, fd=8)
    v = t.check()
    text = v.violations[0].details
    rows = [ln for ln in text.splitlines() if " T" in ln and "(tid" in ln]
    assert len(rows) <= 40
    assert "related records not shown" in text
    assert "accept(3) = 7" in text  # the creation is kept, however far back


@dataclass
class _Proc:
    header: Header
    path: Path


@dataclass
class _Trace:
    processes: tuple[_Proc, ...]
    records: tuple[Record, ...]
    lost_records: int
    warnings: tuple[str, ...]
    complete: bool = True


def test_check_trace_accepts_a_trace_like_object(tmp_path: Path) -> None:
    t = seed_race()
    hdr = t.headers()[100]
    hdr = Header(**{**{f: getattr(hdr, f) for f in Header.__slots__}, "flags": HeaderFlag(3)})
    tr = _Trace(
        (_Proc(hdr, tmp_path / "trace.100.0.bin"),),
        tuple(t.sorted_records()),
        0,
        ("pid 100: something odd",),
    )
    v = check_trace(tr)
    assert counts(v)[V.STALE_REARM] == 1
    assert v.warnings[0] == "pid 100: something odd"
    assert any("filled up" in w for w in v.warnings)
    assert v.violations[0].artifacts == (str(tmp_path / "trace.100.0.bin"),)


def test_check_trace_damaged_trace_is_incomplete(tmp_path: Path) -> None:
    t = seed_race()
    procs = tuple(_Proc(h, tmp_path / f"trace.{pid}.0.bin") for pid, h in t.headers().items())
    tr = _Trace(procs, tuple(t.sorted_records()), 0, ("trace.100.0.bin: truncated",), False)
    v = check_trace(tr, trace_path="/runs/7/trace")
    assert not v.complete
    assert v.warnings[0] == "trace.100.0.bin: truncated"
    assert all("WARNING: the trace is incomplete" in x.details for x in v.violations)
    assert all(x.artifacts == ("/runs/7/trace",) for x in v.violations)
    assert seed_race().check().complete


def test_unsorted_input_is_sorted() -> None:
    t = seed_race()
    recs = list(reversed(t.sorted_records()))
    v = check(recs, t.headers())
    assert counts(v) == counts(t.check())


def test_many_connections_without_a_violation() -> None:
    """~17k records of correct connections; how the checking time grows: bench/trace_scale.py."""
    t = TraceBuilder()
    server(t)
    for n in range(1500):
        fd = 7 + n % 50
        ptr = 0x10000 + (n % 97) * 64
        conn(t, fd, ptr, events=IN | ONESHOT)
        t.wait(tid=1, epfd=EP, events=[(IN, ptr)])
        t.read(tid=2, fd=fd)
        t.ctl_mod(tid=2, epfd=EP, fd=fd, data=ptr, events=IN | ONESHOT)
        t.wait(tid=1, epfd=EP, events=[(IN | RDHUP, ptr)])
        t.read(tid=2, fd=fd, ret=0)
        t.ctl_del(tid=2, epfd=EP, fd=fd)
        t.close(tid=2, fd=fd)
        t.free(tid=2, ptr=ptr)
    recs = t.sorted_records()
    assert len(recs) > 15_000
    v = check(recs, t.headers())  # how the time grows with the trace: bench/trace_scale.py
    assert counts(v) == {}, v.render()


@pytest.mark.parametrize("rule", sorted(set(V.RULES) - V.BLACKBOX_ONLY))
def test_every_traced_rule_has_a_why(rule: str) -> None:
    from afterclose.harness.trace.timeline import WHY

    if rule == V.TRACE_INCOMPLETE:
        pytest.skip("not a rule of the trace checker")
    assert rule in WHY


def test_pool_reuse_first_add_by_creator_is_not_stale() -> None:
    """nginx keeps connections in a preallocated pool: the next connection on the same fd
    number may get the same pointer (same tag bit) with no free() between, registered by the
    thread that accepted it."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=1, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    assert counts(t.check()) == {}
