"""use-after-close: a call on an fd number after the trace shows its incarnation closed."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import ClosedNumberUse, SocketCallOnFile, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import Op
from afterclose.harness.trace.model import EndKind
from afterclose.harness.trace.timeline import call_str

NAME = "use-after-close"


def _closed_number(m: TraceModel, fact: ClosedNumberUse) -> Finding:
    r = m.records[fact.idx]
    last = fact.last
    t = m.tname(r.pid, r.tid)
    same = last.end_tid == r.tid and last.end_kind is EndKind.CLOSE
    if r.op == Op.CLOSE:
        kind = "double close: " if last.end_kind is EndKind.CLOSE else ""
        summary = (
            f"{kind}{t} called close({fact.fd}) at seq {r.seq_in}, but {m.label(last)} "
            f"was already {m.closed_desc(last)}"
            + (" -- the same thread closed it twice" if same else "")
        )
    else:
        summary = (
            f"{call_str(r)} in {t} failed with EBADF at seq {r.seq_in}: "
            f"{m.label(last)} was {m.closed_desc(last)}, before the call began"
        )
    return m.finding(
        RULE,
        summary,
        fact.idx,
        fact.fd,
        refs=(last.end_idx, last.created_idx),
        notes={last.end_idx: f"{m.label(last)} closed here"},
    )


def _now_a_file(m: TraceModel, fact: SocketCallOnFile) -> Finding:
    r = m.records[fact.idx]
    prev, cur = fact.prev, fact.cur
    summary = (
        f"{call_str(r)} in {m.tname(r.pid, r.tid)} failed with ENOTSOCK at seq {r.seq_in}: the "
        f"socket {m.label(prev)} was {m.closed_desc(prev)} and fd {r.fd} now is "
        f"{m.label(cur)}, a non-socket {m.created_desc(cur)}"
    )
    return m.finding(
        RULE,
        summary,
        fact.idx,
        r.fd,
        refs=(prev.end_idx, cur.created_idx),
        notes={prev.end_idx: f"{m.label(prev)} closed here"},
    )


def find(m: TraceModel) -> list[Finding]:
    out = []
    for fact in m.facts:
        if isinstance(fact, ClosedNumberUse):
            out.append(_closed_number(m, fact))
        elif isinstance(fact, SocketCallOnFile):
            out.append(_now_a_file(m, fact))
    return out


RULE = Rule(
    NAME,
    "an operation on an fd number whose incarnation was already closed (EBADF)",
    why=(
        "the fd was already closed when this call began; had another thread been handed the "
        "number in between, the call would have hit a stranger's connection."
    ),
    traced=find,
)
