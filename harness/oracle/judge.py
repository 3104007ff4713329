"""The judge: every rule of the registry over one run's evidence.

A run's evidence is its fault reports (what clients and faults observed), the started server,
the socket census taken before any fault, the manifest's settings, and the trace.  Rules with
a ``probe`` look at the server while it still runs; then the server is stopped, the tracer
judges its trace (:func:`judge_trace`: the model is built once and every traced rule reads
it), and every rule decides.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from afterclose.harness.oracle import registry
from afterclose.harness.oracle.evidence import Observation
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.builder import build
from afterclose.harness.trace.facts import Running
from afterclose.harness.trace.findings import Finding, TraceStats, TraceVerdict
from afterclose.harness.trace.format import Header, Record

if TYPE_CHECKING:
    from afterclose.faults.base import FaultReport
    from afterclose.harness.procfs import SocketCensus
    from afterclose.harness.runners.base import Server
    from afterclose.harness.tracers import TraceOutcome


# -- the trace -------------------------------------------------------------------------------


class ProcessLike(Protocol):
    @property
    def header(self) -> Header: ...

    @property
    def path(self) -> str | os.PathLike[str]: ...


class TraceLike(Protocol):
    """The reader's ``Trace``, as far as the judge needs it."""

    @property
    def processes(self) -> Iterable[ProcessLike]: ...

    @property
    def records(self) -> Sequence[Record]: ...

    @property
    def lost_records(self) -> int: ...

    @property
    def warnings(self) -> Sequence[str]: ...

    @property
    def complete(self) -> bool: ...


def judge_records(
    records: Sequence[Record],
    headers: dict[int, Header] | None = None,
    *,
    cutoff_seq: int | None = None,
    lost_records: int = 0,
    trace_path: str | None = None,
    damaged: str | None = None,
    files: dict[int, str] | None = None,
    running: Running | None = None,
) -> TraceVerdict:
    """Build the model of ``records`` once and run every traced rule of the registry on it.
    ``cutoff_seq`` ignores calls that began after it (fd-leak is judged at that point);
    ``running``: the target's processes that ran then, when the harness looked (a process
    gone by then without an exit in its trace is not judged by fd-leak)."""
    model = build(
        records,
        headers,
        cutoff_seq=cutoff_seq,
        lost_records=lost_records,
        trace_path=trace_path,
        damaged=damaged,
    )
    if files:
        model.files = files
    if running is not None:
        model.gone = running.gone(model.pids, model.headers)
    occurrences: dict[str, list[Finding]] = {}
    violations: list[Violation] = []
    artifacts = (trace_path,) if trace_path else ()
    for rule in registry.RULES:
        if rule.traced is None:
            continue
        found = sorted(rule.traced(model), key=lambda f: (f.index, f.seq))
        if not found:
            continue
        occurrences[rule.name] = found
        violations.append(
            Violation(
                rule.name,
                found[0].summary,
                details=found[0].timeline(),
                count=len(found),
                artifacts=artifacts,
            )
        )
    stats = TraceStats(
        records=len(model.records),
        processes=len(model.pids),
        threads=len(model.thread_names),
        incarnations=model.kernel.incarnations,
        registrations=model.kernel.registrations,
        events=model.events,
        lost_records=model.lost_records,
    )
    complete = not model.lost_records and not damaged
    return TraceVerdict(violations, occurrences, model.warnings(), stats, complete, model.records)


def judge_trace(
    trace: TraceLike,
    *,
    cutoff_seq: int | None = None,
    trace_path: str | None = None,
    running: Running | None = None,
) -> TraceVerdict:
    """:func:`judge_records` for a reader ``Trace`` (or anything shaped like one).  The trace
    path in reports defaults to the trace file (one process) or the folder holding them."""
    headers: dict[int, Header] = {}
    files: dict[int, str] = {}
    for p in trace.processes:
        headers[p.header.pid] = p.header
        files[p.header.pid] = os.fspath(p.path)
    paths = list(files.values())
    if trace_path is None and len(paths) == 1:
        trace_path = paths[0]
    elif trace_path is None and paths:
        trace_path = os.path.commonpath([os.path.dirname(p) for p in paths]) or None
    damaged = None
    if not trace.complete and not trace.lost_records:
        damaged = "the reader marked it incomplete; see its warnings"
    verdict = judge_records(
        trace.records,
        headers,
        cutoff_seq=cutoff_seq,
        lost_records=trace.lost_records,
        trace_path=trace_path,
        damaged=damaged,
        files=files,
        running=running,
    )
    verdict.warnings[:0] = [w for w in trace.warnings if w not in verdict.warnings]
    return verdict


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Evidence:
    """Everything one run offers the rules.  ``probes`` holds what rules with a probe saw
    while the server still ran; ``warnings`` collects what rules want said without failing."""

    reports: Sequence[FaultReport]
    server: Server
    baseline: SocketCensus
    fd_grace_s: float
    trace: TraceOutcome | None = None
    probes: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # True when the harness perturbed the server's own calls (syscall faults, chaos).
    perturbed: bool = False

    def observations(self, *kinds: str) -> list[Observation]:
        """Every observation of these kinds, report by report, in the order they were made."""
        return [o for r in self.reports for o in r.observations if o.kind in kinds]

    def traced(self, rule: str) -> list[Violation]:
        """What the tracer's judgement said about ``rule``."""
        if self.trace is None:
            return []
        return [v for v in self.trace.violations if v.rule == rule]


@dataclass
class Judgement:
    violations: list[Violation]
    warnings: list[str]


def judge(evidence: Evidence, stop: Callable[[], TraceOutcome]) -> Judgement:
    """Probe the running server, ``stop`` it (which returns the tracer's judgement of the
    trace), then let every rule of the registry decide, in the registry's order."""
    for rule in registry.RULES:
        if rule.probe is not None:
            evidence.probes[rule.name] = rule.probe(evidence)
    evidence.trace = stop()
    violations: list[Violation] = []
    for rule in registry.RULES:
        if rule.decide is not None:
            violations.extend(rule.decide(evidence))
        else:
            violations.extend(evidence.traced(rule.name))
    warnings = list(evidence.warnings)
    warnings.extend(evidence.trace.warnings)
    return Judgement(violations, list(dict.fromkeys(warnings)))
