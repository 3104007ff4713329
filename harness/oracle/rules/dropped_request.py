"""dropped-request: a complete request on an undisturbed connection got EOF or RST, no answer.

The client observes it (``DROPPED_REQUEST``) only on connections its behaviour did not plan to
reset, half-close or shut down, and only when the server's FIN or RST was not already queued
when the request went out (a server may close an idle keep-alive connection between requests;
the request then races that close and was never the server's to answer), nor when a RST
followed the server's FIN (its close() threw the request away unread: the same race, seen
after the fact; ``conn.unread_when_closed``).  This rule leaves out what the harness itself
may have caused:

- faults that end connections they did not plan to (``disturbs_connections``: forged segments,
  limits, signals, restarts): a server at its fd limit may refuse what it cannot take;
- runs whose calls the harness perturbed (syscall faults, chaos): an injected ECONNRESET on a
  write rightly ends that connection;
- a server that died (the crash rule reports it; its unanswered requests are echoes);
- requests sent after the connection had been quiet for IDLE_GRACE_S or more: an idle timer
  may rightly close such a connection just as the request arrives.

A ``Connection: close`` request is answered first and closed after: its answer is awaited like
any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from afterclose.harness.oracle.evidence import DROPPED_REQUEST, Observation
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation

if TYPE_CHECKING:
    from afterclose.faults.base import FaultReport
    from afterclose.harness.oracle.judge import Evidence

NAME = "dropped-request"
SHOWN = 10
IDLE_GRACE_S = 1.0


def _disturbs(report: FaultReport) -> bool:
    """Whether any fault behind ``report`` may end connections on its own."""
    from afterclose import faults
    from afterclose.harness.errors import ScenarioError

    for name in report.fault.split("+"):
        try:
            cls = faults.get_any(name)
        except ScenarioError:
            continue  # not a registered fault (a report built by hand): its clients decided
        if cls.disturbs_connections:
            return True
    return False


def _died(ev: Evidence) -> bool:
    """The server exited on its own: its unanswered requests are the crash's echoes."""
    if ev.server is None:
        return False
    status = ev.server.exit_status()
    return status is not None and not status.stopped_by_harness


def decide(ev: Evidence) -> list[Violation]:
    if ev.perturbed or _died(ev):
        return []
    drops: list[Observation] = []
    for report in ev.reports:
        if _disturbs(report):
            continue
        drops += [
            o
            for o in report.observations
            if o.kind == DROPPED_REQUEST and o.values.get("idle_s", 0.0) < IDLE_GRACE_S
        ]
    if not drops:
        return []
    requests = sum(int(o.values.get("requests", 1)) for o in drops)
    shown = [o.detail for o in drops[:SHOWN]]
    more = f"\n... and {len(drops) - len(shown)} more" if len(drops) > len(shown) else ""
    summary = (
        f"{requests} complete request(s) on {len(drops)} undisturbed connection(s) got EOF "
        f"or RST instead of an answer; first: {drops[0].detail}"
    )
    return [Violation(NAME, summary, details="\n".join(shown) + more, count=len(drops))]


RULE = Rule(
    NAME,
    "a complete request on a connection the harness did not disturb got EOF or RST instead "
    "of an answer",
    decide=decide,
)
