"""event-for-freed-data: epoll returned a data pointer freed before the wait began."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import EventFreedData, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.timeline import fmt_data

NAME = "event-for-freed-data"


def _finding(m: TraceModel, fact: EventFreedData) -> Finding:
    wait = m.records[fact.wait_idx]
    f = m.records[fact.free_idx]
    summary = (
        f"epoll_wait({wait.fd}) in {m.tname(wait.pid, wait.tid)} (began at seq {wait.seq_in}) "
        f"returned data={fmt_data(fact.data)} (for {m.label(fact.incarnation)}), a pointer "
        f"freed at seq {f.seq_out} by {m.tname(f.pid, f.tid)} and not registered again since"
    )
    return m.finding(
        RULE,
        summary,
        fact.wait_idx,
        fact.incarnation.fd,
        fact.data,
        refs=(fact.free_idx, fact.set_idx),
        notes={fact.free_idx: "freed here"},
    )


def find(m: TraceModel) -> list[Finding]:
    return [_finding(m, fact) for fact in m.of(EventFreedData)]


RULE = Rule(
    NAME,
    "epoll returned an event whose data pointer was already freed",
    why="epoll handed the event loop a pointer to memory that was already freed.",
    traced=find,
)
