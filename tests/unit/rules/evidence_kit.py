"""Evidence bundles built by hand, for the rules that decide from observations."""

from __future__ import annotations

from typing import Any, cast

from afterclose.faults.base import FaultReport
from afterclose.harness.oracle.evidence import Observation
from afterclose.harness.oracle.judge import Evidence
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.tracers import TraceOutcome


def evidence(
    *observations: Observation,
    probes: dict[str, object] | None = None,
    traced: list[Violation] | None = None,
) -> Evidence:
    """A bundle whose fault report holds ``observations``.  The server and the census are
    not there: the rules tested with it must decide from observations, probes and the trace."""
    report = FaultReport("synthetic")
    for obs in observations:
        report.observe(obs)
    return Evidence(
        reports=[report],
        server=cast(Any, None),
        baseline=cast(Any, None),
        fd_grace_s=1.0,
        trace=TraceOutcome(violations=list(traced or [])),
        probes=dict(probes or {}),
    )
