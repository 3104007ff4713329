"""concurrent-oneshot: two threads handled one EPOLLONESHOT connection at once."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import ConcurrentOneshot, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.timeline import call_str

NAME = "concurrent-oneshot"


def _finding(m: TraceModel, fact: ConcurrentOneshot) -> Finding:
    recs = m.records
    wait = recs[fact.wait_idx]
    a, b, c = recs[fact.first], recs[fact.other], recs[fact.last]
    i = fact.inc
    ta, tb = m.tname(a.pid, a.tid), m.tname(b.pid, b.tid)
    if fact.first == fact.last:
        how = (
            f"{ta}'s {call_str(a)} (seq {a.seq_in}-{a.seq_out}) and {tb}'s {call_str(b)} "
            f"(seq {b.seq_in}-{b.seq_out}) ran at the same time"
        )
    else:
        how = (
            f"{ta} called {call_str(a)} (seq {a.seq_in}), {tb} {call_str(b)} (seq {b.seq_in}), "
            f"then {ta} {call_str(c)} (seq {c.seq_in})"
        )
    summary = (
        f"{m.label(i)} is registered with EPOLLONESHOT; after epoll_wait({wait.fd}) delivered "
        f"it (seq {wait.seq_out}) and before its next delivery, two threads handled it at "
        f"once: {how}"
    )
    notes = {fact.wait_idx: f"ONESHOT delivery of {m.label(i)}"}
    if fact.rearm_idx >= 0:
        r = recs[fact.rearm_idx]
        summary += f"; the delivery was armed by {m.tname(r.pid, r.tid)}'s MOD at seq {r.seq_in}"
        notes[fact.rearm_idx] = "re-armed here"
    return m.finding(
        RULE,
        summary,
        fact.other,
        i.fd,
        refs=(fact.wait_idx, fact.rearm_idx, fact.first, fact.last),
        notes=notes,
    )


def find(m: TraceModel) -> list[Finding]:
    return [_finding(m, fact) for fact in m.of(ConcurrentOneshot)]


RULE = Rule(
    NAME,
    "two threads handled one `EPOLLONESHOT` connection at once: the registration was re-armed "
    "before its handler's last touch of the connection",
    why=(
        "EPOLLONESHOT hands each event to one thread only if the handler re-arms the "
        "registration as its last touch of the connection; re-armed earlier, the next event "
        "goes to a second thread while the first still reads, writes or closes it."
    ),
    traced=find,
)
