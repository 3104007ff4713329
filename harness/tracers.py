"""Tracer back-ends behind one small interface: off, the LD_PRELOAD shim, eBPF.

A runner asks the tracer for environment variables before start and tells it the target's
PIDs after; the oracle asks it for a cut-off point and then for its verdict.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from afterclose.harness.errors import AftercloseError
from afterclose.harness.manifest import Manifest
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.runners.base import Server

if TYPE_CHECKING:
    from afterclose.harness.trace.facts import Running
    from afterclose.harness.trace.reader import Trace

TRACER_CHOICES = ("auto", "preload", "ebpf", "off")


@dataclass
class TraceOutcome:
    violations: list[Violation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    trace_dir: Path | None = None
    tracer: str = ""  # the back-end that traced: "preload", "ebpf" ("" when none did)
    # Who held the target's port when the tracer attached (incomplete_evidence.PortHolder).
    port_holders: list[object] = field(default_factory=list)
    # Why the tracer's own record of the run is not whole (it died, never attached, was
    # killed before it drained): each makes the evidence incomplete (incomplete-evidence).
    gaps: list[str] = field(default_factory=list)


class TracerSession(abc.ABC):
    name: str
    trace_dir: Path | None = None

    def env(self) -> dict[str, str]:
        return {}

    def started(self, target: Server) -> None:  # noqa: B027 - optional hook
        """Called once the target runs (an eBPF tracer attaches to its PIDs here)."""

    def cutoff(self) -> int | None:
        """A point in the trace: what happens after it is not judged (end of scenario)."""
        return None

    @abc.abstractmethod
    def analyse(self, cutoff: int | None, running: Running | None = None) -> TraceOutcome:
        """Read what was traced and judge it with the lifecycle rules (``running``: the
        target's processes that ran at the cut-off, when the harness looked)."""


class NoTracer(TracerSession):
    name = "off"

    def analyse(self, cutoff: int | None, running: Running | None = None) -> TraceOutcome:
        return TraceOutcome()


class PreloadTracer(TracerSession):
    name = "preload"

    def __init__(self, trace_dir: Path, sanitizer: str, free_tracking: bool = True) -> None:
        from afterclose.harness.trace import shim

        trace_dir.mkdir(parents=True, exist_ok=True)
        self.trace_dir = trace_dir
        self._holders: list[object] = []
        self._env = shim.shim_env(
            trace_dir, free_tracking=free_tracking, asan_runtime=sanitizer == "address"
        )

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def started(self, target: Server) -> None:
        # A process that escapes the shim is told apart by who holds the port (the
        # incomplete-evidence rule); looked at now too, in case it dies before the end.
        from afterclose.harness.oracle.rules.incomplete_evidence import port_holders

        self._holders.extend(port_holders(target))

    def cutoff(self) -> int | None:
        from afterclose.harness.trace import shim

        assert self.trace_dir is not None
        return shim.read_seq(self.trace_dir)

    def analyse(self, cutoff: int | None, running: Running | None = None) -> TraceOutcome:
        from afterclose.harness.trace import reader

        assert self.trace_dir is not None
        trace = reader.read_trace_dir(self.trace_dir)
        if not trace.processes:
            return TraceOutcome(
                warnings=[
                    f"the tracer wrote no trace in {self.trace_dir}: the target may be "
                    "statically linked, drop LD_PRELOAD, or run a program that was not traced "
                    "(try --tracer=off, or --tracer=ebpf when available)"
                ],
                trace_dir=self.trace_dir,
                tracer=self.name,
                port_holders=list(self._holders),
            )
        outcome = judged(trace, cutoff, self.trace_dir, running)
        outcome.tracer = self.name
        outcome.port_holders = list(self._holders)
        return outcome


def judged(
    trace: Trace, cutoff: int | None, trace_dir: Path, running: Running | None = None
) -> TraceOutcome:
    """The verdict on ``trace``, read from ``trace_dir``: its violations, each with a picture
    of its rule's first occurrence beside the trace in the run's workdir; the trace's and the
    verdict's warnings, without repeats; the walk's stats.  ``running``: see
    :class:`~afterclose.harness.trace.facts.Running`."""
    from afterclose.harness.oracle import judge

    result = judge.judge_trace(trace, cutoff_seq=cutoff, trace_path=str(trace_dir), running=running)
    violations = list(result.violations)
    warnings = list(dict.fromkeys([*trace.warnings, *result.warnings]))
    if violations:
        from afterclose.harness.trace import svg

        try:
            written = svg.write_report(result, trace_dir.parent)
        except Exception as exc:  # the verdict matters more than its picture
            warnings.append(f"could not draw the timelines in {trace_dir.parent}: {exc}")
        else:
            by_name = {p.name: str(p) for p in written}
            for n, v in enumerate(violations):
                picture = by_name.get(svg.report_name(v.rule))
                if picture is not None:
                    violations[n] = dataclasses.replace(v, artifacts=(*v.artifacts, picture))
    return TraceOutcome(
        violations=violations,
        warnings=warnings,
        stats=dataclasses.asdict(result.stats),
        trace_dir=trace_dir,
    )


def choose_tracer(requested: str, manifest: Manifest, runner: str) -> str:
    """Resolve ``auto`` and check that the requested back-end can serve this target."""
    if requested not in TRACER_CHOICES:
        raise AftercloseError(
            f"unknown tracer {requested!r}", hint=f"use one of {', '.join(TRACER_CHOICES)}"
        )
    if manifest.tracer == "off" and requested == "auto":
        return "off"
    mode = manifest.tracer if requested == "auto" else requested
    if mode in ("auto", "ebpf"):
        from afterclose.harness.trace import ebpf

        missing = ebpf.unavailable()
        if mode == "auto":
            # The shim for what it can see (dynamic binaries), eBPF for static and Go ones.
            mode = "ebpf" if missing is None and ebpf.prefers_ebpf(manifest) else "preload"
        elif missing is not None:
            raise AftercloseError(missing[0], where=manifest.path, hint=missing[1])
    return mode


def target_env(
    tracer: TracerSession,
    *,
    chaos: str = "off",
    seed: int = 0,
    sanitizer: str = "none",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What the tracer and the perturbations add to a target's environment.

    The tracer's variables, then schedule perturbation (``--chaos``, seeded with ``seed``), then
    ``extra`` (a scenario's syscall faults).  The shim does both perturbations: when one is asked
    for and the tracer is off, the shim is preloaded without a trace folder, a mode in which it
    traces nothing and only perturbs (the black-box rules still judge the run).  A target the
    shim cannot be preloaded into (statically linked) is not perturbed at all.
    """
    from afterclose.harness import syscall_faults

    env = tracer.env()
    env.update(syscall_faults.chaos_env(chaos, seed))
    env.update(extra or {})
    perturbed = syscall_faults.ENV_CHAOS in env or syscall_faults.ENV_FAULTS in env
    if perturbed and "AFTERCLOSE_TRACE_DIR" not in env:
        from afterclose.harness.trace import shim

        env.update(
            shim.preload_env(
                asan_runtime=sanitizer == "address",
                extra_preload=env.get("LD_PRELOAD", ""),
            )
        )
    return env


def open_tracer(mode: str, workdir: Path, sanitizer: str) -> TracerSession:
    if mode == "off":
        return NoTracer()
    if mode == "ebpf":
        from afterclose.harness.trace.ebpf import EbpfTracer

        return EbpfTracer(workdir / "trace")
    return PreloadTracer(workdir / "trace", sanitizer)
