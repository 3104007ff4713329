"""``--tracer=ebpf``: the eBPF loader attached to the target's host PIDs after start, its output
turned into trace files and judged like the shim's."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from afterclose.harness.errors import AftercloseError
from afterclose.harness.oracle.rules import event_for_freed_data, freed_while_registered
from afterclose.harness.runners.base import Server
from afterclose.harness.trace.ebpf.loader import ENV_RING_KB, EbpfRun, env_whole_number
from afterclose.harness.trace.ebpf.output import ParsedOutput, parse_output
from afterclose.harness.trace.ebpf.procscan import ProcSnapshot, scan_process
from afterclose.harness.trace.ebpf.tracefiles import build_trace_files
from afterclose.harness.trace.facts import Running
from afterclose.harness.tracers import TraceOutcome, TracerSession, judged

__all__ = ["ENV_GUARD_NS", "UNCHECKED_RULES", "EbpfTracer", "guard_ns_from_env"]

ENV_GUARD_NS = "AFTERCLOSE_EBPF_GUARD_NS"
WATCHDOG_GRACE_S = 60.0

# The rules that decide from free() records, which the eBPF tracer does not see: under it they
# are never checked, so a PASS says nothing about them (each trace's warnings say so too).
UNCHECKED_RULES = (freed_while_registered.NAME, event_for_freed_data.NAME)


def guard_ns_from_env() -> int:
    return env_whole_number(os.environ, ENV_GUARD_NS, 0, least=0)


class EbpfTracer(TracerSession):
    """``--tracer=ebpf``: the eBPF loader attached to the target's host PIDs after start."""

    name = "ebpf"

    def __init__(self, trace_dir: Path, env: Mapping[str, str] | None = None) -> None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        self.trace_dir = trace_dir
        self._folder = trace_dir
        self._env = dict(env or {})
        self.guard_ns = guard_ns_from_env()
        # One loader per start of the target, the current one last: the program follows
        # the PIDs it is given and their children, and a restarted target descends from
        # neither, so a restart (the kill fault) stops the old run and attaches a new one.
        self._runs: list[EbpfRun] = []
        self._snapshots: list[ProcSnapshot] = []
        self._done = threading.Event()
        self.attach_s = 0.0

    def started(self, target: Server) -> None:
        pids = target.host_pids()
        if not pids:
            raise AftercloseError(
                f"target {target.name!r} has no running process to trace",
                hint="it exited right after becoming ready; see its log",
            )
        folder = self._folder
        if self._runs:
            self._runs[-1].stop()  # what it saw is drained to its output, read by analyse()
            # Each run writes its own output (the reader looks at trace files only).
            folder = self._folder / f"ebpf.restart-{len(self._runs)}"
        t = time.monotonic()
        run = EbpfRun(folder, pids, self._env)
        self.attach_s = time.monotonic() - t
        self._runs.append(run)
        try:
            for pid in pids:
                snap = scan_process(pid)
                if snap is not None:
                    self._snapshots.append(snap)
        except BaseException:
            run.stop()
            raise
        threading.Thread(
            target=self._watchdog, args=(target, run), name="afterclose-ebpf-watchdog", daemon=True
        ).start()

    def _watchdog(self, target: Server, run: EbpfRun) -> None:
        # A run abandoned without analyse() (an error between start and finish): stop
        # the loader some time after the target is gone instead of tracing nothing forever.
        while not self._done.wait(1.0):
            if target.exit_status() is not None:
                if not self._done.wait(WATCHDOG_GRACE_S):
                    run.stop()
                return

    def cutoff(self) -> int | None:
        return time.monotonic_ns()

    def analyse(self, cutoff: int | None, running: Running | None = None) -> TraceOutcome:
        from afterclose.harness.trace import reader

        self._done.set()
        assert self.trace_dir is not None
        if not self._runs:
            return TraceOutcome(
                trace_dir=self.trace_dir,
                tracer=self.name,
                gaps=["the eBPF tracer never attached: nothing was traced"],
            )
        warnings: list[str] = []
        gaps: list[str] = []
        parsed, *later = [_drained(run, gaps) for run in self._runs]
        for more in later:
            parsed.extend(more)
        built = build_trace_files(parsed, self._snapshots, self.trace_dir, self.guard_ns)
        if built.lost:
            warnings.append(
                f"eBPF tracer LOST {built.lost} EVENTS: its ring buffer "
                f"({ENV_RING_KB}={self._runs[-1].ring_kb} KiB) overflowed, so the trace is "
                f"incomplete and this verdict may be wrong; raise {ENV_RING_KB} or lower the "
                "load"
            )
        warnings.extend(built.warnings)
        trace = reader.read_trace_dir(self.trace_dir)
        # The reader's lost-records advice is the shim's (AFTERCLOSE_TRACE_MB): ours is above.
        kept = tuple(w for w in trace.warnings if "records lost (buffer full)" not in w)
        trace = dataclasses.replace(trace, warnings=(*warnings, *kept))
        if not trace.records:
            return TraceOutcome(
                warnings=[*trace.warnings, "the eBPF tracer saw no fd-lifecycle syscall"],
                trace_dir=self.trace_dir,
                tracer=self.name,
                gaps=gaps,
            )
        outcome = judged(trace, cutoff, self.trace_dir, running)
        outcome.tracer = self.name
        outcome.gaps = gaps
        outcome.stats.update(
            ebpf_lost=built.lost,
            ebpf_seeded=built.seeded,
            ebpf_lines=parsed.lines,
            ebpf_repeated_waits=parsed.repeated,
            ebpf_stop_ms=round(sum(run.stop_s for run in self._runs) * 1000),
        )
        # The raw text is large and fully in the trace files now.
        for run in self._runs:
            with contextlib.suppress(OSError):
                run.output.unlink()
        return outcome


def _drained(run: EbpfRun, gaps: list[str]) -> ParsedOutput:
    """Stop ``run`` and parse what it wrote out; each way it fell short is added to ``gaps``."""
    status = run.stop()
    parsed = parse_output(run.output)
    if status not in (0, None):
        # Killed (-9) when it could not read out its ring buffer within the stop timeout, or
        # died on its own: what it had not yet written out is gone, and nothing counts it.
        gaps.append(
            f"the eBPF loader exited with status {status} before writing out all it had seen "
            f"(log: {run.log})"
        )
    elif parsed.unwritten():
        # Lines handed over after the loader's last read (a probe slower than its settling
        # time): counted, not written.
        gaps.append(
            f"the eBPF loader did not write out {parsed.unwritten()} of the "
            f"{parsed.printed} lines its program handed over (log: {run.log})"
        )
    elif parsed.printed is None and parsed.lines:
        gaps.append(
            "the eBPF loader did not say how many lines its program handed over, so whether "
            f"it wrote them all out is not known (log: {run.log})"
        )
    return parsed
