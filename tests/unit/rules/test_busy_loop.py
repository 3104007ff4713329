"""busy-loop: fires when the CPU measured while clients were idle exceeds idle + allowed, when
the trace shows a thread repeating the same empty read thousands of times in a row, and when
its waits deliver the same event for a connection thousands of times while it never acts on
it (an error on a registration whose interest mask is empty)."""

from __future__ import annotations

from evidence_kit import evidence
from tracebuild import (
    EAGAIN,
    EP,
    HUP,
    IN,
    LISTEN,
    RDHUP,
    A,
    B,
    C,
    TraceBuilder,
    conn,
    counts,
    server,
)

from afterclose.harness.oracle.evidence import CPU_WHILE_IDLE, UNSOLICITED_BYTES, Observation
from afterclose.harness.oracle.rules import busy_loop
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.format import EPOLLERR as ERR
from afterclose.harness.trace.receipts import SPIN_CALLS


def cpu(busy: float, detail: str = "spins") -> Observation:
    values = {"idle": 0.05, "busy": busy, "allowed": 0.25, "window_s": 1.0}
    return Observation(CPU_WHILE_IDLE, "fd_limit", detail, values=values)


def test_cpu_above_idle_plus_allowed_fires() -> None:
    (v,) = busy_loop.decide(evidence(cpu(0.9, "at its fd limit"), cpu(0.1), cpu(0.8, "after")))
    assert v.rule == "busy-loop" and v.count == 2
    assert v.summary == "at its fd limit" and v.details == "after"


def test_cpu_within_the_allowance_does_not_fire() -> None:
    assert busy_loop.decide(evidence(cpu(0.05), cpu(0.30))) == []  # 0.30 == idle + allowed
    assert busy_loop.decide(evidence(Observation(UNSOLICITED_BYTES, "conn 1", "x"))) == []


def test_a_thread_reading_eof_over_and_over_spins() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    for _ in range(SPIN_CALLS + 5):
        t.wait(tid=1, epfd=EP, events=[(IN, A)])
        t.read(tid=1, fd=7, ret=0)  # level-triggered EOF, never closed
    v = t.check()
    assert counts(v) == {"busy-loop": 1, "fd-leak": 1}  # and it never closes the connection
    (summary,) = [x.summary for x in v.violations if x.rule == "busy-loop"]
    assert "T1" in summary and "read() returned 0 (EOF)" in summary and "7#1" in summary
    assert f"{SPIN_CALLS + 5} times" in summary


def test_eagain_runs_broken_by_data_and_single_eofs_are_fine() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    for n in range(3 * SPIN_CALLS):
        t.wait(tid=1, epfd=EP, events=[(IN, A)])
        if n % (SPIN_CALLS // 2) == 0:
            t.read(tid=1, fd=7, ret=100)  # data now and then: the reads are not empty
        t.read(tid=1, fd=7, err=EAGAIN)
    for fd, data in ((8, B), (9, C)):
        conn(t, fd, data)
        t.read(tid=1, fd=fd, ret=0)
        t.close(tid=1, fd=fd)
    assert counts(t.check()) == {}


def test_traced_spins_join_the_cpu_observations() -> None:
    traced = Violation("busy-loop", "T1 spins")
    found = busy_loop.decide(evidence(cpu(0.9, "at its fd limit"), traced=[traced]))
    assert [v.summary for v in found] == ["T1 spins", "at its fd limit"]


def test_a_thread_wanting_a_cpu_in_the_quiet_window_spins() -> None:
    s = busy_loop.Spinner(pid=40, tid=41, name="worker", demand=0.97, window_s=0.3)
    (v,) = busy_loop.decide(evidence(probes={"busy-loop": [s]}))
    assert "thread worker (pid 40, tid 41)" in v.summary and "97%" in v.summary


def test_the_probe_is_silent_when_the_trace_already_names_the_spin() -> None:
    s = busy_loop.Spinner(pid=40, tid=41, name="worker", demand=0.97, window_s=0.3)
    traced = Violation("busy-loop", "T1 spins")
    found = busy_loop.decide(evidence(probes={"busy-loop": [s]}, traced=[traced]))
    assert [v.summary for v in found] == ["T1 spins"]
    assert busy_loop.decide(evidence(probes={"busy-loop": []})) == []


def half_closed_then_reset(t: TraceBuilder, waits: int, *, touch_every: int = 0) -> None:
    """7#1 reads its peer's EOF, stays open with an empty interest mask, then gets a RST:
    every wait reports ERR|HUP for it (``touch_every``: the thread reads it that often)."""
    server(t)
    conn(t, 7, A, events=IN | RDHUP)
    t.wait(tid=1, epfd=EP, events=[(IN | RDHUP, A)])
    t.read(tid=1, fd=7, ret=0)
    t.ctl_mod(tid=1, epfd=EP, fd=7, data=A, events=0)
    for n in range(waits):
        t.wait(tid=1, epfd=EP, events=[(ERR | HUP, A)])
        if touch_every and n % touch_every == 0:
            t.read(tid=1, fd=7, err=104)  # ECONNRESET
    t.close(tid=1, fd=7)


def test_waits_reporting_an_error_the_thread_never_handles_spin() -> None:
    t = TraceBuilder()
    half_closed_then_reset(t, SPIN_CALLS + 5)
    v = t.check()
    assert counts(v) == {"busy-loop": 1}
    (summary,) = [x.summary for x in v.violations if x.rule == "busy-loop"]
    assert "T1" in summary and "7#1" in summary and "ERR|HUP" in summary
    assert f"{SPIN_CALLS + 5} times in a row" in summary
    assert "asks for no event" in summary and "never closed" in summary


def test_events_the_thread_acts_on_or_few_of_them_are_no_spin() -> None:
    t = TraceBuilder()
    half_closed_then_reset(t, 3 * SPIN_CALLS, touch_every=SPIN_CALLS // 2)
    assert counts(t.check()) == {}
    t = TraceBuilder()
    half_closed_then_reset(t, SPIN_CALLS - 2)
    assert counts(t.check()) == {}


def test_a_level_triggered_event_ignored_with_a_mask_asking_for_it_spins_unnamed() -> None:
    """A loop that skips a readable connection it registered for reading spins too; the
    summary then says nothing about an empty mask."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    for _ in range(SPIN_CALLS):
        t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.close(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {"busy-loop": 1}
    assert "asks for no event" not in v.violations[0].summary


def test_a_busy_listener_the_thread_accepts_from_is_no_spin() -> None:
    t = TraceBuilder()
    server(t)
    for _ in range(2 * SPIN_CALLS):
        t.wait(tid=1, epfd=EP, events=[(IN, LISTEN)])
        t.accept(tid=1, ret=7)  # the listener's event, acted on (accept names the listener)
        t.close(tid=1, fd=7)
    assert counts(t.check()) == {}


def test_a_listener_another_thread_accepts_from_is_no_spin() -> None:
    """Two pollers share a level-triggered listener; T1 keeps being told while T2 accepts."""
    t = TraceBuilder()
    server(t)
    for n in range(2 * SPIN_CALLS):
        t.wait(tid=1, epfd=EP, events=[(IN, LISTEN)])
        if n % 10 == 0:
            t.accept(tid=2, ret=7)
            t.close(tid=2, fd=7)
    assert counts(t.check()) == {}
