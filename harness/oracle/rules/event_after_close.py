"""event-after-close: epoll delivered an event for an incarnation closed before the wait."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import EventOnClosed, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.timeline import fmt_data

NAME = "event-after-close"


def _finding(m: TraceModel, fact: EventOnClosed) -> Finding:
    wait = m.records[fact.wait_idx]
    i = fact.inc
    holders = fact.holders
    held = ", ".join(m.label(h) for h in holders[:3]) or "another reference"
    summary = (
        f"epoll_wait({wait.fd}) in {m.tname(wait.pid, wait.tid)} (began at seq {wait.seq_in}) "
        f"returned {fmt_data(fact.data)} for {m.label(i)}, which was {m.closed_desc(i)} before "
        f"the wait began; the registration survived because {held} still refers to the "
        "same open file"
    )
    refs = [fact.added_idx, i.end_idx]
    refs += [h.created_idx for h in holders[:2]]
    return m.finding(
        RULE,
        summary,
        fact.wait_idx,
        i.fd,
        fact.data,
        refs=refs,
        notes={i.end_idx: f"{m.label(i)} closed; its registration stays"},
    )


def find(m: TraceModel) -> list[Finding]:
    return [_finding(m, fact) for fact in m.of(EventOnClosed)]


RULE = Rule(
    NAME,
    "epoll delivered an event for an fd incarnation closed before the wait began",
    why=(
        "epoll(7): closing an fd does not remove its registration while another fd (a dup or "
        "a fork's copy) still refers to the same open file, so the program is handed events "
        "for a connection it already closed."
    ),
    traced=find,
)
