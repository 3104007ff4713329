"""Forging TCP segments on loopback: exact sequence numbers, the raw socket, the server's view.

**Exact sequence numbers.**  Linux accepts a RST only if its ``seq`` is exactly the receiver's
``rcv_nxt`` (RFC 5961 3.2): anywhere else in the window it answers with a *challenge ACK* and
keeps the connection.  A FIN must also sit at ``rcv_nxt`` to be processed in order, and its
ACK must not acknowledge data the server never sent.  We read the numbers from the client's
own socket with ``TCP_REPAIR`` (the checkpoint/restore interface, needs CAP_NET_ADMIN): with
the socket briefly in repair mode, ``TCP_QUEUE_SEQ`` returns ``rcv_nxt`` (receive queue) and
``write_seq`` (send queue, which counts bytes written but not yet sent); ``SIOCOUTQNSD`` gives
those unsent bytes, so ``snd_nxt = write_seq - unsent``.  On loopback every byte the client
sent is in the server's receive queue as soon as ``send()`` returns, so the client's
``snd_nxt`` *is* the server's ``rcv_nxt``.  This is exact, costs ~20-30 us and needs no
capture.  Before reading, :func:`flush_ack` sends the ACK the client's kernel may still owe
(a delayed ACK leaves 40 ms after an answer): arriving after a forged RST it would draw a RST
back, and the client would learn of the reset before the scenario meant it to.
Sniffing the handshake instead (the classic way) needs libpcap for the filter, sees every
segment twice on ``lo``, and races with the capture thread: the numbers are only known once
the sniffer has caught up.  :class:`Capture` is still here, to *check* what went over the wire.

``TCP_REPAIR`` also lets us choose a connection's initial sequence number before a normal
``connect()`` (:func:`set_isn`): ``tcp_v4_connect`` keeps a non-zero ``write_seq``.  Knowing the
ISN in advance, a RST can be built before the handshake and fired microseconds after it.

**Sending.**  Segments go out through our own ``AF_INET/SOCK_RAW/IPPROTO_RAW`` socket bound to
``lo`` (``SO_BINDTODEVICE``), and only to 127.0.0.0/8.  A packet (``AF_PACKET``) socket on ``lo``
has no effect, and scapy's ``conf.L3socket`` is such a socket on Linux; scapy's
``L3RawSocket`` would work but also opens a capture socket that buffers every packet on the
host.  scapy builds the segments (checksums included, ~1 ms each, 10 ms at p95 on a loaded
VM), and is imported lazily: importing it costs one to two seconds.  Building is kept off the
critical path: :meth:`Forger.build` returns bytes that :meth:`Forger.fire` sends in ~15 us.

**Checking.**  Whether a forged segment took effect is asked of the kernel with an exact
sock_diag lookup of the server's 4-tuple (~30 us; ``/proc/net/tcp`` lists every socket of the
host and took 80-300 ms with 26k of them): after an accepted RST the server's socket is
unhashed and gone (even while it still waits in the accept queue); after an accepted FIN it is
in CLOSE_WAIT, or LAST_ACK once the server closed it.

Known quirk of a forged FIN: the server's kernel ACKs it, and later its own FIN, with
``ack = client's snd_nxt + 1``: an acknowledgement of data the client never sent, which the
client's kernel drops (RFC 793/5961).  So the real client never learns that the server
closed; its next segment meets a RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afterclose.harness.procfs import TCP_STATES
from afterclose.harness.sockdiag import (
    DIAG_MSG_HEAD,
    DIAG_REQ,
    NETLINK_SOCK_DIAG,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGHDR,
    NO_COOKIE,
    SOCK_DIAG_BY_FAMILY,
    SOCKID,
    SOCKID_TAIL,
)

# <linux/tcp.h>
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
TCP_REPAIR_ON = 1
# Leave repair mode without the window probe TCP_REPAIR_OFF (0) sends: that probe is an ACK
# with seq = snd_una - 1, harmless but a segment the scenario did not ask for.
TCP_REPAIR_OFF_NO_WP = -1
# <linux/sockios.h>: bytes written but not yet sent (SIOCOUTQ would also count unacked ones).
SIOCOUTQNSD = 0x894B

LOOPBACK_IFACE = "lo"
_SEQ_MOD = 1 << 32


# --------------------------------------------------------------------------- sequence numbers


@dataclass(frozen=True)
class FourTuple:
    """A connection seen from the client: segments we forge go client -> server."""

    client_ip: str
    client_port: int
    server_ip: str
    server_port: int

    @classmethod
    def of(cls, sock: socket.socket, peer: Sequence[Any] | None = None) -> FourTuple:
        """The 4-tuple of a connected ``sock``, or of a bound one that will connect to
        ``peer``."""
        cip, cport = sock.getsockname()[:2]
        sip, sport = (sock.getpeername() if peer is None else peer)[:2]
        return cls(str(cip), int(cport), str(sip), int(sport))

    def __str__(self) -> str:
        return f"{self.client_ip}:{self.client_port} -> {self.server_ip}:{self.server_port}"


@dataclass(frozen=True)
class Seqs:
    """The client socket's view: ``snd_nxt`` (= the server's rcv_nxt on loopback) and
    ``rcv_nxt`` (= the server's snd_nxt once its data arrived).  ``unsent``: bytes written by
    the application and not yet sent (``write_seq - snd_nxt``).
    """

    snd_nxt: int
    rcv_nxt: int
    unsent: int


def _unsent(sock: socket.socket) -> int:
    buf = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _queue_seq(sock: socket.socket, queue: int) -> int:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    return int(struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0])


@contextlib.contextmanager
def _repair_mode(sock: socket.socket) -> Iterator[None]:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        yield
    finally:
        # Never leave the send queue selected: in repair mode tcp_write_xmit() marks data of
        # the selected send queue as sent without transmitting it.  Then leave repair mode (a
        # repair-mode socket would vanish silently on close, no FIN or RST).
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)


def read_seqs(sock: socket.socket) -> Seqs:
    """The exact sequence numbers of a connected client socket, read with TCP_REPAIR."""
    for _ in range(5):
        unsent = _unsent(sock)
        with _repair_mode(sock):
            rcv_nxt = _queue_seq(sock, TCP_RECV_QUEUE)
            # The send queue stays selected for two syscalls only (see _repair_mode).
            write_seq = _queue_seq(sock, TCP_SEND_QUEUE)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        # An ACK arriving in between may have let the kernel send more: read until stable.
        if _unsent(sock) == unsent:
            return Seqs((write_seq - unsent) % _SEQ_MOD, rcv_nxt, unsent)
    return Seqs((write_seq - unsent) % _SEQ_MOD, rcv_nxt, unsent)


def flush_ack(sock: socket.socket) -> None:
    """Make the client's kernel send the ACK it may still owe (a delayed ACK waits up to
    40-200 ms): TCP_QUICKACK=1 sends a scheduled ACK at once.  Called before forging, so that
    no segment of the real client reaches the server after the forged one: after a forged RST
    that late ACK would meet a RST from the server's kernel, and the client would learn of the
    reset before the scenario lets it.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def set_isn(sock: socket.socket, isn: int) -> None:
    """Make the next ``connect()`` of this fresh socket use ``isn`` as its initial sequence
    number: TCP_QUEUE_SEQ on the send queue sets ``write_seq``, which ``tcp_v4_connect()``
    keeps when it is non-zero instead of drawing a secure random one.
    """
    if not 0 < isn < _SEQ_MOD:
        raise ValueError(f"isn must be in 1..2**32-1, got {isn}")
    with _repair_mode(sock):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("I", isn))


def seq_add(seq: int, n: int) -> int:
    return (seq + n) % _SEQ_MOD


# --------------------------------------------------------------------------- the server's view


_TCP_LISTEN = 10
_diag_seq = iter(range(1, 1 << 62))


def _diag_state(tup: FourTuple) -> str | None:
    """The server socket's state by an exact sock_diag lookup (a few microseconds, however
    many sockets the host has; /proc/net/tcp lists them all and can take 100s of ms).
    """
    sockid = SOCKID.pack(
        tup.server_port,
        tup.client_port,
        socket.inet_aton(tup.server_ip) + bytes(12),
        socket.inet_aton(tup.client_ip) + bytes(12),
    ) + SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    body = DIAG_REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    seq = next(_diag_seq) & 0xFFFFFFFF
    msg = NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(msg + body, (0, 0))
        while True:
            data = nl.recv(8192)
            _, kind, _, got_seq, _ = NLMSGHDR.unpack_from(data)
            if got_seq == seq:
                break
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, NLMSGHDR.size)
        if code == -errno.ENOENT:
            return None
        raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
    _, state, _, _ = DIAG_MSG_HEAD.unpack_from(data, NLMSGHDR.size)
    _, dport, _, _ = SOCKID.unpack_from(data, NLMSGHDR.size + DIAG_MSG_HEAD.size)
    # The exact lookup falls back to the listener when no connection matches.
    if state == _TCP_LISTEN or dport != tup.client_port:
        return None
    return TCP_STATES.get(state, str(state))


def _proc_addr(ip: str, port: int) -> str:
    # /proc/net/tcp prints the address as the 32-bit word in host (little-endian) order.
    (word,) = struct.unpack("<I", socket.inet_aton(ip))
    return f"{word:08X}:{port:04X}"


def _proc_state(tup: FourTuple, table: Path = Path("/proc/net/tcp")) -> str | None:
    local = _proc_addr(tup.server_ip, tup.server_port)
    remote = _proc_addr(tup.client_ip, tup.client_port)
    with table.open() as f:
        next(f, None)
        for line in f:
            fields = line.split(None, 4)
            if len(fields) >= 4 and fields[1] == local and fields[2] == remote:
                return TCP_STATES.get(int(fields[3], 16), fields[3])
    return None


def server_state(tup: FourTuple) -> str | None:
    """The TCP state of the server's end of ``tup`` (``ESTABLISHED``, ``CLOSE_WAIT``...), or
    None if the kernel has no such socket in its tables any more (reset, or fully closed).
    An accepted RST unhashes the socket at once, even one still waiting in the accept queue.
    """
    try:
        return _diag_state(tup)
    except OSError:
        # No sock_diag (inet_diag not built): the slow way.
        return _proc_state(tup)


async def wait_server_state(
    tup: FourTuple, done: Callable[[str | None], bool], timeout_s: float
) -> str | None:
    """Poll :func:`server_state` until ``done(state)`` or ``timeout_s``; the last state seen."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while True:
        state = server_state(tup)
        if done(state) or time.monotonic() >= deadline:
            return state
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, 0.01)


def reset_took(state: str | None) -> bool:
    """The server's socket left the tables: what an accepted RST does."""
    return state is None


# States of a server socket that has taken the peer's FIN (LAST_ACK: and closed since).
FIN_TAKEN = frozenset({"CLOSE_WAIT", "LAST_ACK", "CLOSING", "TIME_WAIT"})


def fin_took(state: str | None) -> bool:
    return state in FIN_TAKEN


# --------------------------------------------------------------------------- forging


def _flag_text(flags: str) -> str:
    allowed = set("FSRPAUEC")
    if not flags or set(flags) - allowed:
        raise ValueError(f"bad TCP flags {flags!r}")
    return flags


class Forger:
    """Builds client -> server segments with scapy and sends them through a raw IPv4 socket
    bound to ``lo``.  Thread-safe; one per fault run (a context manager).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._ip: Any = None
        self._tcp: Any = None
        # Totals, for benchmarks (not thread-exact).
        self.sent = 0
        self.build_s = 0.0
        self.fire_s = 0.0

    def open(self) -> Forger:
        with self._lock:
            if self._sock is None:
                # Lazily: importing scapy costs about a second.  Only the layers, not
                # scapy.all (several seconds more).
                from scapy.layers.inet import IP, TCP

                self._ip, self._tcp = IP, TCP
                sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
                try:
                    # IPPROTO_RAW implies IP_HDRINCL: we write the IP header ourselves.  Bound
                    # to lo, a segment can never leave the host whatever its destination.
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_BINDTODEVICE, LOOPBACK_IFACE.encode()
                    )
                    sock.settimeout(1.0)
                except BaseException:
                    sock.close()
                    raise
                self._sock = sock
        return self

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Forger:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(
        self,
        tup: FourTuple,
        flags: str,
        seq: int,
        ack: int = 0,
        *,
        window: int = 0,
    ) -> bytes:
        """The bytes of one client -> server segment (IPv4 + TCP, checksums filled in).

        No TCP options: without a timestamp option Linux skips the PAWS check (RFC 7323
        allows a RST without timestamps, and Linux accepts other segments without them too).
        """
        if self._ip is None:
            self.open()
        if not ipaddress.ip_address(tup.server_ip).is_loopback:
            raise ValueError(f"refusing to forge a segment to non-loopback {tup.server_ip}")
        started = time.perf_counter()
        pkt = self._ip(src=tup.client_ip, dst=tup.server_ip, ttl=64) / self._tcp(
            sport=tup.client_port,
            dport=tup.server_port,
            flags=_flag_text(flags),
            seq=seq % _SEQ_MOD,
            ack=ack % _SEQ_MOD,
            window=window,
        )
        raw = bytes(pkt)
        self.build_s += time.perf_counter() - started
        return raw

    def fire(self, raw: bytes) -> None:
        """Send bytes made by :meth:`build` (tens of microseconds)."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("Forger is closed")
        dst = socket.inet_ntoa(raw[16:20])
        if not dst.startswith("127."):
            raise ValueError(f"refusing to send a segment to non-loopback {dst}")
        started = time.perf_counter()
        sock.sendto(raw, (dst, 0))
        self.fire_s += time.perf_counter() - started
        self.sent += 1
