"""rst_before_accept: connections are reset right after the handshake, before the server accepts.

Once the handshake's last ACK arrives, the kernel queues the new connection on the listener's
accept queue; the server takes it out with ``accept()`` when it gets round to it.  A RST that
arrives in between kills the queued socket where it sits: Linux still hands it out (``accept``
succeeds, unlike BSDs which may return ECONNABORTED): its first ``read`` fails with
ECONNRESET, the next ones return 0, ``write`` fails with EPIPE, and epoll reports
EPOLLIN|EPOLLERR|EPOLLHUP|EPOLLRDHUP as soon as it is registered.  A server must treat such a
socket like any other reset connection.

Methods: ``forged`` builds the RST before the handshake (the client socket's initial sequence
number is chosen in advance with TCP_REPAIR, so the RST's ``seq`` = ISN + 1 is known) and fires it
from a raw socket on ``lo`` microseconds after ``connect()`` returns; the client socket stays
open and knows nothing, and its request then meets a RST (needs root and scapy).  ``linger``
is the client's own abort, ``SO_LINGER {1, 0}`` and ``close()`` at once (no root needed).
``random`` draws one per connection.

Whether a RST beat ``accept()`` is a race with the server's accept loop, which only the
server's side shows (the tracer: an accepted fd whose first operation fails, or whose first
event is EPOLLHUP|EPOLLERR).  The RST is sent as early as it can be: on loopback the handshake
completes inside ``connect()``, and the RST leaves a few microseconds later, while the server
thread is still being woken; the client thread runs SCHED_FIFO for those microseconds (when
it may: root), so the server thread it wakes cannot preempt it in between.  Against seed-fixed
(an epoll thread looping on ``accept4``) on a loaded 2-CPU VM, 19-50 of 50 RSTs arrived before
the ``accept4`` that took the connection began (6-14 of 50 without SCHED_FIFO).

Counts: ``rst_forged`` / ``rst_sent`` (linger), ``rst_effective`` (the queued socket left the
kernel's tables), ``probe_reset`` / ``probe_answered`` (forged: the client's request).
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults import _forging as fg
from afterclose.faults import _packets as pk
from afterclose.faults.base import param
from afterclose.harness.client.conn import Conn, set_rst_on_close

METHODS = ("forged", "linger")


@dataclass(frozen=True)
class RstBeforeAcceptAction(pk.ForgingAction):
    method: str
    isn: int  # the client's initial sequence number (forged)
    observe_s: float
    probe: bool

    def describe(self) -> str:
        return f"rst before accept {self.method}"

    def needs_forger(self) -> bool:
        return self.method == "forged"

    async def perform(self, conn: Conn) -> None:
        if self.method == "linger":
            await self._linger(conn)
        else:
            await self._forged(conn, self.forger)

    async def _linger(self, conn: Conn) -> None:
        # Set SO_LINGER before connect: after it, only close() is left to do.
        tup = pk.connect(
            conn,
            before_connect=set_rst_on_close,
            on_connected=_close,
            realtime_hook=True,
        )
        if tup is None:
            return
        conn.report.count("rst_sent")
        await pk.verify_reset(conn, tup, self.observe_s)

    async def _forged(self, conn: Conn, forger: fg.Forger) -> None:
        prebuilt: list[bytes] = []

        def build(sock: socket.socket) -> None:
            # Bound, not yet connected: the 4-tuple and the ISN are known, the RST can be
            # ready before the SYN leaves.  No ACK flag: in ESTABLISHED, a RST needs only
            # seq == rcv_nxt (= ISN + 1 before any data).
            tup = fg.FourTuple.of(sock, conn.remote.sockaddr)
            prebuilt.append(forger.build(tup, "R", fg.seq_add(self.isn, 1)))

        def fire(_: socket.socket) -> None:
            forger.fire(prebuilt[0])

        tup = pk.connect(
            conn, isn=self.isn, before_connect=build, on_connected=fire, realtime_hook=True
        )
        if tup is None:
            return
        conn.report.count(pk.RST_FORGED)
        if not await pk.verify_reset(conn, tup, self.observe_s):
            conn.report.count("rst_ignored")
        await pk.watch_quiet(conn, 0.0, "client")
        if self.probe:
            await pk.late_probe(conn, self.observe_s)


def _close(sock: socket.socket) -> None:
    sock.close()


@dataclass(frozen=True)
class RstBeforeAccept(pk.PacketFault[RstBeforeAcceptAction]):
    """Connections reset right after the handshake, while they wait in the accept queue."""

    name: ClassVar[str] = "rst_before_accept"
    applied_when: ClassVar[tuple[str, ...]] = (pk.RST_FORGED, "rst_sent")
    unapplied_hint: ClassVar[str] = "no connection could be reset before the server accepted it"

    connections: int = param(20, lo=1, hi=10_000, doc="connections, each reset at once")
    concurrency: int = param(1, lo=1, hi=64, doc="connections made at once")
    method: str = param(
        "forged", choices=(*METHODS, "random"), doc="forged RST (root) or SO_LINGER abort"
    )
    observe_ms: float = param(100.0, lo=1, hi=10_000, doc="wait for the RST to take effect")
    probe: bool = param(True, doc="forged: then send a request on the client socket")

    def action(self, rng: random.Random, forger: fg.Forger) -> RstBeforeAcceptAction:
        method = rng.choice(METHODS) if self.method == "random" else self.method
        return RstBeforeAcceptAction(
            method, pk.draw_isn(rng), self.observe_ms / 1000, self.probe, forger=forger
        )
