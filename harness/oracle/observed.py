"""The verdicts drawn from what target-side faults observed: ``busy-loop`` from the CPU a
server wanted while its clients were idle, ``liveness`` from state lost across a restart.

One violation per rule, in order of first appearance, the rest of its findings as details.
"""

from __future__ import annotations

from collections.abc import Iterable

from afterclose.harness.oracle import evidence, verdict
from afterclose.harness.oracle.verdict import Violation

SPIN_EXPLAINED = "it keeps waking up with nothing it can do (a level-triggered fd it never drains?)"


def _finding(obs: evidence.Observation) -> tuple[str, str] | None:
    """The rule ``obs`` breaks and what to tell, or None if it breaks none."""
    if obs.kind == evidence.CPU_WHILE_IDLE:
        values = obs.values
        if values["busy"] > values["idle"] + values["allowed"]:
            return verdict.BUSY_LOOP, f"{obs.detail}: {SPIN_EXPLAINED}"
        return None
    if obs.kind == evidence.STATE_LOST_ON_RESTART:
        return verdict.LIVENESS, obs.detail
    return None


def judge(observations: Iterable[evidence.Observation]) -> list[Violation]:
    """The violations the observations of target-side faults prove."""
    by_rule: dict[str, list[str]] = {}
    for obs in observations:
        found = _finding(obs)
        if found is not None:
            by_rule.setdefault(found[0], []).append(found[1])
    out = []
    for rule, details in by_rule.items():
        extra = "\n".join(details[1:10])
        out.append(Violation(rule, details[0], details=extra, count=len(details)))
    return out
