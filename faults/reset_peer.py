"""reset_peer: the client aborts its connections with a RST at a chosen point of the exchange.

A RST (``SO_LINGER {1, 0}`` then ``close()``) makes the kernel drop the connection at once: the
server's next read returns what was already queued and then ECONNRESET, its next write fails
with ECONNRESET or EPIPE, and with epoll it gets EPOLLIN|EPOLLHUP|EPOLLERR together.  A server
that frees its connection on one of those events and then handles the others, or answers a
request after the RST, acts on a closed connection.

Phases: ``before-request`` (right after connect, often before the server even accepted),
``mid-request`` (half the request bytes sent), ``after-request`` (whole request sent, nothing
read) and ``mid-response`` (2-8 pipelined requests, one short read of the answers, then RST while
the server is still writing); ``random`` draws one per connection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults.base import Conn, Endpoint, Fault, FaultReport, drive, param

PHASES = ("before-request", "mid-request", "after-request", "mid-response")


@dataclass(frozen=True)
class ResetAction:
    """One connection reset at ``phase``; ``pipeline``/``read_bytes`` for mid-response."""

    phase: str
    pipeline: int = 1
    read_bytes: int = 0

    def describe(self) -> str:
        if self.phase == "mid-response":
            return f"rst mid-response pipeline={self.pipeline} read<={self.read_bytes}B"
        return f"rst {self.phase}"

    def perform(self, conn: Conn) -> None:
        if not conn.connect():
            return
        if self.phase == "before-request":
            conn.check_quiet()
        elif self.phase == "mid-request":
            _, request = conn.new_request()
            if not conn.send(request[: len(request) // 2]):
                return
            conn.report.count("partial_requests")
        elif self.phase == "after-request":
            if not conn.send_requests(1):
                return
        else:
            if not conn.send_requests(self.pipeline):
                return
            if not conn.read_some(self.read_bytes):
                return
        conn.rst()


def draw(rng: random.Random, phase: str = "random") -> ResetAction:
    """The action of one connection; ``phase`` is one of PHASES or ``random``."""
    chosen = rng.choice(PHASES) if phase == "random" else phase
    if chosen == "mid-response":
        return ResetAction(chosen, pipeline=rng.randint(2, 8), read_bytes=rng.randint(1, 256))
    return ResetAction(chosen)


@dataclass(frozen=True)
class ResetPeer(Fault):
    """Clients abort connections with a RST before, during or after their request."""

    name: ClassVar[str] = "reset_peer"

    connections: int = param(20, lo=1, hi=100_000, doc="connections to open, one after another")
    concurrency: int = param(4, lo=1, hi=1024, doc="connections open at once")
    phase: str = param("random", choices=(*PHASES, "random"), doc="when the client sends the RST")

    def plan(self, rng: random.Random) -> list[ResetAction]:
        return [draw(rng, self.phase) for _ in range(self.connections)]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        return drive(self.name, endpoint, actions, concurrency=self.concurrency, deadline=deadline)
