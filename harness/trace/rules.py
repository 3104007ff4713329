"""Judging a trace by itself, for callers that hold only a trace (``afterclose trace show``).

The rules are :mod:`afterclose.harness.oracle.registry`'s; the judge runs them.
"""

from __future__ import annotations

from afterclose.harness.oracle.judge import judge_records as check
from afterclose.harness.oracle.judge import judge_trace as check_trace
from afterclose.harness.trace.findings import Finding, TraceVerdict

__all__ = ["Finding", "TraceVerdict", "check", "check_trace"]
