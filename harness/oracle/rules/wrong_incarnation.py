"""wrong-incarnation: a thread acted on a reused fd number on behalf of an older incarnation.

Four shapes prove it: closing the number again after another thread was handed it; acting on
the number after an event for the old incarnation in the same wait batch; an
EPOLL_CTL_MOD that fails with ENOENT carrying the old incarnation's data; and calls made
before a stale re-arm by the same thread.  One call is reported once, by the first shape that
proves it.
"""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import (
    ActAfterEvent,
    CloseAgainAfterReuse,
    ModOfReplaced,
    StaleData,
    TraceModel,
)
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import Op
from afterclose.harness.trace.timeline import call_str, fmt_data

NAME = "wrong-incarnation"

_VERBS = {
    Op.SHUTDOWN: "shut down",
    Op.READ: "read from",
    Op.WRITE: "wrote to",
    Op.CLOSE: "closed",
    Op.EPOLL_CTL: "called epoll_ctl on",
}


def _close_again(m: TraceModel, fact: CloseAgainAfterReuse) -> Finding:
    r = m.records[fact.idx]
    i, j = fact.first, fact.now
    t = m.tname(r.pid, r.tid)
    summary = (
        f"{t} closed fd {j.fd} twice: its first close ended {m.label(i)} at seq "
        f"{i.end_out}; its second close (seq {r.seq_in}) ended {m.label(j)}, a "
        f"different file {m.created_desc(j)} -- a double close that EBADF never "
        "revealed"
    )
    return m.finding(
        RULE,
        summary,
        fact.idx,
        j.fd,
        refs=(i.end_idx, j.created_idx),
        notes={
            i.end_idx: f"first close by {t}",
            j.created_idx: f"{m.label(j)} handed to another thread",
        },
    )


def _after_event(m: TraceModel, fact: ActAfterEvent) -> Finding:
    r = m.records[fact.idx]
    i, j = fact.event_inc, fact.now
    t = m.tname(r.pid, r.tid)
    summary = (
        f"{t} got an event for {m.label(i)} (seq {m.records[fact.event_idx].seq_out}); "
        f"{m.label(i)} was then {m.closed_desc(i)} and fd {j.fd} reused as "
        f"{m.label(j)} ({m.created_desc(j)}); {t} then called {call_str(r)} "
        f"on {m.label(j)}, a stranger's connection, before its next epoll_wait"
    )
    return m.finding(
        RULE,
        summary,
        fact.idx,
        j.fd,
        refs=(fact.event_idx, i.end_idx, j.created_idx),
        notes={fact.event_idx: f"event for {m.label(i)} to {t}"},
    )


def _mod_enoent(m: TraceModel, fact: ModOfReplaced) -> Finding:
    r = m.records[fact.idx]
    i, j = fact.old, fact.now
    summary = (
        f"epoll_ctl({r.arg}, MOD, {r.fd}) in {m.tname(r.pid, r.tid)} at seq {r.seq_in} failed "
        f"with ENOENT: its data={fmt_data(r.data)} belongs to {m.label(i)} "
        f"({m.closed_desc(i)}); fd {r.fd} now is {m.label(j)} "
        f"({m.created_desc(j)}), not registered yet"
    )
    return m.finding(
        RULE,
        summary,
        fact.idx,
        r.fd,
        r.data,
        refs=(fact.owner_set_idx, i.end_idx, j.created_idx),
        notes={fact.owner_set_idx: f"data set for {m.label(i)}"},
    )


def _before_stale(m: TraceModel, fact: StaleData, op_idx: int) -> Finding:
    r = m.records[fact.idx]
    o = m.records[op_idx]
    i, j = fact.old, fact.now
    verb = _VERBS.get(o.op, f"called {call_str(o)} on")
    summary = (
        f"{m.tname(r.pid, r.tid)} {verb} {m.label(j)} (a stranger's connection, "
        f"{m.created_desc(j)}) at seq {o.seq_in} while acting for {m.label(i)}: "
        f"its epoll_ctl at seq {r.seq_in} re-armed fd {j.fd} with {m.label(i)}'s data"
    )
    return m.finding(
        RULE,
        summary,
        op_idx,
        j.fd,
        r.data,
        refs=(j.created_idx, fact.idx, i.end_idx),
        notes={fact.idx: f"stale re-arm for {m.label(i)}"},
    )


def find(m: TraceModel) -> list[Finding]:
    out: list[Finding] = []
    reported: set[int] = set()  # record indices: one finding per call
    batches: set[tuple[int, int]] = set()  # (wait, fd): one finding per number per wait batch
    for fact in m.facts:
        if isinstance(fact, CloseAgainAfterReuse | ModOfReplaced):
            if fact.idx not in reported:
                reported.add(fact.idx)
                out.append(
                    _close_again(m, fact)
                    if isinstance(fact, CloseAgainAfterReuse)
                    else _mod_enoent(m, fact)
                )
        elif isinstance(fact, ActAfterEvent):
            key = (fact.batch_idx, fact.now.fd)
            if fact.idx in reported or key in batches:
                continue
            batches.add(key)
            reported.add(fact.idx)
            out.append(_after_event(m, fact))
        elif isinstance(fact, StaleData):
            for op_idx in fact.acted:
                if op_idx not in reported:
                    reported.add(op_idx)
                    out.append(_before_stale(m, fact, op_idx))
    return out


RULE = Rule(
    NAME,
    "a thread acted on a reused fd number for an older incarnation",
    why=(
        "the fd number was closed and handed to a new connection; this thread still acts on "
        "the old connection's behalf and so touches a stranger's connection."
    ),
    traced=find,
)
