"""dropped-request: fires on unanswered complete requests of undisturbed connections; not on
reports of faults that end connections themselves, perturbed runs, or long-idle connections."""

from __future__ import annotations

from evidence_kit import evidence

from afterclose.faults.base import FaultReport
from afterclose.harness.oracle.evidence import DROPPED_REQUEST, Observation
from afterclose.harness.oracle.rules import dropped_request


def drop(n: int, idle_s: float = 0.001, requests: int = 1) -> Observation:
    values = {"requests": requests, "reset": 0, "idle_s": idle_s}
    return Observation(DROPPED_REQUEST, f"conn {n}", f"conn {n} got EOF", values=values)


def test_unanswered_requests_fire_with_examples() -> None:
    (v,) = dropped_request.decide(evidence(drop(1), drop(2, requests=3)))
    assert v.rule == "dropped-request" and v.count == 2
    assert v.summary.startswith("4 complete request(s) on 2 undisturbed connection(s)")
    assert v.details.splitlines() == ["conn 1 got EOF", "conn 2 got EOF"]


def test_nothing_dropped_is_clean() -> None:
    assert dropped_request.decide(evidence()) == []


def test_a_connection_quiet_past_the_grace_may_be_closed_by_an_idle_timer() -> None:
    late = drop(1, idle_s=dropped_request.IDLE_GRACE_S)
    assert dropped_request.decide(evidence(late)) == []


def test_perturbed_runs_are_not_judged() -> None:
    ev = evidence(drop(1))
    ev.perturbed = True
    assert dropped_request.decide(ev) == []


def test_faults_that_end_connections_themselves_are_not_judged() -> None:
    ev = evidence()
    for name in ("fd_limit", "forged_rst", "kill"):
        report = FaultReport(name)
        report.observe(drop(1))
        ev.reports = [report]
        assert dropped_request.decide(ev) == [], name
    report = FaultReport("connection_storm")
    report.observe(drop(1))
    ev.reports = [report]
    assert len(dropped_request.decide(ev)) == 1
