"""stale-rearm: epoll_ctl gave a reused fd number the data of its closed incarnation."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import StaleData, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import EPOLL_CTL_ADD
from afterclose.harness.trace.timeline import fmt_data

NAME = "stale-rearm"


SUMMARY = (
    "epoll_ctl({epfd}, {what}, {fd}) in {t} at seq {seq} set data={data}, the data of {old} "
    "({old_closed}); fd {fd} now is {new}, a different connection ({new_created})"
)


def _finding(m: TraceModel, fact: StaleData) -> Finding:
    r = m.records[fact.idx]
    i, j, d = fact.old, fact.now, fact.data
    w = m.words(fact.idx, i, j)
    what = "ADD" if r.flags == EPOLL_CTL_ADD else "MOD"
    summary = SUMMARY.format(**w, epfd=r.arg, what=what, data=fmt_data(d))
    if fact.followups:
        n = len(fact.followups)
        summary += f"; {n} event{'s' if n != 1 else ''} delivered with the stale data afterwards"
    notes = {
        fact.idx: f"data of {w['old']} ({w['old_closed']})",
        fact.owner_set_idx: f"data set for {w['old']}",
    }
    refs = (fact.owner_set_idx,)
    f = m.reuse_finding(RULE, summary, fact.idx, i, j, data=d, refs=refs, notes=notes)
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
