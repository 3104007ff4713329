"""idle_hold: connections held idle past the server's idle timeout while a storm churns.

A server with an idle timer closes connections nobody spoke on for a while.  A timer that
outlives its connection (not cancelled when the connection closed, or keyed by the fd number
alone) fires later on whatever connection has reused that number: it closes a stranger, or
closes a number already closed.  Short storms never reach such timers.  This fault opens
``idle_connections`` connections (each silent, or after one answered request, drawn per
connection), holds each idle for ``hold_s`` (the manifest's ``idle_timeout_s`` plus a margin, so
the timer fires while they are held), and meanwhile churns short connections at ``rate_per_s``
for as long, so that the kernel hands the closed numbers out again and again while the timers
run.  Every socket call is the one client's (:mod:`afterclose.harness.client`).

Counts: ``idle_closed_by_server`` (the idle timer closed the connection, as it should),
``idle_held`` (the hold ended first), and the churn's usual counts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults.base import Endpoint, Fault, FaultReport, param
from afterclose.faults.connection_storm import BEHAVIOURS, draw
from afterclose.harness.client import behaviours as b
from afterclose.harness.client import engine
from afterclose.harness.client.conn import Remote
from afterclose.harness.client.plan import Action, schedule_of

CHURN_MIX: dict[str, float] = {"keepalive": 3, "close": 2, "idle_drop": 1, "reset_peer": 1}


@dataclass(frozen=True)
class IdleHold(Fault):
    """Idle connections held past the server's idle timeout while short ones churn."""

    name: ClassVar[str] = "idle_hold"
    applied_when: ClassVar[tuple[str, ...]] = ("idle_held", "idle_closed_by_server")
    unapplied_hint: ClassVar[str] = "no idle connection was held: the target accepted none"

    idle_connections: int = param(20, lo=1, hi=1000, doc="connections held idle")
    hold_s: float = param(5.0, lo=0.01, hi=3600, doc="how long each is held idle")
    request_ratio: float = param(
        0.5, lo=0, hi=1, doc="share of idle connections that first send one request"
    )
    rate_per_s: float = param(100.0, lo=0.1, hi=100_000, doc="churn: new connections per second")
    concurrency: int = param(20, lo=1, hi=1024, doc="churn: most short connections open at once")
    mix: Mapping[str, float] = param(
        CHURN_MIX, lo=0, hi=1e6, choices=BEHAVIOURS, doc="churn: behaviour -> weight"
    )
    processes: int = param(
        engine.DEFAULT_PROCESSES, lo=1, hi=32, doc="worker processes sharing the connections"
    )

    @classmethod
    def stretched(cls, params: Mapping[str, object], seconds: float) -> dict[str, object]:
        hold = params.get("hold_s", cls.hold_s)
        assert isinstance(hold, int | float)
        return {**params, "hold_s": max(float(hold), seconds)}

    def plan(self, rng: random.Random) -> list[Action]:
        hold_ms = math.ceil(self.hold_s * 1000)
        idle: list[Action] = [
            b.IdleHold(hold_ms, rng.random() < self.request_ratio)
            for _ in range(self.idle_connections)
        ]
        names = [name for name, weight in self.mix.items() if weight > 0]
        weights = [self.mix[name] for name in names]
        churn = math.ceil(self.rate_per_s * self.hold_s)
        return idle + [draw(rng, rng.choices(names, weights)[0]) for _ in range(churn)]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        # The idle ones come first in the plan: they start within idle_connections / rate,
        # and each holds a slot of its own for the whole hold.
        slots = self.idle_connections + self.concurrency
        job = engine.Job(
            fault=self.name,
            remote=Remote.resolve(self.name, endpoint),
            actions=actions,
            processes=engine.effective_processes(self.processes, slots, len(actions)),
            concurrency=slots,
            rate_per_s=self.rate_per_s,
            duration_s=self.hold_s + self.idle_connections / self.rate_per_s,
            deadline=deadline,
        )
        return engine.run_storm(job, endpoint, schedule_of(actions))
