"""connection_storm: many short connections at a steady rate, each doing one drawn behaviour.

A storm makes the kernel hand out the same fd numbers again and again within milliseconds: a
server that keeps any reference to a closed connection (an epoll registration, a timer, a
pending write) will sooner or later act on the *new* connection that reuses its fd number.
The clients notice that as cross-talk (answers they did not ask for) and the tracer as events
or operations on the wrong incarnation of an fd.

Behaviours (``mix`` maps them to weights): ``keepalive`` (1-3 requests on one connection),
``close`` (one request with ``Connection: close``), ``reset_peer`` (a random phase) or
``reset_peer:<phase>``, ``half_close`` (1-3 requests), ``shutdown_race`` (mixed RST/FIN) and
``idle_drop`` (connect, say nothing for 1-10 ms, close).  Connection ``i`` starts no earlier
than ``i / rate_per_s`` after the start, at most ``concurrency`` are open at once, and the
storm stops after ``duration_s``, ``max_connections`` or the deadline, whichever comes first.

It runs on ``concurrency`` blocking worker threads: the socket calls release the GIL, and on
loopback that is fast enough for a few thousand connections per second on two cores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults import half_close, reset_peer, shutdown_race
from afterclose.faults.base import Action, Conn, Endpoint, Fault, FaultReport, drive, param

BEHAVIOURS = (
    "keepalive",
    "close",
    "reset_peer",
    *(f"reset_peer:{phase}" for phase in reset_peer.PHASES),
    "half_close",
    "shutdown_race",
    "idle_drop",
)
DEFAULT_MIX: dict[str, float] = {
    "keepalive": 4,
    "close": 2,
    "reset_peer": 2,
    "half_close": 1,
    "shutdown_race": 1,
    "idle_drop": 1,
}


@dataclass(frozen=True)
class KeepAlive:
    """Requests one after another on one connection, each answered before the next."""

    requests: int

    def describe(self) -> str:
        return f"keepalive x{self.requests}"

    def perform(self, conn: Conn) -> None:
        if not conn.connect():
            return
        for i in range(self.requests):
            if i and not conn.check_quiet():
                return
            if not conn.send_requests(1):
                return
            response = conn.read_response()
            if response is None:
                return
            if not response.keep_alive:
                conn.read_to_eof()
                return
        conn.check_quiet()


@dataclass(frozen=True)
class CloseAfterOne:
    """One request with ``Connection: close``: the answer, then the server's close."""

    def describe(self) -> str:
        return "close"

    def perform(self, conn: Conn) -> None:
        if conn.connect() and conn.send_requests(1, close_last=True) and conn.read_response():
            conn.read_to_eof()


@dataclass(frozen=True)
class IdleDrop:
    """Connect, say nothing while watching for unasked-for bytes, then close (FIN)."""

    idle_ms: int

    def describe(self) -> str:
        return f"idle_drop {self.idle_ms}ms"

    def perform(self, conn: Conn) -> None:
        if conn.connect():
            conn.check_quiet(self.idle_ms / 1000)


def draw(rng: random.Random, behaviour: str) -> Action:
    """One connection's action for ``behaviour`` (one of BEHAVIOURS)."""
    if behaviour == "keepalive":
        return KeepAlive(rng.randint(1, 3))
    if behaviour == "close":
        return CloseAfterOne()
    if behaviour == "idle_drop":
        return IdleDrop(rng.randint(1, 10))
    if behaviour == "half_close":
        return half_close.draw(rng, requests=rng.randint(1, 3))
    if behaviour == "shutdown_race":
        return shutdown_race.draw(rng, "mixed", max_delay_us=200, valid_first_ratio=0.5)
    if behaviour.startswith("reset_peer"):
        _, _, phase = behaviour.partition(":")
        return reset_peer.draw(rng, phase or "random")
    raise ValueError(f"unknown behaviour {behaviour!r}")


@dataclass(frozen=True)
class ConnectionStorm(Fault):
    """Many short connections at a steady rate, each doing one behaviour from ``mix``."""

    name: ClassVar[str] = "connection_storm"

    rate_per_s: float = param(200.0, lo=0.1, hi=100_000, doc="new connections per second")
    concurrency: int = param(32, lo=1, hi=1024, doc="most connections open at once")
    duration_s: float = param(2.0, lo=0.01, hi=3600, doc="how long to keep opening connections")
    max_connections: int = param(10_000, lo=1, hi=100_000, doc="most connections in all")
    mix: Mapping[str, float] = param(
        DEFAULT_MIX, lo=0, hi=1e6, choices=BEHAVIOURS, doc="behaviour -> weight"
    )

    def planned(self) -> int:
        """How many connections the plan holds: rate x duration, capped by max_connections."""
        # The epsilon keeps 1000/s x 0.3 s (= 300.00000000000006) at 300.
        return min(self.max_connections, math.ceil(self.rate_per_s * self.duration_s - 1e-9))

    def plan(self, rng: random.Random) -> list[Action]:
        names = [name for name, weight in self.mix.items() if weight > 0]
        weights = [self.mix[name] for name in names]
        return [draw(rng, rng.choices(names, weights)[0]) for _ in range(self.planned())]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        return drive(
            self.name,
            endpoint,
            self.plan(rng),
            concurrency=self.concurrency,
            deadline=deadline,
            rate_per_s=self.rate_per_s,
            duration_s=self.duration_s,
        )
