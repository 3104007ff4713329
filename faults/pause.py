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

import contextlib
import os
import random
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from afterclose.faults import target_base as tb
from afterclose.faults.base import FaultReport, param
from afterclose.harness.protocols import http

if TYPE_CHECKING:
    from afterclose.harness.session import TargetRun

PROBE_PATH = "/afterclose-pause-probe"


@dataclass(frozen=True)
class Pause(tb.StormFault):
    """Freeze the target mid-storm for ``pause_s`` (SIGSTOP or docker pause), then resume it."""

    name: ClassVar[str] = "pause"
    strike_within: ClassVar[tuple[float, float] | None] = (0.2, 0.4)

    pause_s: float = param(1.0, lo=0.05, hi=600, doc="how long the target stays frozen")
    storm_s: float = tb.storm_s_param(2.0, "the storm the pause falls into (0: none)")
    rate_per_s: float = tb.rate_param(300.0)
    concurrency: int = tb.concurrency_param(32)

    def headline(self, at: float) -> str:
        return f"freeze at {at:g}s into a {self.storm_s:g}s storm for {self.pause_s:g}s, resume"

    def run(self, run: TargetRun, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(run, rng)
        report = begun.report
        storm = tb.Background(self._storm(), run, begun.seed, deadline)
        time.sleep(max(storm.started + begun.at - time.monotonic(), 0.0))
        freezer = _Freezer(run)
        try:
            freezer.freeze()
            frozen_at = time.monotonic()
            report.count("frozen", int(freezer.wait_frozen(timeout_s=min(self.pause_s, 2.0))))
            pids = run.target.host_pids()
            cpu_before = tb.cpu_seconds(pids)
            report.count("answered_while_paused", int(_answers(run, min(self.pause_s / 2, 0.3))))
            time.sleep(max(frozen_at + self.pause_s - time.monotonic(), 0.0))
            report.count("cpu_ms_while_paused", round((tb.cpu_seconds(pids) - cpu_before) * 1000))
        finally:
            freezer.thaw()
        report.count("paused_ms", round((time.monotonic() - frozen_at) * 1000))
        tb.add_storm(report, storm.join(deadline))
        return begun.finish()


class _Freezer:
    """Stops and resumes every task of the target: the cgroup freezer for a container,
    SIGSTOP/SIGCONT for processes."""

    def __init__(self, run: TargetRun) -> None:
        self.run = run
        self.container = tb.container_of(run)
        self.pids: list[int] = []
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True
        if self.container is not None:
            self.container.api.pause(self.container.container_id)
            return
        self.pids = self.run.target.host_pids()
        tb.signal_target(self.run.target, signal.SIGSTOP)

    def wait_frozen(self, timeout_s: float) -> bool:
        if self.container is not None:
            api, cid = self.container.api, self.container.container_id
            return tb.wait_for(lambda: bool(api.inspect_container(cid)["State"]["Paused"]), 2.0)
        return tb.wait_for(lambda: all(tb.task_state(p) in "TtXZ" for p in self.pids), timeout_s)

    def thaw(self) -> None:
        if not self.frozen:
            return
        self.frozen = False
        if self.container is not None:
            self.container.api.unpause(self.container.container_id)
        else:
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)


def _answers(run: TargetRun, within_s: float) -> bool:
    """Whether a GET gets any byte of an answer within ``within_s`` (it must not: frozen)."""
    try:
        sock = socket.create_connection((run.host, run.port), timeout=within_s)
    except OSError:
        return False
    with sock:
        try:
            sock.sendall(http.build_get(PROBE_PATH, run.host, run.port, close=True))
            sock.settimeout(within_s)
            return bool(sock.recv(1))
        except OSError:
            return False
