"""cross-talk: a client received bytes it never asked for, or another request's answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from afterclose.harness.oracle.evidence import FOREIGN_ANSWER, UNSOLICITED_BYTES
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "cross-talk"
SHOWN = 10


def decide(ev: Evidence) -> list[Violation]:
    # Both kinds are proof on their own: a correct server never sends bytes nobody asked for,
    # and never answers one request with another's tag.
    found = [f"{o.who}: {o.detail}" for o in ev.observations(UNSOLICITED_BYTES, FOREIGN_ANSWER)]
    if not found:
        return []
    shown = found[:SHOWN]
    more = f"\n... and {len(found) - len(shown)} more" if len(found) > len(shown) else ""
    return [Violation(NAME, found[0], details="\n".join(shown) + more, count=len(found))]


RULE = Rule(NAME, "a client received bytes it never asked for", decide=decide)
