"""busy-loop: the server burnt CPU while its clients were idle (e.g. spinning on EMFILE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from afterclose.harness.oracle.evidence import CPU_WHILE_IDLE
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "busy-loop"


def decide(ev: Evidence) -> list[Violation]:
    spins = [
        o
        for o in ev.observations(CPU_WHILE_IDLE)
        if o.values["busy"] > o.values["idle"] + o.values["allowed"]
    ]
    if not spins:
        return []
    extra = "\n".join(o.detail for o in spins[1:10])
    return [Violation(NAME, spins[0].detail, details=extra, count=len(spins))]


RULE = Rule(
    NAME,
    "the target burnt CPU while its clients were idle (e.g. spinning on EMFILE)",
    decide=decide,
)
