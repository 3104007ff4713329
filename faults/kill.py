"""kill: kill the target (in the middle of a storm), start it again, and check it came back.

The fault sends ``signal`` (SIGKILL by default) to every process of the target, by host PID
(so it works the same for a process and for a container), waits for it to die, and starts the
same launch plan again (``ServerControl.restart``): same port, same workdir, same trace
folder.  The new target replaces the old one in the run, so the oracle judges it (crash,
liveness, fd-leak, the trace) and the harness stops it at the end.  The old one's output is
kept as ``target.stdout.killed-N`` / ``target.stderr.killed-N``.

"Came back" is checked black-box: the oracle's liveness check asks the restarted target
(it must answer again), and every path the manifest lists in ``restart_keeps`` must answer
as it did before the kill (the target promises that this state survives a crash: the fault
records a ``state-lost-on-restart`` observation naming the path and both answers, and the
liveness rule reports it).  Under the Docker runner the restart is a fresh container of the
same image: only what the target keeps in its bind-mounted workdir (or the manifest's folder)
survives, as with ``docker run --rm`` after a crash.
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from afterclose.faults import _server_side as ss
from afterclose.faults.base import FaultReport, param
from afterclose.harness.oracle.evidence import STATE_LOST_ON_RESTART, Observation
from afterclose.harness.protocols import http

if TYPE_CHECKING:
    from afterclose.harness.control import ServerControl

SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT", "SIGSEGV")
DEATH_WAIT_S = 10.0


@dataclass(frozen=True)
class Kill(ss.StormFault):
    """Kill the target mid-storm and restart it: it must answer again and keep its state."""

    name: ClassVar[str] = "kill"
    through_restarts: ClassVar[bool] = True
    strike_within: ClassVar[tuple[float, float] | None] = (0.3, 0.6)

    signal: str = param("SIGKILL", choices=SIGNALS, doc="what to kill it with")
    storm_s: float = ss.storm_s_param(1.0, "the storm the kill falls into (0: none)")
    rate_per_s: float = ss.rate_param(200.0)
    concurrency: int = ss.concurrency_param(16)

    def headline(self, at: float) -> str:
        return f"{self.signal} at {at:g}s into a {self.storm_s:g}s storm, restart, probe"

    def run_on(self, server: ServerControl, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(server, rng)
        report = begun.report
        kept = {path: _answer(server, path) for path in server.restart_keeps}
        storm = self._storm().start(server, begun.seed, deadline)
        try:
            time.sleep(max(storm.started + begun.at - time.monotonic(), 0.0))
            if not server.alive():
                report.count("died_before_kill")  # the crash rule speaks for it
                return report
            sig = signal.Signals[self.signal]
            server.signal(sig)
            if not server.wait_exit(DEATH_WAIT_S):
                report.count("survived_signal")
                if sig != signal.SIGKILL:
                    server.signal(signal.SIGKILL)
            restarted = time.monotonic()
            status = server.restart(self.signal)
            if status is not None:
                report.count(f"exit:{status.describe().replace(' ', '_')}")
            report.count("restart_ms", round((time.monotonic() - restarted) * 1000))
        finally:
            ss.add_storm(report, storm.join(deadline))
        for path, before in kept.items():
            after = _answer(server, path)
            if after != before:
                report.observe(
                    Observation(
                        STATE_LOST_ON_RESTART,
                        who=self.name,
                        detail=f"lost state across {self.signal} and a restart: GET {path} "
                        f"answered {before} before, {after} after (the manifest lists it in "
                        "restart_keeps)",
                    )
                )
        return begun.finish()


def _answer(server: ServerControl, path: str) -> str:
    """What GET ``path`` answers, as one comparable line."""
    try:
        response = http.get(server.host, server.port, path, timeout_s=3.0)
    except (OSError, http.ClientError) as exc:
        return f"no answer ({type(exc).__name__})"
    return f"{response.status} {response.body[:200]!r}"
