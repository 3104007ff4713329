"""stale-rearm: epoll_ctl gave a reused fd number the data of its closed incarnation."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import StaleData, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import EPOLL_CTL_ADD
from afterclose.harness.trace.timeline import fmt_data

NAME = "stale-rearm"


def _finding(m: TraceModel, fact: StaleData) -> Finding:
    r = m.records[fact.idx]
    i, j, d = fact.old, fact.now, fact.data
    what = "ADD" if r.flags == EPOLL_CTL_ADD else "MOD"
    summary = (
        f"epoll_ctl({r.arg}, {what}, {r.fd}) in {m.tname(r.pid, r.tid)} at seq {r.seq_in} set "
        f"data={fmt_data(d)}, the data of {m.label(i)} ({m.closed_desc(i)}); "
        f"fd {r.fd} now is {m.label(j)}, a different connection "
        f"({m.created_desc(j)})"
    )
    if fact.followups:
        n = len(fact.followups)
        summary += f"; {n} event{'s' if n != 1 else ''} delivered with the stale data afterwards"
    notes = {
        fact.idx: f"data of {m.label(i)} ({m.closed_desc(i)})",
        fact.owner_set_idx: f"data set for {m.label(i)}",
    }
    if i.end_idx >= 0:
        notes.setdefault(i.end_idx, f"{m.label(i)} closed here")
    f = m.finding(
        RULE,
        summary,
        fact.idx,
        r.fd,
        d,
        refs=(fact.owner_set_idx, i.end_idx, j.created_idx),
        notes=notes,
    )
    f.followups = list(fact.followups)
    return f


def find(m: TraceModel) -> list[Finding]:
    return [_finding(m, fact) for fact in m.of(StaleData)]


RULE = Rule(
    NAME,
    "`epoll_ctl` re-armed a reused fd number with a closed incarnation's data",
    why=(
        "the fd number now belongs to a new connection, but its epoll data points at the old "
        "connection's state (often freed memory): the next event is handled as the wrong "
        "connection."
    ),
    traced=find,
)
