"""incomplete-evidence: the trace lost records, so the run cannot pass.

A trace file is a fixed number of chunks; when they are all taken, the shim counts what it
could not write in the file's header instead.  A missing close, epoll_ctl or free can hide a
violation or explain one away, so a verdict over such a trace proves nothing either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from afterclose.harness.oracle.evidence import UNDER_DELIVERED
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.ebpf import ENV_RING_PAGES
from afterclose.harness.trace.facts import TraceModel
from afterclose.harness.trace.findings import Finding

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "incomplete-evidence"
# The shim's knob for the size of each trace file (harness/trace/shim.py), and its default.
ENV_TRACE_MB = "AFTERCLOSE_TRACE_MB"
DEFAULT_TRACE_MB = 256
_MIB = 1 << 20


def find(m: TraceModel) -> list[Finding]:
    if not m.lost_records:
        return []
    where = []
    sizes = []
    first_pid = 0
    for pid, h in sorted(m.headers.items()):
        if not h.lost_records:
            continue
        first_pid = first_pid or pid
        sizes.append(h.n_chunks * h.chunk_records * h.record_size // _MIB)
        path = m.files.get(pid)
        where.append(f"pid {pid}" + (f" ({path})" if path else "") + f": {h.lost_records} lost")
    whose = "; ".join(where) or "no process's file says which"
    # Four times the file that filled up: a trace grows with the run, not in steps.
    bigger = 4 * max(max(sizes, default=DEFAULT_TRACE_MB), 1)
    summary = (
        f"the trace lost {m.lost_records} records ({whose}): a missing close, epoll_ctl or free "
        "could hide a violation or explain one away, so this run cannot pass; give each "
        f"process a larger trace file ({ENV_TRACE_MB}={bigger}; under the eBPF tracer, more "
        f"perf buffer pages: {ENV_RING_PAGES}) or run for less time"
    )
    return [Finding(NAME, summary, -1, 0, first_pid, 0, None, None, meaning=RULE.plain_meaning)]


def decide(ev: Evidence) -> list[Violation]:
    found = list(ev.traced(NAME))
    short = ev.observations(UNDER_DELIVERED)
    if short:
        # The storms that fell short: their plan was the load the verdict would speak for.
        shown = "\n".join(o.detail for o in short)
        found.append(
            Violation(
                NAME,
                f"{short[0].detail}; a pass would speak for load that never came: run fewer "
                "connections (max_connections), a lower rate (rate_per_s) or more client "
                "processes (processes), or a shorter --storm-duration",
                details=shown if len(short) > 1 else "",
                count=len(short),
            )
        )
    return found


RULE = Rule(
    NAME,
    "the evidence is incomplete, so the run cannot pass: the trace lost records (a trace file "
    "filled up: a missing call could hide a violation), or a storm started fewer than 90% of "
    "its planned connections while the target accepted what it got (the harness could not "
    "keep up; a target that refused them is judged by the other rules instead)",
    traced=find,
    decide=decide,
)
