"""half_close: the client sends its requests, then ``shutdown(SHUT_WR)``, then reads until EOF.

After the FIN the server's read returns 0 (EPOLLRDHUP, and EPOLLIN with nothing to read) while
its answers are still owed: the connection is half-closed, not gone.  A correct server answers
every request it read and only then closes.  A server that treats the EOF as "connection dead"
and frees it while an answer is queued, or answers after freeing, shows up here as missing
answers (``closed_without_answer``) or as bytes for someone else (cross-talk).

Each connection pipelines its requests either in one write or one write per request (drawn).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults.base import Endpoint, Fault, FaultReport, param
from afterclose.harness.client import engine
from afterclose.harness.client.behaviours import HalfCloseAction, draw_half_close


@dataclass(frozen=True)
class HalfClose(Fault):
    """Clients send requests, half-close (FIN), and expect every answer before EOF."""

    name: ClassVar[str] = "half_close"
    applied_when: ClassVar[tuple[str, ...]] = ("connections",)
    unapplied_hint: ClassVar[str] = "the target accepted no connection"

    connections: int = param(20, lo=1, hi=100_000, doc="connections to open")
    concurrency: int = param(4, lo=1, hi=1024, doc="connections open at once")
    requests_per_connection: int = param(2, lo=1, hi=100, doc="requests before the FIN")

    def plan(self, rng: random.Random) -> list[HalfCloseAction]:
        return [draw_half_close(rng, self.requests_per_connection) for _ in range(self.connections)]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        return engine.run_plan(
            self.name, endpoint, actions, concurrency=self.concurrency, deadline=deadline
        )
