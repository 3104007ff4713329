"""reset_peer: the client aborts its connections with a RST at a chosen point of the exchange.

A RST (``SO_LINGER {1, 0}`` then ``close()``) makes the kernel drop the connection at once: the
server's next read returns what was already queued and then ECONNRESET, its next write fails
with ECONNRESET or EPIPE, and with epoll it gets EPOLLIN|EPOLLHUP|EPOLLERR together.  A server
that frees its connection on one of those events and then handles the others, or answers a
request after the RST, acts on a closed connection.

Phases: ``before-request`` (right after connect, often before the server even accepted),
``mid-request`` (half the request bytes sent), ``after-request`` (whole request sent, nothing
read), ``mid-response`` (2-8 pipelined requests, one short read of the answers, then RST while
the server is still writing) and ``after-half-close`` (one request, the client's FIN, the
answer, then RST: it reaches a connection the server holds half-closed); ``random`` draws one
of the first four per connection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults.base import Endpoint, Fault, FaultReport, keepalive_hint, param
from afterclose.harness.client import engine
from afterclose.harness.client.behaviours import (
    AFTER_HALF_CLOSE,
    MID_HANDSHAKE,
    ResetAction,
    draw_reset,
)
from afterclose.harness.client.behaviours import RESET_PHASES as PHASES


@dataclass(frozen=True)
class ResetPeer(Fault):
    """Clients abort connections with a RST before, during or after their request."""

    name: ClassVar[str] = "reset_peer"
    applied_when: ClassVar[tuple[str, ...]] = ("rst_sent",)
    unapplied_hint: ClassVar[str] = (
        keepalive_hint("reset")
        + '; for mid-response, name a path with a large answer (large_path = "/big")'
    )

    connections: int = param(20, lo=1, hi=100_000, doc="connections to open, one after another")
    concurrency: int = param(4, lo=1, hi=1024, doc="connections open at once")
    phase: str = param(
        "random",
        choices=(*PHASES, MID_HANDSHAKE, AFTER_HALF_CLOSE, "random"),
        doc="when the client sends the RST",
    )

    def plan(self, rng: random.Random) -> list[ResetAction]:
        return [draw_reset(rng, self.phase) for _ in range(self.connections)]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        return engine.run_plan(
            self.name, endpoint, actions, concurrency=self.concurrency, deadline=deadline
        )
