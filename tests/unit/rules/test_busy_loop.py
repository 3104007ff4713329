"""busy-loop: fires when the CPU measured while clients were idle exceeds idle + allowed."""

from __future__ import annotations

from evidence_kit import evidence

from afterclose.harness.oracle.evidence import CPU_WHILE_IDLE, UNSOLICITED_BYTES, Observation
from afterclose.harness.oracle.rules import busy_loop


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
