"""stale-batch-event: a thread dispatched an event of its wait batch to a new connection on a
number that the same batch's handling had closed."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import StaleBatchEvent, TraceModel
from afterclose.harness.trace.findings import Finding

NAME = "stale-batch-event"


SUMMARY = (
    "epoll_wait({epfd}) in {t} (returned at seq {wait_out}) held an event for {old}; before "
    "handling it {t} closed {old} (seq {close_seq}) and fd {fd} became {new} ({new_created}); "
    "{t} registered it, moved on, and then called {call} on {new} with no event for it before "
    "its next epoll_wait: the batch's event for {old} was dispatched to the new connection"
)


def _finding(m: TraceModel, fact: StaleBatchEvent) -> Finding:
    wait = m.records[fact.wait_idx]
    w = m.words(fact.idx, fact.event_inc, fact.now)
    close_seq = m.records[fact.close_idx].seq_in
    summary = SUMMARY.format(**w, epfd=wait.fd, wait_out=wait.seq_out, close_seq=close_seq)
    notes = {
        fact.wait_idx: f"batch with an event for {w['old']}",
        fact.close_idx: f"{w['old']} closed, its event still ahead",
    }
    return m.reuse_finding(
        RULE, summary, fact.idx, fact.event_inc, fact.now, refs=(fact.wait_idx,), notes=notes
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
