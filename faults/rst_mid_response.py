"""rst_mid_response: a forged RST hits the server while it is writing a large response.

The client makes the server's output back up, then forges a RST (raw socket on ``lo``, exact
sequence number read with TCP_REPAIR: needs root and scapy):

1. It connects with a small receive buffer (``client_rcvbuf_bytes``): the window it
   advertises is a few KiB, so whatever the server writes beyond that waits in the server's
   socket send buffer (which Linux sizes from the congestion window: MiBs on loopback).
2. It pipelines GETs with long paths (``path_bytes``: an echo-path target answers each with a
   body as long) without reading anything, until ``send()`` makes no progress for
   ``stall_ms``: the server's send buffer is full, so it stopped reading requests, its
   receive window closed, and our send buffer filled.  At that point the server holds a large
   response half written (typically waiting for EPOLLOUT).  ``max_pipeline_bytes`` bounds the
   requests sent if the server never stalls (counted as ``not_stalled``).
3. It reads up to ``drain_bytes`` (drawn in 0..drain_bytes per connection) of the answers, so
   the server is woken to write again, and fires the RST, built beforehand, right after:
   the RST meets a server that is waiting to write (EPOLLOUT|EPOLLERR|EPOLLHUP) or is inside
   ``send()`` (ECONNRESET / EPIPE).

Then it reads what the server had sent before the RST (answers are checked like any others)
until the RST from the server's kernel ends the connection.

The target's request-head limit bounds ``path_bytes`` (seed-fixed: 8 KiB, nginx: 8 KiB by
default); a longer request is answered 400 and closed, which stops the fault early.

Counts: ``requests`` (pipelined), ``server_stalled`` / ``not_stalled``, ``drained_bytes``,
``rst_forged``, ``rst_effective``, ``rst_retried``, ``rst_ignored``, ``after_rst_responses``,
``after_rst_reset``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import ClassVar

from afterclose.faults import _forging as fg
from afterclose.faults import _packets as pk
from afterclose.faults.base import param
from afterclose.harness.client.conn import Conn, DeadlineReached
from afterclose.harness.protocols.base import RECV_SIZE

# Requests joined into one send() buffer.
_BATCH = 16


@dataclass(frozen=True)
class RstMidResponseAction(pk.ForgingAction):
    path_bytes: int
    max_pipeline_bytes: int
    rcvbuf_bytes: int
    mss_bytes: int
    stall_s: float
    drain_bytes: int
    observe_s: float

    def describe(self) -> str:
        return f"rst mid-response path={self.path_bytes}B drain={self.drain_bytes}B"

    async def perform(self, conn: Conn) -> None:
        forger = self.forger
        tup = pk.connect(conn, rcvbuf_bytes=self.rcvbuf_bytes, mss_bytes=self.mss_bytes)
        if tup is None or not await conn.start_session():
            return
        stalled = await self._pipeline(conn)
        if stalled is None:
            return
        conn.report.count("server_stalled" if stalled else "not_stalled")
        assert conn.sock is not None
        raw = pk.rst_segment(forger, tup, fg.read_seqs(conn.sock))
        if self.drain_bytes and not await self._drain(conn):
            return
        await pk.forge_rst(conn, forger, tup, prebuilt=raw, verify_s=self.observe_s)
        with pk.short_io(conn, self.observe_s):
            await pk.drain_responses(conn, "after_rst")

    def _large_request(self, conn: Conn) -> tuple[str, bytes]:
        tag = conn.next_tag()
        host, port = conn.endpoint.host, conn.endpoint.port
        if conn.endpoint.large_path is not None:  # the manifest names a path with a big answer
            conn.unechoed.add(tag)
            return tag, conn.protocol.path_request(conn.endpoint.large_path, tag, host, port)
        return tag, conn.protocol.large_request(tag, self.path_bytes, host, port)

    async def _pipeline(self, conn: Conn) -> bool | None:
        """Send requests until send() stalls (True), the byte budget is spent (False), or the
        connection fails (None, counted)."""
        sock = conn.sock
        assert sock is not None
        sent_total = 0
        while sent_total < self.max_pipeline_bytes:
            reqs = [self._large_request(conn) for _ in range(_BATCH)]
            # Over TLS each request is its own records, so a request is whole once its last
            # ciphertext byte went out.
            wires = [r if conn.tls is None else conn.tls.encrypt(r) for _, r in reqs]
            buf = memoryview(b"".join(wires))
            ends = []
            end = 0
            for wire in wires:
                end += len(wire)
                ends.append(end)
            off = 0
            while off < len(buf):
                left = conn.deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineReached
                try:
                    off += sock.send(buf[off:])
                    continue
                except BlockingIOError:
                    pass
                except (ConnectionResetError, BrokenPipeError):
                    self._completed(conn, reqs, ends, off)
                    conn.report.count("errors:pipeline_reset")
                    return None
                if not await conn.writable(min(self.stall_s, left)):
                    if time.monotonic() >= conn.deadline:
                        raise DeadlineReached
                    self._completed(conn, reqs, ends, off)
                    return True
            self._completed(conn, reqs, ends, off)
            sent_total += len(buf)
        return False

    @staticmethod
    def _completed(conn: Conn, reqs: list[tuple[str, bytes]], ends: list[int], off: int) -> None:
        conn.sent([tag for (tag, _), end in zip(reqs, ends, strict=True) if end <= off])
        conn.sent_any = True

    async def _drain(self, conn: Conn) -> bool:
        """Read up to ``drain_bytes`` of the answers into the parser (checked later)."""
        got = 0
        stop = min(conn.deadline, time.monotonic() + self.observe_s)
        while got < self.drain_bytes:
            if stop - time.monotonic() <= 0:
                break
            try:
                data = await conn.recv(min(self.drain_bytes - got, RECV_SIZE), stop)
            except TimeoutError:
                break
            except ConnectionResetError:
                conn.report.count("errors:drain_reset")
                return False
            if not data:
                conn.report.count("errors:drain_eof")
                return False
            conn.parser.feed(data)
            got += len(data)
        conn.report.count("drained_bytes", got)
        return True


@dataclass(frozen=True)
class RstMidResponse(pk.PacketFault[RstMidResponseAction]):
    """A forged RST reaches the server while a large response is backed up in its buffers."""

    name: ClassVar[str] = "rst_mid_response"
    applied_when: ClassVar[tuple[str, ...]] = (pk.RST_FORGED, "rst_sent")
    unapplied_hint: ClassVar[str] = (
        "no answer was large enough to back up in the server's buffers; name a path with an "
        'answer of hundreds of KiB in the manifest (large_path = "/big"), or, for a server '
        "that echoes the path, give it a longer request-head limit"
    )

    connections: int = param(4, lo=1, hi=1_000, doc="connections, one RST each")
    concurrency: int = pk.concurrency_param()
    path_bytes: int = param(
        4000, lo=16, hi=65_536, doc="length of each request path (stay under the target's limit)"
    )
    max_pipeline_bytes: int = param(
        32 << 20, lo=1024, hi=1 << 30, doc="request bytes sent at most per connection"
    )
    client_rcvbuf_bytes: int = param(
        4096, lo=0, hi=1 << 24, doc="client SO_RCVBUF (0: the default); small backs data up"
    )
    client_mss_bytes: int = param(
        1024,
        lo=0,
        hi=65_535,
        doc="MSS the client advertises (0: the default); small keeps "
        "the server's send buffer small",
    )
    stall_ms: float = param(50.0, lo=1, hi=10_000, doc="no send progress this long = stalled")
    drain_bytes: int = param(
        65_536, lo=0, hi=1 << 24, doc="at most this many answer bytes read before the RST"
    )
    observe_ms: float = param(200.0, lo=1, hi=10_000, doc="wait for the RST to take effect")

    def action(self, rng: random.Random, forger: fg.Forger) -> RstMidResponseAction:
        return RstMidResponseAction(
            self.path_bytes,
            self.max_pipeline_bytes,
            self.client_rcvbuf_bytes,
            self.client_mss_bytes,
            self.stall_ms / 1000,
            rng.randint(0, self.drain_bytes),
            self.observe_ms / 1000,
            forger=forger,
        )
