"""Every connection behaviour, written once: the single client faults (``reset_peer``,
``half_close``, ``shutdown_race``) plan these actions, and ``connection_storm``'s mix draws the
same ones, so a behaviour reads the same in every schedule and does the same steps everywhere.

Each ``draw_*`` consumes the rng exactly as the fault's plan always has (the seeded schedules
depend on it).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from afterclose.harness.client.conn import Conn
from afterclose.harness.protocols.http import HTTP

RESET_PHASES = ("before-request", "mid-request", "after-request", "mid-response")
# Chosen by name only (a random phase draws from RESET_PHASES, as seeded schedules always did):
# the RST right after the server's first handshake bytes (over TLS; else right after connect).
MID_HANDSHAKE = "mid-handshake"
CLOSE_MODES = ("rst", "fin", "mixed")
# The malformed requests plans draw from: the protocol's variants, in a fixed order.
MALFORMED_VARIANTS = tuple(sorted(HTTP.malformed_variants))
SPIN_BELOW_US = 200


def spin_us(delay_us: int) -> None:
    """Busy-wait ``delay_us`` microseconds.  A sleep rounds up to the timer slack (50 us by
    default on Linux) plus wake-up latency, or to the loop's timer resolution (1 ms with
    uvloop), which would flatten the small end of a race window; so short waits spin, holding
    the loop's other connections back for as long."""
    end = time.perf_counter() + delay_us / 1e6
    while time.perf_counter() < end:
        pass


async def wait_us(conn: Conn, delay_us: int) -> None:
    """Wait ``delay_us`` (spinning below SPIN_BELOW_US), never past the deadline."""
    left_us = int(max(conn.deadline - time.monotonic(), 0.0) * 1e6)
    delay_us = min(delay_us, left_us)
    if delay_us >= SPIN_BELOW_US:
        await conn.pause(delay_us / 1e6)
    elif delay_us > 0:
        spin_us(delay_us)


async def exchange(conn: Conn, *, close: bool = False) -> bool:
    """One request (``close``: asking the server to close) and its answer, then the server's
    EOF if the answer says it closes.  True when the connection stays open for more."""
    if not await conn.send_requests(1, close_last=close):
        return False
    reply = await conn.read_reply()
    if reply is None:
        return False
    if not reply.keep_alive:
        await conn.read_to_eof()
        return False
    return True


# --------------------------------------------------------------------------- reset


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

    async def perform(self, conn: Conn) -> None:
        conn.disturb()
        if self.phase == MID_HANDSHAKE:
            if await conn.connect(session=False) and (
                not conn.endpoint.tls or await conn.handshake(stop_after_hello=True)
            ):
                conn.rst()
            return
        if not await conn.connect():
            return
        if self.phase == "before-request":
            await conn.check_quiet()
        elif self.phase == "mid-request":
            _, request = conn.new_request()
            # Over TLS the record is cut, not the plaintext: half of its ciphertext goes out.
            wire = request if conn.tls is None else conn.tls.encrypt(request)
            if not await conn.send_raw(wire[: len(wire) // 2]):
                return
            conn.report.count("partial_requests")
        elif self.phase == "after-request":
            if not await conn.send_requests(1):
                return
        else:
            data, tags = conn.large_answer_requests(self.pipeline)
            if not await conn.send(data, tags):
                return
            if not await conn.read_some(self.read_bytes):
                return
        conn.rst()


def draw_reset(rng: random.Random, phase: str = "random") -> ResetAction:
    """The action of one connection; ``phase`` is one of RESET_PHASES or ``random``."""
    chosen = rng.choice(RESET_PHASES) if phase == "random" else phase
    if chosen == "mid-response":
        return ResetAction(chosen, pipeline=rng.randint(2, 8), read_bytes=rng.randint(1, 256))
    return ResetAction(chosen)


# --------------------------------------------------------------------------- half-close


@dataclass(frozen=True)
class HalfCloseAction:
    """Requests (one write, or one write each), then ``shutdown(SHUT_WR)``, then every
    answer and EOF."""

    requests: int
    one_write: bool

    def describe(self) -> str:
        return f"half_close x{self.requests} {'one-write' if self.one_write else 'per-request'}"

    async def perform(self, conn: Conn) -> None:
        conn.disturb()
        if not await conn.connect():
            return
        if self.one_write:
            sent = await conn.send_requests(self.requests)
        else:
            sent = True
            for _ in range(self.requests):
                if not await conn.send_requests(1):
                    sent = False
                    break
        if not sent or not conn.shutdown_write():
            return
        while conn.awaiting:
            if await conn.read_reply() is None:
                return
        await conn.read_to_eof()


def draw_half_close(rng: random.Random, requests: int) -> HalfCloseAction:
    return HalfCloseAction(requests, one_write=rng.random() < 0.5)


# --------------------------------------------------------------------------- shutdown race


@dataclass(frozen=True)
class RaceAction:
    """A malformed request (after an optional valid one, same write), ``delay_us``, then the
    client's own RST or FIN."""

    variant: str
    close: str
    delay_us: int
    valid_first: bool

    def describe(self) -> str:
        first = "valid+" if self.valid_first else ""
        return f"shutdown_race {first}{self.variant} {self.close} after {self.delay_us}us"

    async def perform(self, conn: Conn) -> None:
        conn.disturb()
        if not await conn.connect():
            return
        data, completes = b"", list[str | None]()
        if self.valid_first:
            tag, request = conn.new_request()
            data, completes = request, [tag]
        data += conn.malformed_request(self.variant)
        if not await conn.send(data, [*completes, None]):
            return
        conn.report.count("malformed_sent")
        await wait_us(conn, self.delay_us)
        if self.close == "rst":
            conn.rst()
            return
        if not conn.shutdown_write():
            return
        answered = False
        while conn.awaiting:
            malformed = conn.awaiting[0] is None
            if await conn.read_reply() is None:
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


def draw_race(
    rng: random.Random, close_mode: str, max_delay_us: int, valid_first_ratio: float
) -> RaceAction:
    variant = rng.choice(MALFORMED_VARIANTS)
    close = rng.choice(("rst", "fin")) if close_mode == "mixed" else close_mode
    delay_us = rng.randint(0, max_delay_us)
    return RaceAction(variant, close, delay_us, valid_first=rng.random() < valid_first_ratio)


# --------------------------------------------------------------------------- the storm's own


@dataclass(frozen=True)
class KeepAlive:
    """Requests one after another on one connection, each answered before the next."""

    requests: int

    def describe(self) -> str:
        return f"keepalive x{self.requests}"

    async def perform(self, conn: Conn) -> None:
        if not await conn.connect():
            return
        for i in range(self.requests):
            if i and not await conn.check_quiet():
                return
            if not await exchange(conn):
                return
        await conn.check_quiet()


@dataclass(frozen=True)
class CloseAfterOne:
    """One request asking the server to close: the answer, then the server's close."""

    def describe(self) -> str:
        return "close"

    async def perform(self, conn: Conn) -> None:
        if not await conn.connect():
            return
        if await exchange(conn, close=True) and await conn.check_quiet():
            # The protocol has no way to ask for a close (an echo, RESP, MQTT): the client
            # closes instead.
            conn.close()


@dataclass(frozen=True)
class IdleDrop:
    """Connect, say nothing while watching for unasked-for bytes, then close (FIN)."""

    idle_ms: int

    def describe(self) -> str:
        return f"idle_drop {self.idle_ms}ms"

    async def perform(self, conn: Conn) -> None:
        if await conn.connect():
            await conn.check_quiet(self.idle_ms / 1000)


@dataclass(frozen=True)
class Malformed:
    """One malformed request, nothing else: the server's error path answers it (4xx) and/or
    closes.  Counts ``malformed_sent`` and ``malformed_answered`` (an answer came) or
    ``malformed_closed`` (a close without one)."""

    variant: str

    def describe(self) -> str:
        return f"malformed {self.variant}"

    async def perform(self, conn: Conn) -> None:
        if not await conn.connect():
            return
        if not await conn.send(conn.malformed_request(self.variant), [None]):
            return
        conn.report.count("malformed_sent")
        reply = await conn.read_reply()
        if reply is None:
            if conn.gone:
                conn.report.count("malformed_closed")
            return
        conn.report.count("malformed_answered")
        if reply.keep_alive:  # the server may keep a connection after an error: fine
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

    async def perform(self, conn: Conn) -> None:
        if not await conn.connect():
            return
        tag, request = conn.new_request()
        step = math.ceil(len(request) / self.pieces)
        chunks = [request[k : k + step] for k in range(0, len(request), step)]
        for n, chunk in enumerate(chunks):
            if n:
                await conn.pause(self.gap_ms / 1000)
            last = n == len(chunks) - 1
            if not await conn.send(chunk, [tag] if last else ()):
                return
        conn.report.count("slow_requests")
        if await conn.read_reply() is not None:
            await conn.check_quiet()


@dataclass(frozen=True)
class IdleHold:
    """Connect, optionally one request and its answer, then stay idle for ``hold_ms`` while
    watching for unasked-for bytes: the server's idle timer is meant to close it meanwhile.
    Counts ``idle_closed_by_server`` (it did) or ``idle_held`` (the hold ended first)."""

    hold_ms: int
    request: bool

    def describe(self) -> str:
        return f"idle_hold {self.hold_ms}ms{' after one request' if self.request else ''}"

    async def perform(self, conn: Conn) -> None:
        if not await conn.connect():
            return
        if self.request and not await exchange(conn):
            return
        if await conn.check_quiet(self.hold_ms / 1000):
            conn.report.count("idle_held")
        elif conn.gone:
            conn.report.count("idle_closed_by_server")
