"""connection_storm: many short connections at a steady rate, each doing one drawn behaviour.

A storm makes the kernel hand out the same fd numbers again and again within milliseconds: a
server that keeps any reference to a closed connection (an epoll registration, a timer, a
pending write) will sooner or later act on the *new* connection that reuses its fd number.
The clients notice that as cross-talk (answers they did not ask for) and the tracer as events
or operations on the wrong incarnation of an fd.

Behaviours (``mix`` maps them to weights): ``keepalive`` (1-3 requests on one connection),
``close`` (one request with ``Connection: close``), ``reset_peer`` (a random phase) or
``reset_peer:<phase>``, ``half_close`` (1-3 requests), ``shutdown_race`` (mixed RST/FIN),
``idle_drop`` (connect, say nothing for 1-10 ms, close), ``malformed`` (one malformed request,
then the error answer or the close, then EOF) and ``slow_sender`` (one request written in 2-5
pieces 1-10 ms apart, then its answer).  Connection ``i`` starts no earlier than
``i / rate_per_s`` after the start, at most ``concurrency`` are open at once, and the storm
stops after ``duration_s``, ``max_connections`` or the deadline, whichever comes first.

It runs in ``processes`` worker processes, each taking every ``processes``-th connection of the
plan, an equal share of the rate and of the concurrency cap
(:mod:`afterclose.harness.client.engine`); each worker performs its share on the compiled
engine (:mod:`afterclose.harness.client.native`: C on epoll, for HTTP/1.1 without TLS) or on
asyncio (uvloop when installed) for every other protocol, as ``engine`` says.  The plan, and
so the schedule, depends on neither ``processes`` nor ``engine``.  Every behaviour is one of
:mod:`afterclose.harness.client.behaviours`: the reset, half-close and shutdown-race ones are
the very actions of their own faults.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults.base import Endpoint, Fault, FaultReport, param
from afterclose.harness.client import behaviours as b
from afterclose.harness.client import engine, native
from afterclose.harness.client.conn import Remote
from afterclose.harness.client.plan import Action, schedule_of

BEHAVIOURS = (
    "keepalive",
    "close",
    "reset_peer",
    *(f"reset_peer:{phase}" for phase in b.RESET_PHASES),
    "half_close",
    "shutdown_race",
    "idle_drop",
    "malformed",
    "slow_sender",
)
DEFAULT_MIX: dict[str, float] = {
    "keepalive": 4,
    "close": 2,
    "reset_peer": 2,
    "half_close": 1,
    "shutdown_race": 1,
    "idle_drop": 1,
    "malformed": 1,
    "slow_sender": 1,
}


def draw(rng: random.Random, behaviour: str) -> Action:
    """One connection's action for ``behaviour`` (one of BEHAVIOURS)."""
    if behaviour == "keepalive":
        return b.KeepAlive(rng.randint(1, 3))
    if behaviour == "close":
        return b.CloseAfterOne()
    if behaviour == "idle_drop":
        return b.IdleDrop(rng.randint(1, 10))
    if behaviour == "malformed":
        return b.Malformed(rng.choice(b.MALFORMED_VARIANTS))
    if behaviour == "slow_sender":
        return b.SlowSender(rng.randint(2, 5), rng.randint(1, 10))
    if behaviour == "half_close":
        return b.draw_half_close(rng, requests=rng.randint(1, 3))
    if behaviour == "shutdown_race":
        return b.draw_race(rng, "mixed", max_delay_us=200, valid_first_ratio=0.5)
    if behaviour.startswith("reset_peer"):
        _, _, phase = behaviour.partition(":")
        return b.draw_reset(rng, phase or "random")
    raise ValueError(f"unknown behaviour {behaviour!r}")


@dataclass(frozen=True)
class ConnectionStorm(Fault):
    """Many short connections at a steady rate, each doing one behaviour from ``mix``."""

    name: ClassVar[str] = "connection_storm"
    applied_when: ClassVar[tuple[str, ...]] = ("connections",)
    unapplied_hint: ClassVar[str] = "the target accepted no connection"

    rate_per_s: float = param(200.0, lo=0.1, hi=100_000, doc="new connections per second")
    concurrency: int = param(32, lo=1, hi=10_000, doc="most connections open at once, in all")
    duration_s: float = param(2.0, lo=0.01, hi=3600, doc="how long to keep opening connections")
    max_connections: int = param(10_000, lo=1, hi=100_000, doc="most connections in all")
    mix: Mapping[str, float] = param(
        DEFAULT_MIX, lo=0, hi=1e6, choices=BEHAVIOURS, doc="behaviour -> weight"
    )
    processes: int = param(
        engine.DEFAULT_PROCESSES,
        lo=1,
        hi=32,
        doc="worker processes sharing the rate and the concurrency (at most one per "
        "connection slot)",
    )
    engine: str = param(
        "auto",
        choices=native.ENGINES,
        doc="who performs the plan: the compiled engine (native: HTTP/1.1 without TLS), the "
        "asyncio one, or auto (native when it can)",
    )

    @classmethod
    def stretched(cls, params: Mapping[str, object], seconds: float) -> dict[str, object]:
        defaults = cls()
        duration = params.get("duration_s", defaults.duration_s)
        rate = params.get("rate_per_s", defaults.rate_per_s)
        most = params.get("max_connections", defaults.max_connections)
        assert isinstance(duration, int | float) and isinstance(rate, int | float)
        assert isinstance(most, int)
        if duration >= seconds:
            return dict(params)
        # The cap grows with the duration, so the storm keeps its rate for the whole time.
        needed = min(100_000, max(most, math.ceil(rate * seconds)))
        return {**params, "duration_s": seconds, "max_connections": needed}

    def planned(self) -> int:
        """How many connections the plan holds: rate x duration, capped by max_connections."""
        # The epsilon keeps 1000/s x 0.3 s (= 300.00000000000006) at 300.
        return min(self.max_connections, math.ceil(self.rate_per_s * self.duration_s - 1e-9))

    def plan(self, rng: random.Random) -> list[Action]:
        names = [name for name, weight in self.mix.items() if weight > 0]
        weights = [self.mix[name] for name in names]
        return [draw(rng, rng.choices(names, weights)[0]) for _ in range(self.planned())]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        job = engine.Job(
            fault=self.name,
            remote=Remote.resolve(self.name, endpoint),
            actions=actions,
            processes=engine.effective_processes(self.processes, self.concurrency, len(actions)),
            concurrency=self.concurrency,
            rate_per_s=self.rate_per_s,
            duration_s=self.duration_s,
            deadline=deadline,
            engine=self.engine,
        )
        return engine.run_storm(job, endpoint, schedule_of(actions))
