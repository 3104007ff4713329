"""What target-side faults share: the storm they act under, and its parameters.

A target-side fault is a :class:`~afterclose.faults.base.Fault` with ``needs_server`` set: it
acts on the started server through a :class:`~afterclose.harness.control.ServerControl`
(``run_on``), not through client connections to an endpoint.  Every one of them here acts
while a ``connection_storm`` runs against the server (:class:`StormFault`).  Limits are applied
to the *live* server (``prlimit`` for ``nofile``; the engine's container update for cgroup
limits), which is what ``docker run --ulimit/--pids-limit/--memory`` would have set at start:
the server keeps the limit for the rest of the test, so the oracle's liveness and fd-leak
checks run under it too.  What a fault sees goes into its report as counts and observations;
the rules decide.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import random
import socket
import time
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from afterclose.faults.base import Fault, FaultReport, param
from afterclose.harness.errors import ScenarioError
from afterclose.harness.oracle.evidence import UNDER_DELIVERED

if TYPE_CHECKING:
    from afterclose.harness.control import Clients, ServerControl


@dataclass(frozen=True)
class Storm:
    """The client load a target-side fault puts on the server while it acts."""

    duration_s: float
    rate_per_s: float
    concurrency: int
    through_restarts: bool = False

    def fault(self) -> Fault:
        from afterclose import faults

        params = {
            "duration_s": self.duration_s,
            "rate_per_s": self.rate_per_s,
            "concurrency": self.concurrency,
        }
        return faults.create("connection_storm", params, where="target-side fault storm")

    def plan(self, seed: int) -> list[str]:
        """The storm's schedule with the rng seeded by ``seed`` (as :meth:`run` draws it)."""
        if self.duration_s <= 0:
            return []
        return [f"storm: {line}" for line in self.fault().schedule(random.Random(seed))]

    def run(self, server: ServerControl, seed: int, deadline: float) -> FaultReport | None:
        """Run the storm to its end; None if there is none (``duration_s`` 0)."""
        if self.duration_s <= 0:
            return None
        return server.run_clients(
            self.fault(), seed, deadline, through_restarts=self.through_restarts
        )

    def start(self, server: ServerControl, seed: int, deadline: float) -> Clients:
        """Run the storm on a thread; ``join()`` returns what :meth:`run` would."""
        fault = self.fault() if self.duration_s > 0 else None
        return server.start_clients(fault, seed, deadline, through_restarts=self.through_restarts)


def add_storm(report: FaultReport, storm: FaultReport | None) -> None:
    """Count what the storm's clients did and saw into ``report`` (its schedule is already in
    the fault's own, prefixed ``storm:``)."""
    if storm is None:
        return
    storm.schedule = []
    # The fault hampers the server on purpose (paused, out of fds, restarting): a storm that
    # falls short of its plan meanwhile is what it does, not the harness failing to keep up.
    storm.observations = [o for o in storm.observations if o.kind != UNDER_DELIVERED]
    name = report.fault
    report.merge(storm)
    report.fault = name


def storm_s_param(default: float, doc: str, *, lo: float = 0) -> Any:
    """The ``storm_s`` parameter of a :class:`StormFault`: how long its storm runs."""
    return param(default, lo=lo, hi=600, doc=doc)


def rate_param(default: float) -> Any:
    """The ``rate_per_s`` parameter of a :class:`StormFault`."""
    return param(default, lo=1, hi=100_000, doc="storm: new connections per second")


def concurrency_param(default: int) -> Any:
    """The ``concurrency`` parameter of a :class:`StormFault`."""
    return param(default, lo=1, hi=1024, doc="storm: most connections open at once")


@dataclass(frozen=True)
class Step:
    """One line of a target-side fault's schedule."""

    text: str

    def describe(self) -> str:
        return self.text


class StormFault(Fault):
    """A target-side fault that acts on the server while a :class:`Storm` runs against it.

    Subclasses declare the storm's parameters ``storm_s``, ``rate_per_s`` and ``concurrency``
    themselves (with :func:`storm_s_param`, :func:`rate_param`, :func:`concurrency_param`), so
    that each keeps its own defaults and its own order of parameters: a dataclass base's
    fields would come first.  ``through_restarts``: the storm goes on while the server is down.
    ``strike_within``: the fault acts at a time drawn from the schedule's rng, this range of
    fractions of ``storm_s``; None: it draws no time (``at`` is 0).  ``runners``: where it
    works (``runner_note``: why, for the error)."""

    needs_server: ClassVar[bool] = True
    disturbs_connections: ClassVar[bool] = True
    runners: ClassVar[tuple[str, ...]] = ("process", "docker")
    runner_note: ClassVar[str] = ""
    through_restarts: ClassVar[bool] = False
    strike_within: ClassVar[tuple[float, float] | None] = None

    storm_s: float
    rate_per_s: float
    concurrency: int

    @classmethod
    def stretched(cls, params: Mapping[str, object], seconds: float) -> dict[str, object]:
        given = params.get("storm_s")
        if given is None:
            fields = dataclasses.fields(typing.cast(Any, cls))
            given = next(f.default for f in fields if f.name == "storm_s")
        assert isinstance(given, int | float)
        return {**params, "storm_s": max(float(given), seconds)}

    @abc.abstractmethod
    def headline(self, at: float) -> str:
        """The schedule's first line: what the fault does (``at`` seconds into the storm)."""

    @abc.abstractmethod
    def run_on(self, server: ServerControl, rng: random.Random, deadline: float) -> FaultReport:
        """Do the fault to ``server`` until done or ``deadline`` (``time.monotonic()``)."""

    def plan(self, rng: random.Random) -> list[Step]:
        return [Step(line) for line in self._schedule(*self._draw(rng))]

    def schedule(self, rng: random.Random) -> list[str]:
        return [step.describe() for step in self.plan(rng)]

    def check_runner(self, server: ServerControl) -> None:
        """ScenarioError unless the server's runner is one this fault works with."""
        if server.runner not in self.runners:
            needs = " or ".join(f"--runner={r}" for r in self.runners)
            raise ScenarioError(
                f"needs {needs}, and this run uses --runner={server.runner}"
                + (f": {self.runner_note}" if self.runner_note else ""),
                where=server.where,
                hint=f"run with --runner={self.runners[0]}, or leave {self.name} out under "
                f"--runner={server.runner}",
            )

    def begin(self, server: ServerControl, rng: random.Random) -> Underway:
        """Check the runner, draw the schedule from ``rng``, start the report and the clock."""
        self.check_runner(server)
        at, seed = self._draw(rng)
        return Underway(FaultReport(self.name, schedule=self._schedule(at, seed)), at, seed)

    def _storm(self) -> Storm:
        return Storm(self.storm_s, self.rate_per_s, self.concurrency, self.through_restarts)

    def _draw(self, rng: random.Random) -> tuple[float, int]:
        at = 0.0
        if self.strike_within is not None:
            at = round(self.storm_s * rng.uniform(*self.strike_within), 3)
        return at, rng.getrandbits(64)

    def _schedule(self, at: float, seed: int) -> list[str]:
        return [self.headline(at), *self._storm().plan(seed)]


@dataclass
class Underway:
    """A :class:`StormFault`'s run: its report (with the schedule), when it acts (``at``,
    seconds into the storm), the storm's seed, and when it began."""

    report: FaultReport
    at: float
    seed: int
    started: float = dataclasses.field(default_factory=time.monotonic)

    def finish(self) -> FaultReport:
        """The report, its ``elapsed_s`` the time since the fault began."""
        self.report.elapsed_s = time.monotonic() - self.started
        return self.report


@contextlib.contextmanager
def idle_connections(host: str, port: int, count: int, timeout_s: float = 2.0) -> Iterator[int]:
    """``count`` connections that say nothing and stay open; yields how many connected (the
    kernel completes the handshake even while the server does not accept)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                socks.append(socket.create_connection((host, port), timeout=timeout_s))
            except OSError:
                break
        yield len(socks)
    finally:
        for sock in socks:
            sock.close()
