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


SUMMARY = (
    "{t} closed fd {fd} at seq {seq}, but fd {fd} then was {new}, {new_created} {age_ms} ms "
    "earlier, which {t} was never handed (no event for it yet, no call on it): {t}'s last call "
    "on fd {fd} (seq {kept_seq}) was for {old}, an older connection{ended}"
)


def _finding(m: TraceModel, fact: ForeignClose) -> Finding:
    j, i = fact.inc, fact.kept
    w = m.words(fact.idx, i, j)
    ended = "" if i.open else f" {w['old_closed']}"
    summary = SUMMARY.format(
        **w,
        age_ms=f"{fact.age_ns / 1e6:.1f}",
        kept_seq=m.records[fact.kept_idx].seq_in,
        ended=ended,
    )
    notes = {
        fact.kept_idx: f"{w['t']} on {w['old']}",
        j.created_idx: f"{w['new']} accepted",
        fact.added_idx: f"{w['new']} registered",
    }
    refs = (fact.kept_idx, fact.added_idx)
    return m.reuse_finding(RULE, summary, fact.idx, i, j, refs=refs, notes=notes)


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
