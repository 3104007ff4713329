"""cross-talk: decided from the clients' observations of unasked-for bytes and foreign answers."""

from __future__ import annotations

from evidence_kit import evidence

from afterclose.harness.oracle.evidence import (
    CPU_WHILE_IDLE,
    FOREIGN_ANSWER,
    UNSOLICITED_BYTES,
    Observation,
)
from afterclose.harness.oracle.rules import cross_talk


def test_unsolicited_bytes_and_foreign_answers_fire_as_one_violation() -> None:
    ev = evidence(
        Observation(UNSOLICITED_BYTES, "conn 3 (reset_peer)", "received 5 unasked-for bytes"),
        Observation(FOREIGN_ANSWER, "conn 4 (reset_peer)", "the 200 response to /a carries /b"),
    )
    (v,) = cross_talk.decide(ev)
    assert v.rule == "cross-talk" and v.count == 2
    assert v.summary == "conn 3 (reset_peer): received 5 unasked-for bytes"
    assert "conn 4 (reset_peer): the 200 response to /a carries /b" in v.details


def test_many_observations_are_shown_up_to_a_limit() -> None:
    ev = evidence(*(Observation(UNSOLICITED_BYTES, f"conn {n}", "bytes") for n in range(15)))
    (v,) = cross_talk.decide(ev)
    assert v.count == 15 and "... and 5 more" in v.details


def test_no_observation_or_another_kind_does_not_fire() -> None:
    assert cross_talk.decide(evidence()) == []
    idle = {"idle": 0.0, "busy": 1.0, "allowed": 0.1, "window_s": 1.0}
    assert (
        cross_talk.decide(evidence(Observation(CPU_WHILE_IDLE, "fd_limit", "x", values=idle))) == []
    )
