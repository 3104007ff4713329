"""kill: kill the target (in the middle of a storm), start it again, and check it came back.

The fault sends ``signal`` (SIGKILL by default) to every process of the target, by host PID
(so it works the same for a process and for a container), waits for it to die, and starts the
same launch plan again through the run's runner: same port, same workdir, same trace folder.
The new target replaces the old one in the run, so the oracle judges it (crash, liveness,
fd-leak, the trace) and the harness stops it at the end.  The old one's output is kept as
``target.stdout.killed-N`` / ``target.stderr.killed-N``.

"Came back" is checked black-box: the oracle's liveness check asks the restarted target
(it must answer again), and every path the manifest lists in ``restart_keeps`` must answer
as it did before the kill (the target promises that this state survives a crash: a
``liveness`` violation names the path and both answers).  Under the Docker runner the
restart is a fresh container of the same image: only what the target keeps in its
bind-mounted workdir (or the manifest's folder) survives, as with ``docker run --rm`` after
a crash.

With the preload tracer under the Docker runner both incarnations are PID 1 of their
containers and write to one trace folder.  Read as they are, the new one's files would look
like an exec of the old PID 1 (one process whose fd numbers come back without a traced close,
and whose threads act on each other's connections).  So, once the old container is dead and
before the new one starts, its trace files are relabelled with the host PIDs its processes
had (read from ``NSpid`` in ``/proc/PID/status`` before the kill), and each incarnation is
judged as a process of its own.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from afterclose.faults import target_base as tb
from afterclose.faults.base import FaultReport, param
from afterclose.harness.errors import AftercloseError, TargetStartError
from afterclose.harness.oracle.evidence import STATE_LOST_ON_RESTART, Observation
from afterclose.harness.protocols import http

if TYPE_CHECKING:
    from afterclose.harness.runners.base import RunningTarget
    from afterclose.harness.session import TargetRun

SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT", "SIGSEGV")
DEATH_WAIT_S = 10.0


@dataclass(frozen=True)
class Kill(tb.StormFault):
    """Kill the target mid-storm and restart it: it must answer again and keep its state."""

    name: ClassVar[str] = "kill"
    through_restarts: ClassVar[bool] = True
    strike_within: ClassVar[tuple[float, float] | None] = (0.3, 0.6)

    signal: str = param("SIGKILL", choices=SIGNALS, doc="what to kill it with")
    storm_s: float = tb.storm_s_param(1.0, "the storm the kill falls into (0: none)")
    rate_per_s: float = tb.rate_param(200.0)
    concurrency: int = tb.concurrency_param(16)

    def headline(self, at: float) -> str:
        return f"{self.signal} at {at:g}s into a {self.storm_s:g}s storm, restart, probe"

    def run(self, run: TargetRun, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(run, rng)
        report = begun.report
        kept = {path: _answer(run, path) for path in run.manifest.restart_keeps}
        storm = tb.Background(self._storm(), run, begun.seed, deadline)
        try:
            time.sleep(max(storm.started + begun.at - time.monotonic(), 0.0))
            old = run.target
            if old.exit_status() is not None:
                report.count("died_before_kill")  # the crash rule speaks for it
                return report
            sig = signal.Signals[self.signal]
            inner_pids = _namespace_pids(old.host_pids())
            tb.signal_target(old, sig)
            if not tb.wait_for(lambda: old.exit_status() is not None, DEATH_WAIT_S):
                report.count("survived_signal")
                if sig != signal.SIGKILL:
                    tb.signal_target(old, signal.SIGKILL)
            status = old.stop()
            if status is not None:
                report.count(f"exit:{status.describe().replace(' ', '_')}")
            _keep_logs(old, len(run.reports) + 1)
            _relabel_trace(run, inner_pids)
            restarted = time.monotonic()
            try:
                new = run.harness.runner.start(old.plan)
            except AftercloseError as exc:
                raise TargetStartError(
                    f"target {run.manifest.name!r} did not come back after {self.signal}: "
                    f"{exc.message}",
                    where=exc.where,
                    details=exc.details,
                    hint=exc.hint,
                ) from None
            run.replace_target(new)
            report.count("restart_ms", round((time.monotonic() - restarted) * 1000))
        finally:
            tb.add_storm(report, storm.join(deadline))
        for path, before in kept.items():
            after = _answer(run, path)
            if after != before:
                report.observe(
                    Observation(
                        kind=STATE_LOST_ON_RESTART,
                        who=self.name,
                        detail=f"lost state across {self.signal} and a restart: GET {path} "
                        f"answered {before} before, {after} after (the manifest lists it in "
                        "restart_keeps)",
                    )
                )
        return begun.finish()


def _namespace_pids(host_pids: list[int]) -> dict[int, int]:
    """PID inside the target's PID namespace -> host PID, for processes where they differ
    (a container's); read before the kill, while /proc still has them."""
    found: dict[int, int] = {}
    for pid in host_pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    ids = [int(x) for x in line.split()[1:]]
                    if len(ids) > 1 and ids[-1] != pid:
                        found[ids[-1]] = pid
    return found


def _relabel_trace(run: TargetRun, inner_pids: dict[int, int]) -> None:
    """The restarted container's processes get the same namespace PIDs (PID 1 again): the
    dead ones' trace files take their host PIDs, so the model keeps the two apart."""
    trace_dir = run.tracer.trace_dir
    if trace_dir is None or not inner_pids:
        return
    from afterclose.harness.trace import shim

    for inner, host in inner_pids.items():
        shim.relabel_pid(trace_dir, inner, host)


def _answer(run: TargetRun, path: str) -> str:
    """What GET ``path`` answers, as one comparable line."""
    try:
        response = http.get(run.host, run.port, path, timeout_s=3.0)
    except (OSError, http.ClientError) as exc:
        return f"no answer ({type(exc).__name__})"
    return f"{response.status} {response.body[:200]!r}"


def _keep_logs(old: RunningTarget, n: int) -> None:
    for path in (old.plan.stdout_path, old.plan.stderr_path):
        with contextlib.suppress(OSError):
            path.rename(path.with_name(f"{path.name}.killed-{n}"))
