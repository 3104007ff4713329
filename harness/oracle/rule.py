"""What a rule is: a stable name, what it means, and how it decides.

A rule decides from one of two kinds of evidence, or both: the trace model (``traced``: one
:class:`~afterclose.harness.trace.findings.Finding` per occurrence, each with a timeline) and
the run's evidence bundle (``decide``: the server, the fault reports' observations, the socket
census, and the trace's verdict).  A rule with no ``decide`` is judged on the trace alone.
The registry lists every rule; the judge runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence
    from afterclose.harness.oracle.verdict import Violation
    from afterclose.harness.trace.facts import TraceModel
    from afterclose.harness.trace.findings import Finding


@dataclass(frozen=True)
class Rule:
    """``name``: a stable string (users grep CI logs for it).  ``meaning``: one paragraph, in
    Markdown (the README's rule table is generated from it).  ``why``: for traced rules, why
    the pattern is a bug, shown in every timeline."""

    name: str
    meaning: str
    why: str = ""
    traced: Callable[[TraceModel], list[Finding]] | None = None
    decide: Callable[[Evidence], list[Violation]] | None = None
    # Looks at the server while it still runs (before the tracer's judgement); what it
    # returns is kept in ``Evidence.probes`` under the rule's name for ``decide``.
    probe: Callable[[Evidence], object] | None = None

    @property
    def plain_meaning(self) -> str:
        """The meaning without Markdown marks, for text and SVG timelines."""
        return self.meaning.replace("`", "")
