"""use-after-close: a call on an fd number after the trace shows its incarnation closed."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.trace.facts import ClosedNumberUse, SocketCallOnFile, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import Op
from afterclose.harness.trace.model import EndKind

NAME = "use-after-close"


CLOSED_TWICE = "{kind}{t} called close({fd}) at seq {seq}, but {old} was already {old_closed}"
EBADF_CALL = (
    "{call} in {t} failed with EBADF at seq {seq}: {old} was {old_closed}, before the call began"
)
NOW_A_FILE = (
    "{call} in {t} failed with ENOTSOCK at seq {seq}: the socket {old} was {old_closed} and "
    "fd {fd} now is {new}, a non-socket {new_created}"
)


def _closed_number(m: TraceModel, fact: ClosedNumberUse) -> Finding:
    r = m.records[fact.idx]
    last = fact.last
    w = m.words(fact.idx, last, last)
    if r.op == Op.CLOSE:
        kind = "double close: " if last.end_kind is EndKind.CLOSE else ""
        summary = CLOSED_TWICE.format(**w, kind=kind)
        if last.end_tid == r.tid and last.end_kind is EndKind.CLOSE:
            summary += " -- the same thread closed it twice"
    else:
        summary = EBADF_CALL.format_map(w)
    return m.reuse_finding(RULE, summary, fact.idx, last, last)


def _now_a_file(m: TraceModel, fact: SocketCallOnFile) -> Finding:
    summary = NOW_A_FILE.format_map(m.words(fact.idx, fact.prev, fact.cur))
    return m.reuse_finding(RULE, summary, fact.idx, fact.prev, fact.cur)


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
