"""freed-while-registered: free() of a live registration's data while a wait could return it."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import FreeWhileArmed, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.timeline import fmt_data

NAME = "freed-while-registered"


def _finding(m: TraceModel, fact: FreeWhileArmed) -> Finding:
    f = m.records[fact.free_idx]
    w = m.records[fact.wait_idx]
    i = fact.incarnation
    summary = (
        f"free({fmt_data(f.data)}) in {m.tname(f.pid, f.tid)} at seq {f.seq_in} while it was "
        f"the data of a live, armed registration of {m.label(i)} in epoll fd {w.fd} (set at seq "
        f"{m.records[fact.set_idx].seq_in}); epoll_wait in "
        f"{m.tname(w.pid, w.tid)} (seq {w.seq_in}-{w.seq_out}) could return the "
        "freed pointer"
    )
    return m.finding(
        RULE,
        summary,
        fact.free_idx,
        i.fd,
        f.data,
        refs=(fact.set_idx, fact.wait_idx),
        notes={
            fact.free_idx: "data of a live registration",
            fact.wait_idx: "this wait could deliver the freed pointer",
        },
    )


def find(m: TraceModel) -> list[Finding]:
    return [_finding(m, fact) for fact in m.of(FreeWhileArmed)]


RULE = Rule(
    NAME,
    "`free()` of the data of a registration that could still fire",
    why=(
        "epoll can still return this pointer to a waiting thread, which will then use freed "
        "memory: remove the registration (EPOLL_CTL_DEL or the last close) before free()."
    ),
    traced=find,
)
