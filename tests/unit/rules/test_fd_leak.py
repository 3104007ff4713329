"""fd-leak: from the trace, an accepted connection whose peer is gone, still open at the end
(or at the cut-off), not checked where closes are invisible; and the trace and the socket
census judged together (the census itself, on real servers: in
tests/integration/process/test_blackbox_oracle.py)."""

from __future__ import annotations

import dataclasses

from evidence_kit import evidence
from tracebuild import EP, HUP, IN, RDHUP, A, B, C, TraceBuilder, conn, counts, server

from afterclose.harness.oracle.rules import fd_leak
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.facts import NOT_RUNNING, Running


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
    assert counts(v) == {"fd-leak": 1}, v.render()
    assert "fd 7#2" in v.occurrences["fd-leak"][0].summary


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
    assert counts(v) == {"fd-leak": 1}  # 7#1 was never closed


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
    assert counts(v) == {"fd-leak": 2}
    assert [f.fd for f in v.occurrences["fd-leak"]] == [7, 8]


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
    assert counts(v) == {"fd-leak": 1}
    assert f"seq {cutoff}" in v.violations[0].summary


# -- the trace and the socket census together ----------------------------------------------


def _traced_leak() -> Violation:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    (v,) = t.check(trace_path="/runs/1/trace").violations
    return v


def test_census_and_trace_make_one_violation_with_both() -> None:
    traced = _traced_leak()
    outside = Violation("fd-leak", "1 socket(s) still open 1 s after every client left", "now: x")
    (v,) = fd_leak.decide(evidence(probes={"fd-leak": (outside, None)}, traced=[traced]))
    assert v.summary == outside.summary
    assert "now: x" in v.details and traced.summary in v.details
    assert v.artifacts == ("/runs/1/trace",)


def test_either_alone_is_reported_and_stranded_connections_are_a_warning() -> None:
    traced = _traced_leak()
    assert fd_leak.decide(evidence(probes={"fd-leak": (None, None)}, traced=[traced])) == [traced]
    outside = Violation("fd-leak", "2 socket(s) still open")
    ev = evidence(probes={"fd-leak": (outside, "1 connection(s) still ESTABLISHED")})
    assert fd_leak.decide(ev) == [outside]
    assert ev.warnings == ["1 connection(s) still ESTABLISHED"]


def test_no_leak_seen_either_way_does_not_fire() -> None:
    assert fd_leak.decide(evidence(probes={"fd-leak": (None, None)})) == []


def test_a_process_that_exited_holding_fds_leaked_none() -> None:
    """The kernel closes every fd of an exiting process: a connection its peer left, still open
    in the trace when the process exited, was closed by the exit."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    assert counts(t.check()) == {"fd-leak": 1}
    t.exit()
    t.wait(tid=1, epfd=EP, events=[])  # later calls do not bring it back
    assert counts(t.check()) == {}


def _leak_then_exit(t: TraceBuilder) -> int:
    """A server leaks fd 7 (its peer left), then exits: the seq between the two."""
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    cutoff = t.seq
    t.exit()
    return cutoff


def test_an_exit_after_the_cutoff_does_not_excuse_a_leak() -> None:
    """The harness stops the server after the scenario: an exit then ends a leak the
    scenario already showed."""
    t = TraceBuilder()
    cutoff = _leak_then_exit(t)
    assert counts(t.check(cutoff_seq=cutoff)) == {"fd-leak": 1}


def test_peer_gone_only_after_the_cutoff_is_no_leak() -> None:
    """apache2's lingering close: the worker ADDs the connection to wait for the client's FIN;
    the wait that reports it began before the cut-off and returned after it.  The server
    learned of the close too late to act on it within what is judged."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7)
    t.write(tid=1, fd=7)
    t.shutdown(tid=1, fd=7, how=1)
    w = t.begin(t.wait, tid=1, epfd=EP, events=[(IN | RDHUP, A)])
    cutoff = t.seq
    t.end(w)
    assert counts(t.check(cutoff_seq=cutoff)) == {}
    t.skip(5)
    v = t.check(cutoff_seq=t.seq)  # the same FIN seen before the end: a leak
    assert counts(v) == {"fd-leak": 1}
    assert "epoll said HUP" in v.occurrences["fd-leak"][0].summary


KILLED = "the harness ended it (fault 'kill' sent SIGKILL)"


def test_a_process_gone_at_the_cutoff_leaked_none() -> None:
    """A SIGKILLed process writes no exit into its trace: the harness, which saw it gone when
    it looked at the cut-off, says so, and the kernel's release of its fds is no leak."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    cutoff = t.seq
    assert counts(t.check(cutoff_seq=cutoff)) == {"fd-leak": 1}  # nobody looked: judged
    killed = t.check(cutoff_seq=cutoff, running=Running(frozenset(), {100: KILLED}))
    assert counts(killed) == {}
    assert f"pid 100: {KILLED}; the kernel released the 1 connection(s)" in " ".join(
        killed.warnings
    )
    unseen = t.check(cutoff_seq=cutoff, running=Running(frozenset({1, 2})))
    assert counts(unseen) == {}
    assert any(NOT_RUNNING in w for w in unseen.warnings)


def test_a_process_running_at_the_cutoff_is_judged_whatever_ended_its_number_before() -> None:
    """The harness ended a process 100 earlier; a process 100 that runs at the cut-off is a
    new one (a container's PID 1 after a restart, a reused number): its leak is a leak."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    v = t.check(running=Running(frozenset({100}), {100: KILLED}))
    assert counts(v) == {"fd-leak": 1}
    assert not any("released" in w for w in v.warnings)


def test_a_survivor_leaks_beside_a_killed_process() -> None:
    """Worker 100 was killed holding a connection its peer left; worker 200 still runs and
    holds one too: only 200's is reported."""
    t = TraceBuilder()
    server(t)
    t.fork(tid=1, child=200)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    t.accept(tid=2, ret=8, pid=200)
    t.read(tid=2, fd=8, ret=0, pid=200)
    v = t.check(running=Running(frozenset({200}), {100: KILLED}))
    assert counts(v) == {"fd-leak": 1}
    (found,) = v.occurrences["fd-leak"]
    assert "fd 8" in found.summary and "pid 200" in found.summary


def test_an_exit_or_a_crash_in_the_trace_speaks_for_itself() -> None:
    """A process whose trace records its exit needs no word from the harness: none is given;
    an exit after the cut-off proves it ran then, and its leak is judged."""
    t = TraceBuilder()
    cutoff = _leak_then_exit(t)
    late = t.check(cutoff_seq=cutoff, running=Running(frozenset(), {100: KILLED}))
    assert counts(late) == {"fd-leak": 1}
    t.skip(1)
    v = t.check(cutoff_seq=t.seq, running=Running(frozenset(), {100: KILLED}))
    assert counts(v) == {}
    assert not any(KILLED in w for w in v.warnings)
