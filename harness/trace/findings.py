"""What the traced rules found: one :class:`Finding` per occurrence, and the trace's verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.format import Record
from afterclose.harness.trace.timeline import TimelineContext, render_timeline


@dataclass(eq=False, slots=True)
class Finding:
    """One occurrence of a rule; ``index`` is the violating record's position in
    :attr:`TraceVerdict.records` (for an event, the position of its epoll_wait), or -1 for a
    finding about the whole trace (it has no timeline)."""

    rule: str
    summary: str
    index: int
    seq: int
    pid: int
    tid: int
    fd: int | None
    data: int | None
    refs: tuple[int, ...] = ()
    notes: dict[int, str] = field(default_factory=dict)
    # stale-rearm: later events delivered with the stale data (indices of their waits).
    followups: list[int] = field(default_factory=list)
    _ctx: TimelineContext | None = field(default=None, repr=False)
    _text: str | None = field(default=None, repr=False)
    # The rule's meaning and why it is a bug, as the timelines show them.
    meaning: str = ""
    why: str = ""

    def shown_notes(self) -> dict[int, str]:
        """``notes``, and the note of each followup."""
        notes = dict(self.notes)
        for w in self.followups:
            notes.setdefault(w, "delivered with the stale data")
        return notes

    def timeline(self) -> str:
        """The race-detector style report of this occurrence (rendered on first use)."""
        if self._text is None:
            if self._ctx is None or self.index < 0:
                return self.summary
            self._text = render_timeline(self._ctx, self)
        return self._text


@dataclass(frozen=True, slots=True)
class TraceStats:
    records: int
    processes: int
    threads: int
    incarnations: int
    registrations: int
    events: int
    lost_records: int


@dataclass(slots=True)
class TraceVerdict:
    """The traced rules' verdict on one trace; ``occurrences`` in the registry's rule order."""

    violations: list[Violation]
    occurrences: dict[str, list[Finding]]
    warnings: list[str]
    stats: TraceStats
    # False when records were lost or the reader found the trace damaged: the verdict may be
    # wrong either way, and every violation's details say so.
    complete: bool = True
    records: Sequence[Record] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return not self.violations

    def count(self, rule: str) -> int:
        return len(self.occurrences.get(rule, ()))

    def render(self) -> str:
        s = self.stats
        parts = [
            f"trace: {s.records} records, {s.processes} processes, {s.threads} threads, "
            f"{s.incarnations} fd incarnations, {s.registrations} registrations, "
            f"{s.events} events"
        ]
        parts += [f"WARNING: {w}" for w in self.warnings]
        parts += [v.render() for v in self.violations]
        if not self.violations:
            parts.append("no violation")
        return "\n".join(parts)
