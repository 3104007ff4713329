"""stale-batch-event: a thread dispatched an event of its wait batch to a new connection on a
number that the same batch's handling had closed."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import StaleBatchEvent, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.timeline import call_str

NAME = "stale-batch-event"


def _finding(m: TraceModel, fact: StaleBatchEvent) -> Finding:
    r = m.records[fact.idx]
    i, j = fact.event_inc, fact.now
    t = m.tname(r.pid, r.tid)
    wait = m.records[fact.wait_idx]
    summary = (
        f"epoll_wait({wait.fd}) in {t} (returned at seq {wait.seq_out}) held an event for "
        f"{m.label(i)}; before handling it {t} closed {m.label(i)} (seq "
        f"{m.records[fact.close_idx].seq_in}) and fd {j.fd} became {m.label(j)} "
        f"({m.created_desc(j)}); {t} registered it, moved on, and then called {call_str(r)} "
        f"on {m.label(j)} with no event for it before its next epoll_wait: the batch's event "
        f"for {m.label(i)} was dispatched to the new connection"
    )
    return m.finding(
        RULE,
        summary,
        fact.idx,
        j.fd,
        refs=(fact.wait_idx, fact.close_idx, j.created_idx),
        notes={
            fact.wait_idx: f"batch with an event for {m.label(i)}",
            fact.close_idx: f"{m.label(i)} closed, its event still ahead",
        },
    )


def find(m: TraceModel) -> list[Finding]:
    return [_finding(m, fact) for fact in m.of(StaleBatchEvent)]


RULE = Rule(
    NAME,
    "an event of an `epoll_wait` batch was dispatched to a new connection on a number that "
    "the same batch's handling had closed",
    why=(
        "the events of one epoll_wait batch are handled one after the other; when the handling "
        "of one event closes another fd whose event is still ahead, and accept hands its number "
        "to a new connection, a dispatch by number runs the new connection's handler with the "
        "old connection's event."
    ),
    traced=find,
)
