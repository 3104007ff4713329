"""busy-loop: a server thread spins.

Two kinds of evidence, either enough: the trace shows a thread making the same empty call on
one connection over and over (``receipts.SPIN_CALLS`` reads in a row returning 0 or failing
with EAGAIN, with no data read in between), in any test; or a fault (``fd_limit``) measured
the server's CPU while its clients were idle above the allowance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from afterclose.harness.oracle.evidence import CPU_WHILE_IDLE
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.facts import SpinningCall, TraceModel
from afterclose.harness.trace.findings import Finding

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "busy-loop"


def _spin(m: TraceModel, fact: SpinningCall) -> Finding:
    first, last = m.records[fact.first_idx], m.records[fact.last_idx]
    t = m.tname(first.pid, first.tid)
    ms = (last.t_ns - first.t_ns) / 1e6
    summary = (
        f"{t} (tid {first.tid}) spins on {m.label(fact.inc)}: {fact.what} {fact.count} times "
        f"in a row in {ms:.0f} ms (seq {first.seq_in} to {last.seq_in}), with no data read "
        "in between"
    )
    return m.finding(
        RULE,
        summary,
        fact.first_idx,
        fact.inc.fd,
        refs=(fact.inc.created_idx,),
        notes={fact.first_idx: "the spin begins"},
    )


def find(m: TraceModel) -> list[Finding]:
    return [_spin(m, fact) for fact in m.of(SpinningCall)]


def decide(ev: Evidence) -> list[Violation]:
    out = ev.traced(NAME)
    spins = [
        o
        for o in ev.observations(CPU_WHILE_IDLE)
        if o.values["busy"] > o.values["idle"] + o.values["allowed"]
    ]
    if spins:
        extra = "\n".join(o.detail for o in spins[1:10])
        out.append(Violation(NAME, spins[0].detail, details=extra, count=len(spins)))
    return out


RULE = Rule(
    NAME,
    "a server thread spins: the same empty call (read returning 0 or EAGAIN) thousands of "
    "times in a row, or CPU burnt while its clients were idle (e.g. on EMFILE)",
    why=(
        "nothing new arrived between these calls: the thread never closes or stops watching "
        "the connection, so it burns a core and starves the others."
    ),
    traced=find,
    decide=decide,
)
