"""A fault report keeps what its clients observed, bounded, and merges it."""

from __future__ import annotations

from afterclose.faults.base import MAX_OBSERVATIONS, FaultReport
from afterclose.harness.oracle.evidence import FOREIGN_ANSWER, UNSOLICITED_BYTES, Observation


def test_observations_are_bounded_and_the_rest_counted() -> None:
    report = FaultReport("reset_peer")
    for n in range(MAX_OBSERVATIONS + 7):
        report.observe(Observation(UNSOLICITED_BYTES, f"conn {n}", "bytes"))
    assert len(report.observations) == MAX_OBSERVATIONS
    assert report.counts["observations_dropped"] == 7
    assert f"{UNSOLICITED_BYTES}={MAX_OBSERVATIONS}" in report.summary()


def test_merge_keeps_both_reports_observations_in_order() -> None:
    a, b = FaultReport("reset_peer"), FaultReport("half_close")
    first = Observation(UNSOLICITED_BYTES, "conn 0", "x")
    second = Observation(FOREIGN_ANSWER, "conn 1", "y")
    a.observe(first)
    b.observe(second)
    a.merge(b)
    assert a.observations == [first, second]
    assert "no observation" in FaultReport("pause").summary()
