"""foreign-close: a thread closed a connection it was never handed.

The root cause behind many EBADF echoes: a thread (an idle timer, a reaper) keeps an fd number
after its connection ended and closes the number later, when it already names a new
connection.  The trace cannot see hand-offs through the server's own queues, so the rule fires
only on the shape no hand-off explains: another thread accepted the connection and registered
it with epoll, the closing thread's last call on the number was on an older connection (it
made none on this one), no epoll wait had been handed an event for it when the close began,
and the connection was younger than
``receipts.FOREIGN_CLOSE_YOUNG_NS`` (an idle timer may rightly close an older, silent one).
"""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import ForeignClose, TraceModel
from afterclose.harness.trace.findings import Finding

NAME = "foreign-close"


def _finding(m: TraceModel, fact: ForeignClose) -> Finding:
    r = m.records[fact.idx]
    j, i = fact.inc, fact.kept
    t = m.tname(r.pid, r.tid)
    kept = m.records[fact.kept_idx]
    summary = (
        f"{t} closed fd {j.fd} at seq {r.seq_in}, but fd {j.fd} then was {m.label(j)}, "
        f"{m.created_desc(j)} {fact.age_ns / 1e6:.1f} ms earlier, which {t} was never handed "
        f"(no event for it yet, no call on it): {t}'s last call on fd {j.fd} (seq "
        f"{kept.seq_in}) was for {m.label(i)}, an older connection"
        + (f" {m.closed_desc(i)}" if not i.open else "")
    )
    refs = (fact.kept_idx, i.end_idx, j.created_idx, fact.added_idx)
    notes = {
        fact.kept_idx: f"{t} on {m.label(i)}",
        j.created_idx: f"{m.label(j)} accepted",
        fact.added_idx: f"{m.label(j)} registered",
    }
    return m.finding(RULE, summary, fact.idx, j.fd, refs=refs, notes=notes)


def find(m: TraceModel) -> list[Finding]:
    return [_finding(m, fact) for fact in m.of(ForeignClose)]


RULE = Rule(
    NAME,
    "a thread closed a connection it was never handed (accepted by another thread, no event "
    "for it yet): the root cause behind EBADF and wrong-incarnation echoes",
    why=(
        "the closing thread acted on an fd number it kept from an older connection; the "
        "number now names a stranger's connection, which it destroyed before the server "
        "ever served it."
    ),
    traced=find,
)
