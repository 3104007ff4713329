"""forged_fin: a forged FIN half-closes the server's side while the real client stays open.

After ``requests_before`` answered requests and ``idle_ms`` of quiet, a FIN|ACK that looks as if
the client sent it is forged at the server's exact ``rcv_nxt`` (numbers read from the client
socket with TCP_REPAIR; raw socket on ``lo``: needs root and scapy).  The server's kernel takes
it: the server's ``recv`` returns 0 and epoll reports EPOLLIN|EPOLLRDHUP, for a client that
never closed anything.  A server that then closes (as it should, once it has nothing left to
answer) sends its FIN, which the real client's kernel drops: it acknowledges a byte (the
forged FIN) the client never sent (RFC 793 "ack of unsent data").  So the client goes on
believing the connection is open, and its next request meets a RST.

``variant``: ``single`` (one FIN) or ``duplicate`` (the same FIN twice, ``duplicate_gap_ms``
apart: the second is a retransmission of a consumed FIN, which the kernel only ACKs again; a
server must not see a second EOF event as a new connection event); ``random`` draws one.

Counts: ``fin_forged`` (segments), ``fin_effective`` (the server's socket took the FIN:
CLOSE_WAIT, or LAST_ACK once closed), ``server_closed`` (the server closed its end within
``observe_ms``), ``client_still_open`` / ``client_eof`` / ``client_reset`` (what the real client
saw meanwhile), ``probe_reset`` / ``probe_answered`` (one more request afterwards).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults import _forging as fg
from afterclose.faults import _packets as pk
from afterclose.faults.base import keepalive_hint, param
from afterclose.harness.client.conn import Conn

VARIANTS = ("single", "duplicate")

# The window a forged FIN advertises (scaled by the shift the handshake negotiated).  Not 0:
# a zero window would stop the server's kernel from sending its own FIN when it closes.
FIN_WINDOW = 65535
# States of the server's socket once its owner closed it after the FIN (None: already gone).
_CLOSED = frozenset({"LAST_ACK", "CLOSING", "TIME_WAIT", None})


@dataclass(frozen=True)
class ForgedFinAction(pk.ForgingAction):
    variant: str
    requests_before: int
    idle_s: float
    gap_s: float
    observe_s: float
    probe: bool

    def describe(self) -> str:
        return f"forged fin {self.variant} after {self.requests_before} exchanges"

    async def perform(self, conn: Conn) -> None:
        forger = self.forger
        opened = await pk.connect_keepalive(conn, self.requests_before)
        if opened is None:
            return
        tup, sock = opened
        await conn.pause(self.idle_s)
        fg.flush_ack(sock)
        seqs = fg.read_seqs(sock)
        # seq = the server's rcv_nxt: the FIN is the next thing in the stream.  ack = what the
        # server sent so far (the client read every answer): an ACK beyond the server's
        # snd_nxt would make its kernel drop the segment.
        raw = forger.build(tup, "FA", seqs.snd_nxt, seqs.rcv_nxt, window=FIN_WINDOW)
        forger.fire(raw)
        conn.report.count(pk.FIN_FORGED)
        if self.variant == "duplicate":
            await conn.pause(self.gap_s)
            forger.fire(raw)
            conn.report.count(pk.FIN_FORGED)
        state = await fg.wait_server_state(tup, fg.fin_took, self.observe_s)
        if fg.fin_took(state):
            conn.report.count("fin_effective")
            state = await fg.wait_server_state(tup, lambda s: s in _CLOSED, self.observe_s)
            if state in _CLOSED:
                conn.report.count("server_closed")
        else:
            conn.report.count("fin_ignored")
        # The server's FIN (if it closed) has reached the client's kernel by now, and was
        # dropped there: nothing to read, no EOF.
        await pk.watch_quiet(conn, 0.0, "client")
        if self.probe:
            await pk.late_probe(conn, self.observe_s)


@dataclass(frozen=True)
class ForgedFin(pk.PacketFault[ForgedFinAction]):
    """A forged FIN|ACK makes the server read EOF on a connection its client never closed."""

    name: ClassVar[str] = "forged_fin"
    applied_when: ClassVar[tuple[str, ...]] = (pk.FIN_FORGED,)
    unapplied_hint: ClassVar[str] = keepalive_hint("forged FIN")

    connections: int = param(10, lo=1, hi=10_000, doc="connections, one forged close each")
    concurrency: int = pk.concurrency_param()
    variant: str = param(
        "random", choices=(*VARIANTS, "random"), doc="one FIN, or the same FIN twice"
    )
    requests_before: int = param(1, lo=0, hi=100, doc="answered requests before the FIN")
    idle_ms: float = param(20.0, lo=0, hi=10_000, doc="idle time before the FIN")
    duplicate_gap_ms: float = param(1.0, lo=0, hi=1_000, doc="between the two FINs (duplicate)")
    observe_ms: float = param(500.0, lo=1, hi=10_000, doc="wait for the server to react")
    probe: bool = pk.probe_param()

    def action(self, rng: random.Random, forger: fg.Forger) -> ForgedFinAction:
        return ForgedFinAction(
            rng.choice(VARIANTS) if self.variant == "random" else self.variant,
            self.requests_before,
            self.idle_ms / 1000,
            self.duplicate_gap_ms / 1000,
            self.observe_ms / 1000,
            self.probe,
            forger=forger,
        )
