"""pause: freeze the whole target in the middle of a storm, then let it run again.

While it is frozen the kernel keeps completing handshakes and queueing requests for it; when
it resumes, everything arrives at once: full backlogs, sockets whose peers have given up and
reset or closed them while nobody looked, and (under the process runner) an ``epoll_wait``
that returns ``EINTR`` after ``SIGCONT`` (signal(7)).  A correct target serves the queued
connections, drops the dead ones and goes on; the oracle then checks it answers, leaked
nothing and sent nobody someone else's bytes.

Under the process runner the fault sends ``SIGSTOP``/``SIGCONT`` to every process of the
target; under the Docker runner it pauses the container (``docker pause``, the cgroup
freezer), which stops every task without a signal the target could see.  The fault checks
that the freeze took (all tasks stopped, no CPU used, a probe not answered) and reports it in
its counts (``frozen``, ``cpu_ms_while_paused``, ``answered_while_paused``).
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from afterclose.faults import _server_side as ss
from afterclose.faults.base import FaultReport, param
from afterclose.harness import procfs
from afterclose.harness.protocols import http

if TYPE_CHECKING:
    from afterclose.harness.control import ServerControl

PROBE_PATH = "/afterclose-pause-probe"


@dataclass(frozen=True)
class Pause(ss.StormFault):
    """Freeze the target mid-storm for ``pause_s`` (SIGSTOP or docker pause), then resume it."""

    name: ClassVar[str] = "pause"
    strike_within: ClassVar[tuple[float, float] | None] = (0.2, 0.4)

    pause_s: float = param(1.0, lo=0.05, hi=600, doc="how long the target stays frozen")
    storm_s: float = ss.storm_s_param(2.0, "the storm the pause falls into (0: none)")
    rate_per_s: float = ss.rate_param(300.0)
    concurrency: int = ss.concurrency_param(32)

    def headline(self, at: float) -> str:
        return f"freeze at {at:g}s into a {self.storm_s:g}s storm for {self.pause_s:g}s, resume"

    def run_on(self, server: ServerControl, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(server, rng)
        report = begun.report
        storm = self._storm().start(server, begun.seed, deadline)
        time.sleep(max(storm.started + begun.at - time.monotonic(), 0.0))
        try:
            server.pause()
            frozen_at = time.monotonic()
            report.count("frozen", int(server.wait_paused(timeout_s=min(self.pause_s, 2.0))))
            pids = server.pids()
            cpu_before = procfs.cpu_seconds(pids)
            within_s = min(self.pause_s / 2, 0.3)
            report.count("answered_while_paused", int(_answers(server, within_s)))
            time.sleep(max(frozen_at + self.pause_s - time.monotonic(), 0.0))
            cpu_ms = round((procfs.cpu_seconds(pids) - cpu_before) * 1000)
            report.count("cpu_ms_while_paused", cpu_ms)
        finally:
            server.resume()
        report.count("paused_ms", round((time.monotonic() - frozen_at) * 1000))
        ss.add_storm(report, storm.join(deadline))
        return begun.finish()


def _answers(server: ServerControl, within_s: float) -> bool:
    """Whether a request in the target's protocol gets any byte of an answer within
    ``within_s`` (it must not: frozen).  Plaintext even over TLS: any byte back, an alert
    included, shows the server ran."""
    host, port = server.host, server.port
    protocol = server.endpoint().protocol or http.HTTP
    probe = protocol.prologue(PROBE_PATH) + protocol.request(PROBE_PATH, host, port, close=True)
    try:
        sock = socket.create_connection((host, port), timeout=within_s)
    except OSError:
        return False
    with sock:
        try:
            sock.sendall(probe)
            sock.settimeout(within_s)
            return bool(sock.recv(1))
        except OSError:
            return False
