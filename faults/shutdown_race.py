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
import time
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults.base import Conn, Endpoint, Fault, FaultReport, drive, param
from afterclose.harness.httpclient import host_header

# Each breaks a different rule of the request grammar, to reach different error branches.
MALFORMED: dict[str, bytes] = {
    "garbage": b"GARBAGE\r\n\r\n",
    "no-target": b"GET\r\n\r\n",
    "bad-version": b"GET {path} HTTP/9.9\r\nHost: {host}\r\n\r\n",
    "bad-target": b"GET no-slash HTTP/1.1\r\nHost: {host}\r\n\r\n",
    "bad-header": b"GET {path} HTTP/1.1\r\nHost: {host}\r\nno colon here\r\n\r\n",
    "binary": b"\x00\x01\x02\xff\xfe \x7f\r\n\r\n",
}
CLOSE_MODES = ("rst", "fin", "mixed")
_SPIN_BELOW_US = 200


def pause_us(delay_us: int) -> None:
    """Wait ``delay_us`` microseconds.  Short waits spin: ``time.sleep()`` rounds up to the
    timer slack (50 us by default on Linux) plus wake-up latency, which would flatten the
    small end of the race window.
    """
    if delay_us <= 0:
        return
    if delay_us >= _SPIN_BELOW_US:
        time.sleep(delay_us / 1e6)
        return
    end = time.perf_counter() + delay_us / 1e6
    while time.perf_counter() < end:
        pass


@dataclass(frozen=True)
class RaceAction:
    variant: str
    close: str
    delay_us: int
    valid_first: bool

    def describe(self) -> str:
        first = "valid+" if self.valid_first else ""
        return f"shutdown_race {first}{self.variant} {self.close} after {self.delay_us}us"

    def perform(self, conn: Conn) -> None:
        if not conn.connect():
            return
        data, completes = b"", list[str | None]()
        if self.valid_first:
            path, request = conn.new_request()
            data, completes = request, [path]
        host = host_header(conn.endpoint.host, conn.endpoint.port).encode()
        template = MALFORMED[self.variant]
        data += template.replace(b"{path}", conn.next_path().encode()).replace(b"{host}", host)
        if not conn.send(data, [*completes, None]):
            return
        conn.report.count("malformed_sent")
        pause_us(min(self.delay_us, int(max(conn.deadline - time.monotonic(), 0.0) * 1e6)))
        if self.close == "rst":
            conn.rst()
            return
        if not conn.shutdown_write():
            return
        answered = False
        while conn.awaiting:
            malformed = conn.awaiting[0] is None
            if conn.read_response() is None:
                break
            answered = answered or malformed
        else:
            conn.read_to_eof()
        if answered:
            conn.report.count("malformed_answered")
        elif conn.gone:
            conn.report.count("malformed_closed")
        else:
            conn.report.count("malformed_unanswered")


def draw(
    rng: random.Random, close_mode: str, max_delay_us: int, valid_first_ratio: float
) -> RaceAction:
    variant = rng.choice(sorted(MALFORMED))
    close = rng.choice(("rst", "fin")) if close_mode == "mixed" else close_mode
    delay_us = rng.randint(0, max_delay_us)
    return RaceAction(variant, close, delay_us, valid_first=rng.random() < valid_first_ratio)


@dataclass(frozen=True)
class ShutdownRace(Fault):
    """Malformed requests raced with the client's own RST or FIN."""

    name: ClassVar[str] = "shutdown_race"

    connections: int = param(20, lo=1, hi=100_000, doc="connections to open")
    concurrency: int = param(4, lo=1, hi=1024, doc="connections open at once")
    close_mode: str = param("mixed", choices=CLOSE_MODES, doc="how the client closes")
    max_delay_us: int = param(200, lo=0, hi=1_000_000, doc="longest wait before the close")
    valid_first_ratio: float = param(
        0.5, lo=0.0, hi=1.0, doc="share of connections sending a valid request first"
    )

    def plan(self, rng: random.Random) -> list[RaceAction]:
        return [
            draw(rng, self.close_mode, self.max_delay_us, self.valid_first_ratio)
            for _ in range(self.connections)
        ]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        actions = self.plan(rng)
        return drive(self.name, endpoint, actions, concurrency=self.concurrency, deadline=deadline)
