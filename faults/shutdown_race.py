"""shutdown_race: a malformed request raced with the client's own close.

The malformed request sends the server down its error path (answer 400, then close), which is
where servers most often close a connection from an unusual place.  After a random delay of a
few microseconds the client closes too, either with a RST (``rst``: the server's 400 write or
its close may hit a connection the kernel already tore down) or with a FIN (``fin``: then the
client reads on and expects the answer to the optional valid request first, then a 4xx/5xx or
a close, then EOF).  Optionally a valid request is pipelined in the same write, so the server
has an answer in flight when it meets the error.

Counts: ``malformed_sent``; with ``fin``: ``malformed_answered`` (an error response came) or
``malformed_closed`` (the server closed without one), or ``malformed_unanswered`` (timeout).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults.base import Endpoint, Fault, FaultReport, param
from afterclose.harness.client import engine
from afterclose.harness.client.behaviours import CLOSE_MODES, RaceAction, draw_race


@dataclass(frozen=True)
class ShutdownRace(Fault):
    """Malformed requests raced with the client's own RST or FIN."""

    name: ClassVar[str] = "shutdown_race"
    applied_when: ClassVar[tuple[str, ...]] = ("connections",)
    unapplied_hint: ClassVar[str] = "the target accepted no connection"

    connections: int = param(20, lo=1, hi=100_000, doc="connections to open")
    concurrency: int = param(4, lo=1, hi=1024, doc="connections open at once")
    close_mode: str = param("mixed", choices=CLOSE_MODES, doc="how the client closes")
    max_delay_us: int = param(200, lo=0, hi=1_000_000, doc="longest wait before the close")
    valid_first_ratio: float = param(
        0.5, lo=0.0, hi=1.0, doc="share of connections sending a valid request first"
    )

    def plan(self, rng: random.Random) -> list[RaceAction]:
        return [
            draw_race(rng, self.close_mode, self.max_delay_us, self.valid_first_ratio)
            for _ in range(self.connections)
        ]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        return engine.run_plan(
            self.name, endpoint, actions, concurrency=self.concurrency, deadline=deadline
        )
