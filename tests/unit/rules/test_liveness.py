"""liveness: the fresh request after the run (a probe of the running server) and state that
a restart lost."""

from __future__ import annotations

from evidence_kit import evidence

from afterclose.harness.oracle.evidence import STATE_LOST_ON_RESTART, Observation
from afterclose.harness.oracle.rules import liveness
from afterclose.harness.oracle.verdict import Violation


def test_state_lost_on_restart_fires() -> None:
    lost = Observation(STATE_LOST_ON_RESTART, "kill", "GET /kv/a answered 200 before, 404 after")
    (v,) = liveness.decide(evidence(lost))
    assert v.rule == "liveness" and v.summary == lost.detail


def test_a_failed_fresh_request_fires() -> None:
    failed = Violation("liveness", "after the scenario, GET / failed: status 500")
    assert liveness.decide(evidence(probes={"liveness": failed})) == [failed]


def test_an_answered_request_and_no_lost_state_do_not_fire() -> None:
    assert liveness.decide(evidence(probes={"liveness": None})) == []
    assert liveness.decide(evidence()) == []
