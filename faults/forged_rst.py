"""forged_rst: a middlebox resets the server's side of a live keep-alive connection.

The RST does not come from the client socket: it is forged (raw socket on ``lo``, needs root
and scapy) with the client's address and the exact sequence number the server expects next,
read from the client socket with TCP_REPAIR (see ``_forging``).  The server's kernel drops
the connection at once: its next read fails with ECONNRESET (after any bytes already
queued), its next write with ECONNRESET or EPIPE, and epoll reports EPOLLIN|EPOLLHUP|EPOLLERR.
The client's kernel is told nothing: it still thinks the connection is open, and its next
request meets a RST from the server's kernel.

Phases: ``idle`` (after ``requests_before`` answered requests, the connection sits idle for
``idle_ms`` so the server is back in epoll_wait, then the RST) and ``after-request`` (the RST is
built before the request and fired microseconds after it left, so it lands right behind the
request: the server reads a request on a connection that is already dead, or is answering
it when the RST arrives).  ``random`` draws one per connection.

``seq_offset`` != 0 moves the RST off the exact sequence number: Linux then answers with a
challenge ACK and keeps the connection (RFC 5961 3.2); the client's probe is answered.

Counts: ``rst_forged``, ``rst_effective`` (the server's socket left the kernel's tables),
``rst_ignored``, ``rst_retried``; after-request: ``answered_before_rst`` / ``unanswered_after_rst``;
``client_still_open`` (the client saw nothing), ``probe_reset`` / ``probe_answered`` (one more
request on the connection).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults import _forging as fg
from afterclose.faults import _packets as pk
from afterclose.faults.base import keepalive_hint, param
from afterclose.harness.client.conn import Conn

PHASES = ("idle", "after-request")


@dataclass(frozen=True)
class ForgedRstAction(pk.ForgingAction):
    phase: str
    requests_before: int
    idle_s: float
    seq_offset: int
    observe_s: float
    probe: bool

    def describe(self) -> str:
        off = f" seq{self.seq_offset:+d}" if self.seq_offset else ""
        return f"forged rst {self.phase} after {self.requests_before} exchanges{off}"

    async def perform(self, conn: Conn) -> None:
        forger = self.forger
        opened = await pk.connect_keepalive(conn, self.requests_before)
        if opened is None:
            return
        tup, sock = opened
        if self.phase == "idle":
            await conn.pause(self.idle_s)
            await pk.forge_rst(
                conn, forger, tup, seq_offset=self.seq_offset, verify_s=self.observe_s
            )
            # The server's kernel forgot the connection silently: the client sees nothing.
            await pk.watch_quiet(conn, 0.0, "client")
        else:
            path, request = conn.new_request()
            # The RST is built before the request is sent: on loopback the request is in the
            # server's receive queue when send() returns, so its rcv_nxt is then exactly the
            # client's snd_nxt + len(request).
            fg.flush_ack(sock)
            raw = pk.rst_segment(
                forger, tup, fg.read_seqs(sock), extra=len(request) + self.seq_offset
            )
            if not await pk.send_then_fire(conn, path, request, forger, raw):
                return
            await pk.forge_rst(
                conn,
                forger,
                tup,
                prebuilt=raw,
                fired=True,
                seq_offset=self.seq_offset,
                verify_s=self.observe_s,
            )
            # Whatever the server sent before the RST reached it is in our receive queue.
            with pk.short_io(conn, self.observe_s):
                answered = await pk.drain_responses(conn, prefix="after_rst")
            conn.report.count("answered_before_rst" if answered else "unanswered_after_rst")
        if self.probe:
            await pk.late_probe(conn, self.observe_s)


def draw(
    rng: random.Random,
    phase: str,
    requests_before: int,
    idle_s: float,
    seq_offset: int,
    observe_s: float,
    probe: bool,
    forger: fg.Forger,
) -> ForgedRstAction:
    chosen = rng.choice(PHASES) if phase == "random" else phase
    return ForgedRstAction(
        chosen, requests_before, idle_s, seq_offset, observe_s, probe, forger=forger
    )


@dataclass(frozen=True)
class ForgedRst(pk.PacketFault[ForgedRstAction]):
    """A forged in-window RST resets the server's side of live keep-alive connections."""

    name: ClassVar[str] = "forged_rst"
    applied_when: ClassVar[tuple[str, ...]] = (pk.RST_FORGED,)
    unapplied_hint: ClassVar[str] = keepalive_hint("forged RST")

    connections: int = param(10, lo=1, hi=10_000, doc="connections, one RST each")
    concurrency: int = pk.concurrency_param()
    phase: str = param("random", choices=(*PHASES, "random"), doc="when the RST is forged")
    requests_before: int = param(1, lo=0, hi=100, doc="answered requests before the RST")
    idle_ms: float = param(20.0, lo=0, hi=10_000, doc="idle time before an idle-phase RST")
    seq_offset: int = param(
        0, lo=-1_000_000, hi=1_000_000, doc="added to the exact seq; != 0 must be ignored"
    )
    observe_ms: float = param(100.0, lo=1, hi=10_000, doc="wait for the RST to take effect")
    probe: bool = pk.probe_param()

    def action(self, rng: random.Random, forger: fg.Forger) -> ForgedRstAction:
        return draw(
            rng,
            self.phase,
            self.requests_before,
            self.idle_ms / 1000,
            self.seq_offset,
            self.observe_ms / 1000,
            self.probe,
            forger,
        )
