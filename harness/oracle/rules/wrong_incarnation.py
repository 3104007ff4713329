"""wrong-incarnation: a thread acted on a reused fd number on behalf of an older incarnation.

Four shapes prove it: closing the number again after another thread was handed it; acting on
the number after an event for the old incarnation in the same wait batch (or on a connection of
any number that another thread registered with that event's data after the wait returned); an
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
from afterclose.harness.trace.timeline import fmt_data

NAME = "wrong-incarnation"

_VERBS = {
    Op.SHUTDOWN: "shut down",
    Op.READ: "read from",
    Op.WRITE: "wrote to",
    Op.CLOSE: "closed",
    Op.EPOLL_CTL: "called epoll_ctl on",
}


CLOSE_AGAIN = (
    "{t} closed fd {fd} twice: its first close ended {old} at seq {old_end}; its second close "
    "(seq {seq}) ended {new}, a different file {new_created} -- a double close that EBADF "
    "never revealed"
)
AFTER_EVENT = (
    "{t} got an event for {old} (seq {event_seq}); {old} was then {old_closed} and fd {fd} "
    "reused as {new} ({new_created}); {t} then called {call} on {new}, a stranger's "
    "connection, before its next epoll_wait"
)
AFTER_EVENT_DATA = (
    "{t} got an event for {old} (seq {event_seq}, data={data}); {old} was then {old_closed}, "
    "and another thread set its data for {new} ({new_created}); {t} then called {call} on "
    "{new}, a stranger's connection, before its next epoll_wait"
)
MOD_ENOENT = (
    "epoll_ctl({epfd}, MOD, {fd}) in {t} at seq {seq} failed with ENOENT: its data={data} "
    "belongs to {old} ({old_closed}); fd {fd} now is {new} ({new_created}), not registered yet"
)
BEFORE_STALE = (
    "{t} {verb} {new} (a stranger's connection, {new_created}) at seq {seq} while acting for "
    "{old}: its epoll_ctl at seq {ctl_seq} re-armed fd {fd} with {old}'s data"
)


def _close_again(m: TraceModel, fact: CloseAgainAfterReuse) -> Finding:
    i, j = fact.first, fact.now
    w = m.words(fact.idx, i, j)
    notes = {
        i.end_idx: f"first close by {w['t']}",
        j.created_idx: f"{w['new']} handed to another thread",
    }
    return m.reuse_finding(RULE, CLOSE_AGAIN.format_map(w), fact.idx, i, j, notes=notes)


def _after_event(m: TraceModel, fact: ActAfterEvent) -> Finding:
    ev = fact.event_idx
    w = m.words(fact.idx, fact.event_inc, fact.now)
    notes = {ev: f"event for {w['old']} to {w['t']}"}
    if fact.data is None:
        summary = AFTER_EVENT.format(**w, event_seq=m.records[ev].seq_out)
        return m.reuse_finding(
            RULE, summary, fact.idx, fact.event_inc, fact.now, refs=(ev,), notes=notes
        )
    summary = AFTER_EVENT_DATA.format(
        **w, event_seq=m.records[ev].seq_out, data=fmt_data(fact.data)
    )
    return m.reuse_finding(
        RULE, summary, fact.idx, fact.event_inc, fact.now, data=fact.data, refs=(ev,), notes=notes
    )


def _mod_enoent(m: TraceModel, fact: ModOfReplaced) -> Finding:
    r = m.records[fact.idx]
    w = m.words(fact.idx, fact.old, fact.now)
    summary = MOD_ENOENT.format(**w, epfd=r.arg, data=fmt_data(r.data))
    owner = fact.owner_set_idx
    notes = {owner: f"data set for {w['old']}"}
    return m.reuse_finding(
        RULE, summary, fact.idx, fact.old, fact.now, data=r.data, refs=(owner,), notes=notes
    )


def _before_stale(m: TraceModel, fact: StaleData, op_idx: int) -> Finding:
    o = m.records[op_idx]
    w = m.words(op_idx, fact.old, fact.now)
    verb = _VERBS.get(o.op, f"called {w['call']} on")
    summary = BEFORE_STALE.format(**w, verb=verb, ctl_seq=m.records[fact.idx].seq_in)
    notes = {fact.idx: f"stale re-arm for {w['old']}"}
    return m.reuse_finding(
        RULE, summary, op_idx, fact.old, fact.now, data=fact.data, refs=(fact.idx,), notes=notes
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
