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

It runs on asyncio (uvloop when installed) in ``processes`` worker processes, each taking every
``processes``-th connection of the plan, an equal share of the rate and of the concurrency cap
(:mod:`afterclose.faults._storm_engine`).  The plan, and so the schedule, does not depend on
``processes``.  The reset, half-close and shutdown-race behaviours draw the same actions as
their own faults (so their schedule lines read the same) and perform the same steps, awaited.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults import _storm_engine as engine
from afterclose.faults import half_close, reset_peer, shutdown_race
from afterclose.faults._storm_conn import AsyncConn
from afterclose.faults.base import Endpoint, Fault, FaultReport, Target, param, schedule_of
from afterclose.harness.httpclient import host_header

BEHAVIOURS = (
    "keepalive",
    "close",
    "reset_peer",
    *(f"reset_peer:{phase}" for phase in reset_peer.PHASES),
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
StormAction = engine.StormAction
SPIN_BELOW_US = 200  # as shutdown_race.pause_us: shorter waits spin


@dataclass(frozen=True)
class KeepAlive:
    """Requests one after another on one connection, each answered before the next."""

    requests: int

    def describe(self) -> str:
        return f"keepalive x{self.requests}"

    async def perform(self, conn: AsyncConn) -> None:
        if not await conn.connect():
            return
        for i in range(self.requests):
            if i and not await conn.check_quiet():
                return
            if not await conn.send_requests(1):
                return
            response = await conn.read_response()
            if response is None:
                return
            if not response.keep_alive:
                await conn.read_to_eof()
                return
        await conn.check_quiet()


@dataclass(frozen=True)
class CloseAfterOne:
    """One request with ``Connection: close``: the answer, then the server's close."""

    def describe(self) -> str:
        return "close"

    async def perform(self, conn: AsyncConn) -> None:
        if (
            await conn.connect()
            and await conn.send_requests(1, close_last=True)
            and await conn.read_response()
        ):
            await conn.read_to_eof()


@dataclass(frozen=True)
class IdleDrop:
    """Connect, say nothing while watching for unasked-for bytes, then close (FIN)."""

    idle_ms: int

    def describe(self) -> str:
        return f"idle_drop {self.idle_ms}ms"

    async def perform(self, conn: AsyncConn) -> None:
        if await conn.connect():
            await conn.check_quiet(self.idle_ms / 1000)


@dataclass(frozen=True)
class Malformed:
    """One malformed request (a ``shutdown_race`` variant), nothing else: the server's error
    path answers it (4xx) and/or closes.  Counts ``malformed_sent`` and ``malformed_answered``
    (an answer came) or ``malformed_closed`` (a close without one)."""

    variant: str

    def describe(self) -> str:
        return f"malformed {self.variant}"

    async def perform(self, conn: AsyncConn) -> None:
        if not await conn.connect():
            return
        if not await conn.send(_malformed_bytes(conn, self.variant), [None]):
            return
        conn.report.count("malformed_sent")
        response = await conn.read_response()
        if response is None:
            if conn.gone:
                conn.report.count("malformed_closed")
            return
        conn.report.count("malformed_answered")
        if response.keep_alive:  # the server may keep a connection after an error: fine
            await conn.check_quiet()
        else:
            await conn.read_to_eof()


@dataclass(frozen=True)
class SlowSender:
    """One request written in ``pieces`` writes ``gap_ms`` apart (the server reads it in
    parts, EAGAIN in between), then its answer is expected as usual."""

    pieces: int
    gap_ms: int

    def describe(self) -> str:
        return f"slow_sender {self.pieces} pieces {self.gap_ms}ms apart"

    async def perform(self, conn: AsyncConn) -> None:
        if not await conn.connect():
            return
        path, request = conn.new_request()
        step = math.ceil(len(request) / self.pieces)
        chunks = [request[k : k + step] for k in range(0, len(request), step)]
        for n, chunk in enumerate(chunks):
            if n:
                await conn.pause(self.gap_ms / 1000)
            last = n == len(chunks) - 1
            if not await conn.send(chunk, [path] if last else ()):
                return
        conn.report.count("slow_requests")
        if await conn.read_response() is not None:
            await conn.check_quiet()


# ---------------------------------------------------------------- the other faults' actions


@dataclass(frozen=True)
class Reset:
    """:class:`reset_peer.ResetAction`'s steps, awaited."""

    action: reset_peer.ResetAction

    def describe(self) -> str:
        return self.action.describe()

    async def perform(self, conn: AsyncConn) -> None:
        phase = self.action.phase
        if not await conn.connect():
            return
        if phase == "before-request":
            await conn.check_quiet()
        elif phase == "mid-request":
            _, request = conn.new_request()
            if not await conn.send(request[: len(request) // 2]):
                return
            conn.report.count("partial_requests")
        elif phase == "after-request":
            if not await conn.send_requests(1):
                return
        else:
            if not await conn.send_requests(self.action.pipeline):
                return
            if not await conn.read_some(self.action.read_bytes):
                return
        conn.rst()


@dataclass(frozen=True)
class HalfClose:
    """:class:`half_close.HalfCloseAction`'s steps, awaited."""

    action: half_close.HalfCloseAction

    def describe(self) -> str:
        return self.action.describe()

    async def perform(self, conn: AsyncConn) -> None:
        if not await conn.connect():
            return
        requests = self.action.requests
        if self.action.one_write:
            sent = await conn.send_requests(requests)
        else:
            sent = True
            for _ in range(requests):
                if not await conn.send_requests(1):
                    sent = False
                    break
        if not sent or not conn.shutdown_write():
            return
        while conn.awaiting:
            if await conn.read_response() is None:
                return
        await conn.read_to_eof()


@dataclass(frozen=True)
class Race:
    """:class:`shutdown_race.RaceAction`'s steps, awaited.  Waits under 200 us spin, as in
    the fault (an asyncio sleep would round them up to the loop's timer resolution), which
    holds this worker's other connections back for as long."""

    action: shutdown_race.RaceAction

    def describe(self) -> str:
        return self.action.describe()

    async def perform(self, conn: AsyncConn) -> None:
        action = self.action
        if not await conn.connect():
            return
        data, completes = b"", list[str | None]()
        if action.valid_first:
            path, request = conn.new_request()
            data, completes = request, [path]
        data += _malformed_bytes(conn, action.variant)
        if not await conn.send(data, [*completes, None]):
            return
        conn.report.count("malformed_sent")
        left_us = int(max(conn.deadline - time.monotonic(), 0.0) * 1e6)
        delay_us = min(action.delay_us, left_us)
        if delay_us >= SPIN_BELOW_US:
            await conn.pause(delay_us / 1e6)
        else:
            shutdown_race.pause_us(delay_us)
        if action.close == "rst":
            conn.rst()
            return
        if not conn.shutdown_write():
            return
        answered = False
        while conn.awaiting:
            malformed = conn.awaiting[0] is None
            if await conn.read_response() is None:
                break
            answered = answered or malformed
        else:
            await conn.read_to_eof()
        if answered:
            conn.report.count("malformed_answered")
        elif conn.gone:
            conn.report.count("malformed_closed")
        else:
            conn.report.count("malformed_unanswered")


def _malformed_bytes(conn: AsyncConn, variant: str) -> bytes:
    host = host_header(conn.endpoint.host, conn.endpoint.port).encode()
    template = shutdown_race.MALFORMED[variant]
    return template.replace(b"{path}", conn.next_path().encode()).replace(b"{host}", host)


def draw(rng: random.Random, behaviour: str) -> StormAction:
    """One connection's action for ``behaviour`` (one of BEHAVIOURS)."""
    if behaviour == "keepalive":
        return KeepAlive(rng.randint(1, 3))
    if behaviour == "close":
        return CloseAfterOne()
    if behaviour == "idle_drop":
        return IdleDrop(rng.randint(1, 10))
    if behaviour == "malformed":
        return Malformed(rng.choice(sorted(shutdown_race.MALFORMED)))
    if behaviour == "slow_sender":
        return SlowSender(rng.randint(2, 5), rng.randint(1, 10))
    if behaviour == "half_close":
        return HalfClose(half_close.draw(rng, requests=rng.randint(1, 3)))
    if behaviour == "shutdown_race":
        return Race(shutdown_race.draw(rng, "mixed", max_delay_us=200, valid_first_ratio=0.5))
    if behaviour.startswith("reset_peer"):
        _, _, phase = behaviour.partition(":")
        return Reset(reset_peer.draw(rng, phase or "random"))
    raise ValueError(f"unknown behaviour {behaviour!r}")


@dataclass(frozen=True)
class ConnectionStorm(Fault):
    """Many short connections at a steady rate, each doing one behaviour from ``mix``."""

    name: ClassVar[str] = "connection_storm"

    rate_per_s: float = param(200.0, lo=0.1, hi=100_000, doc="new connections per second")
    concurrency: int = param(32, lo=1, hi=1024, doc="most connections open at once, in all")
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

    def planned(self) -> int:
        """How many connections the plan holds: rate x duration, capped by max_connections."""
        # The epsilon keeps 1000/s x 0.3 s (= 300.00000000000006) at 300.
        return min(self.max_connections, math.ceil(self.rate_per_s * self.duration_s - 1e-9))

    def plan(self, rng: random.Random) -> list[StormAction]:
        names = [name for name, weight in self.mix.items() if weight > 0]
        weights = [self.mix[name] for name in names]
        return [draw(rng, rng.choices(names, weights)[0]) for _ in range(self.planned())]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        job = engine.StormJob(
            fault=self.name,
            target=Target.resolve(self.name, endpoint),
            actions=actions,
            processes=engine.effective_processes(self.processes, self.concurrency, len(actions)),
            concurrency=self.concurrency,
            rate_per_s=self.rate_per_s,
            duration_s=self.duration_s,
            deadline=deadline,
        )
        return engine.run_storm(job, endpoint, schedule_of(actions))
