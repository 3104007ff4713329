"""Shared machinery of the packet faults: exact sequence numbers, forged segments, checks.

The packet faults (``forged_rst``, ``forged_fin``, ``rst_before_accept``, ``rst_mid_response``)
forge TCP segments that look as if the client had sent them, the way a middlebox or an
off-path attacker would, while the real client socket stays open and knows nothing.  Doing
that needs three things, all here:

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

import abc
import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from afterclose.faults.base import (
    Conn,
    DeadlineReached,
    Endpoint,
    Fault,
    FaultReport,
    Target,
    drive,
)
from afterclose.harness import httpclient
from afterclose.harness.errors import ScenarioError
from afterclose.harness.procfs import TCP_STATES

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

# Counts every packet fault reports about the forged segments and what the client saw.
RST_FORGED = "rst_forged"
FIN_FORGED = "fin_forged"


# --------------------------------------------------------------------------- availability


def unavailable_reason() -> str | None:
    """Why packet faults cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return (
            "packet faults need root: raw sockets (CAP_NET_RAW) and TCP_REPAIR (CAP_NET_ADMIN); "
            "run as root"
        )
    if importlib_util.find_spec("scapy") is None:
        return "packet faults need scapy: pip install scapy (or pip install 'afterclose[packets]')"
    return None


def require_support(fault: str) -> None:
    """ScenarioError naming what is missing, unless this process can forge packets."""
    reason = unavailable_reason()
    if reason is not None:
        raise ScenarioError(
            reason,
            where=f"fault {fault}",
            hint="these faults forge TCP segments on the loopback interface; "
            "the other faults need neither",
        )


def loopback_ipv4(fault: str, endpoint: Endpoint) -> str:
    """The endpoint's address if it is IPv4 loopback; ScenarioError otherwise.

    Forged segments only ever go to 127.0.0.0/8 on ``lo``: the target must listen there.
    """
    target = Target.resolve(fault, endpoint)
    host = str(target.sockaddr[0])
    if target.family != socket.AF_INET or not ipaddress.ip_address(host).is_loopback:
        raise ScenarioError(
            f"packet faults forge segments on the IPv4 loopback interface only; "
            f"the target listens on {host}",
            where=f"fault {fault}",
            hint="run the target with host 127.0.0.1 and the process runner",
        )
    return host


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


# <linux/sock_diag.h>, <linux/inet_diag.h>
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
_NLMSGHDR = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src[4], dst[4] (network order)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2] (host order)
_DIAG_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_NO_COOKIE = 0xFFFFFFFF
_TCP_LISTEN = 10
_diag_seq = iter(range(1, 1 << 62))


def _diag_state(tup: FourTuple) -> str | None:
    """The server socket's state by an exact sock_diag lookup (a few microseconds, however
    many sockets the host has; /proc/net/tcp lists them all and can take 100s of ms).
    """
    sockid = _SOCKID.pack(
        tup.server_port,
        tup.client_port,
        socket.inet_aton(tup.server_ip) + bytes(12),
        socket.inet_aton(tup.client_ip) + bytes(12),
    ) + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
    body = _DIAG_REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    seq = next(_diag_seq) & 0xFFFFFFFF
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(msg + body, (0, 0))
        while True:
            data = nl.recv(8192)
            _, kind, _, got_seq, _ = _NLMSGHDR.unpack_from(data)
            if got_seq == seq:
                break
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
        if code == -errno.ENOENT:
            return None
        raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
    _, state, _, _ = _DIAG_MSG_HEAD.unpack_from(data, _NLMSGHDR.size)
    _, dport, _, _ = _SOCKID.unpack_from(data, _NLMSGHDR.size + _DIAG_MSG_HEAD.size)
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


def wait_server_state(
    tup: FourTuple, done: Callable[[str | None], bool], timeout_s: float
) -> str | None:
    """Poll :func:`server_state` until ``done(state)`` or ``timeout_s``; the last state seen."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while True:
        state = server_state(tup)
        if done(state) or time.monotonic() >= deadline:
            return state
        time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, 0.01)


def reset_took(state: str | None) -> bool:
    """The server's socket left the tables: what an accepted RST does."""
    return state is None


# States of a server socket that has taken the peer's FIN (LAST_ACK: and closed since).
FIN_TAKEN = frozenset({"CLOSE_WAIT", "LAST_ACK", "CLOSING", "TIME_WAIT"})


def fin_took(state: str | None) -> bool:
    return state in FIN_TAKEN


def verify_reset(conn: Conn, tup: FourTuple, timeout_s: float) -> bool:
    """Whether the server's socket of ``tup`` leaves the kernel's tables within
    ``timeout_s`` (what an accepted RST does); counts ``rst_effective`` if it does."""
    if reset_took(wait_server_state(tup, reset_took, timeout_s)):
        conn.report.count("rst_effective")
        return True
    return False


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


# --------------------------------------------------------------------------- client helpers


@contextlib.contextmanager
def realtime() -> Iterator[bool]:
    """Run the calling thread SCHED_FIFO (lowest real-time priority) inside the block; yields
    whether that worked (it needs root; without it the block just runs normally).

    A connect() on loopback wakes the server's thread, and a woken thread often preempts its
    waker on the way out of the syscall: then the server accepts before our next line runs
    (measured on a loaded 2-CPU VM: 6-14 of 50 RSTs beat accept() as a normal thread, 19-50 of
    50 as a real-time one, which no normal thread preempts).  Keep the block to a few syscalls.
    """
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, policy, param)


def connect(
    conn: Conn,
    *,
    rcvbuf_bytes: int = 0,
    mss_bytes: int = 0,
    isn: int | None = None,
    before_connect: Callable[[socket.socket], None] | None = None,
    on_connected: Callable[[socket.socket], None] | None = None,
    realtime_hook: bool = False,
) -> FourTuple | None:
    """Like :meth:`Conn.connect`, with socket options that must be set before the handshake.

    ``rcvbuf_bytes``: a small receive buffer (the kernel doubles it and clamps it to >= 2304)
    gives a small advertised window, so a large response backs up into the server.
    ``mss_bytes``: the MSS the SYN advertises (TCP_MAXSEG); the server's kernel sizes its send
    buffer from MSS x congestion window, so a small MSS keeps that buffer small.  ``isn``:
    the initial sequence number (:func:`set_isn`).  ``before_connect(sock)`` runs last before
    ``connect()``, ``on_connected(sock)`` first after it returns, both inside :func:`realtime`
    with ``realtime_hook``.  With ``isn`` or a hook the socket is bound first, so its port (the
    4-tuple) is known before the handshake.  Returns the 4-tuple, or None (failure counted like
    Conn.connect).
    """
    now = time.monotonic()
    if now >= conn.deadline:
        raise DeadlineReached
    timeout = max(min(conn.deadline, now + conn.endpoint.io_timeout_s) - now, 0.001)
    sock = socket.socket(conn.target.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        if mss_bytes:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss_bytes)
        if isn is not None or before_connect is not None or on_connected is not None:
            # Bound first, so the 4-tuple is known before the handshake.
            sock.bind((conn.target.sockaddr[0], 0))
        if isn is not None:
            set_isn(sock, isn)
        if before_connect is not None:
            before_connect(sock)
        if on_connected is not None:
            tup = FourTuple.of(sock, conn.target.sockaddr)
        sock.settimeout(timeout)
        # On loopback the whole handshake typically runs inside this call (the softirqs run on
        # the way out of the SYN's transmission): when it returns, the server's kernel has
        # queued the new connection on the listener and is waking the server up.
        with realtime() if realtime_hook else contextlib.nullcontext(False):
            sock.connect(conn.target.sockaddr)
            if on_connected is not None:
                on_connected(sock)  # first: before anything else costs time
        if on_connected is None:
            tup = FourTuple.of(sock)
    except TimeoutError:
        sock.close()
        if time.monotonic() >= conn.deadline - 0.002:
            raise DeadlineReached from None
        conn.report.count("errors:timeout_connect")
        return None
    except OSError as exc:
        sock.close()
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()
        conn.report.count(f"errors:connect_{name}")
        return None
    except BaseException:
        sock.close()
        raise
    conn.sock = sock
    conn.reader = httpclient.ResponseReader(sock)
    conn.report.count("connections")
    return tup


def connect_keepalive(conn: Conn, exchanges: int) -> tuple[FourTuple, socket.socket] | None:
    """:func:`connect`, then ``exchanges`` request/response round trips on the connection: its
    4-tuple and the client socket, or None on any failure (counted)."""
    tup = connect(conn)
    if tup is None:
        return None
    for _ in range(exchanges):
        if not conn.send_requests(1) or conn.read_response() is None:
            return None
    assert conn.sock is not None
    return tup, conn.sock


# Client-side outcomes of an aftermath, counted as "<prefix>_<outcome>".
_GONE_KEYS = ("reset_by_peer", "closed_by_peer", "closed_without_answer")


@contextlib.contextmanager
def _scratch(conn: Conn) -> Iterator[FaultReport]:
    """Run Conn calls against a scratch report: the fault killed this connection on purpose,
    so the resets, timeouts and unanswered requests that follow are outcomes (the caller counts
    them under its own names), not server failures.  Everything else (requests, responses,
    statuses, observations) is merged back.
    """
    real = conn.report
    scratch = FaultReport(real.fault)
    conn.report = scratch
    try:
        yield scratch
    finally:
        conn.report = real
        for key, n in scratch.counts.items():
            if key not in _GONE_KEYS and not key.startswith("errors:timeout"):
                real.count(key, n)
        for obs in scratch.observations:
            real.observe(obs)


def _outcome(scratch: FaultReport, answered: bool) -> str:
    if scratch.counts.get("reset_by_peer"):
        return "reset"
    if scratch.counts.get("closed_by_peer"):
        return "closed"
    if answered:
        return "answered"
    if any(k.startswith("errors:timeout") for k in scratch.counts):
        return "timeout"
    return "error"


def watch_quiet(conn: Conn, wait_s: float, prefix: str) -> str:
    """Watch the client socket for ``wait_s`` with no request due: counts and returns
    ``<prefix>_still_open`` (nothing arrived: the client thinks all is well), ``_eof`` or
    ``_reset``.  Bytes that arrive are cross-talk, as in :meth:`Conn.check_quiet`.
    """
    with _scratch(conn) as scratch:
        alive = conn.check_quiet(wait_s)
    if alive:
        outcome = "still_open"
    elif scratch.counts.get("reset_by_peer"):
        outcome = "reset"
    else:
        outcome = "eof"
    conn.report.count(f"{prefix}_{outcome}")
    return outcome


def probe(conn: Conn, prefix: str = "probe") -> str:
    """One more request on a connection the client still believes open; counts and returns
    ``<prefix>_reset`` (the server's kernel no longer knows the connection and answered RST),
    ``_answered`` (the connection survived), ``_closed``, ``_timeout`` or ``_error``.
    """
    if conn.sock is None or conn.gone:
        conn.report.count(f"{prefix}_skipped")
        return "skipped"
    with _scratch(conn) as scratch:
        answered = conn.send_requests(1) and conn.read_response() is not None
    outcome = _outcome(scratch, answered)
    conn.report.count(f"{prefix}_{outcome}")
    return outcome


def drain_responses(conn: Conn, prefix: str) -> int:
    """Read the answers the server sent before it died, checked like any others (bounded by
    the connection's io timeout; see :func:`short_io`).  Counts ``<prefix>_responses`` and
    how the reading ended: ``<prefix>_reset`` / ``_closed`` / ``_timeout``; forgets the
    requests still unanswered.  Returns the number of answers read.
    """
    n = 0
    with _scratch(conn) as scratch:
        while conn.awaiting and conn.read_response() is not None:
            n += 1
    conn.awaiting.clear()
    conn.report.count(f"{prefix}_responses", n)
    if scratch.counts.get("reset_by_peer"):
        conn.report.count(f"{prefix}_reset")
    elif scratch.counts.get("closed_by_peer"):
        conn.report.count(f"{prefix}_closed")
    elif any(k.startswith("errors:timeout") for k in scratch.counts):
        conn.report.count(f"{prefix}_timeout")
    return n


def pause(conn: Conn, seconds: float) -> None:
    """Sleep ``seconds``, but not past the run's deadline (then DeadlineReached)."""
    left = conn.deadline - time.monotonic()
    if seconds >= left:
        time.sleep(max(left, 0.0))
        raise DeadlineReached
    if seconds > 0:
        time.sleep(seconds)


@contextlib.contextmanager
def short_io(conn: Conn, seconds: float) -> Iterator[None]:
    """Bound each of the connection's blocking calls by ``seconds`` inside the block (an
    answer that may never come, because the server is gone, is waited for briefly)."""
    real = conn.endpoint
    conn.endpoint = dataclasses.replace(real, io_timeout_s=max(seconds, 0.001))
    try:
        yield
    finally:
        conn.endpoint = real


def late_probe(conn: Conn, observe_s: float) -> str:
    """:func:`probe` once the fault is done, each blocking call bounded by ``observe_s`` but
    no less than half a second."""
    with short_io(conn, max(observe_s, 0.5)):
        return probe(conn)


def send_then_fire(conn: Conn, path: str, request: bytes, forger: Forger, raw: bytes) -> bool:
    """Send one whole request, then fire ``raw`` with nothing in between (a few microseconds,
    where :meth:`Conn.send` and its bookkeeping would take tens): the forged segment lands
    right behind the request, before a server on another CPU has finished waking up for it.
    False if the request could not be sent (counted like Conn.send; nothing fired).
    """
    assert conn.sock is not None, "connect() first"
    now = time.monotonic()
    if now >= conn.deadline:
        raise DeadlineReached
    conn.sock.settimeout(max(min(conn.deadline, now + conn.endpoint.io_timeout_s) - now, 0.001))
    try:
        conn.sock.sendall(request)
        forger.fire(raw)
    except OSError:
        # Sending it again through Conn gives the usual accounting of the failure.
        return conn.send(request, [path])
    conn.sent_any = True
    conn.awaiting.append(path)
    conn.report.count("requests")
    return True


def rst_segment(forger: Forger, tup: FourTuple, seqs: Seqs, *, extra: int = 0) -> bytes:
    """A RST|ACK at the server's rcv_nxt (+ ``extra``), as a middlebox would send it."""
    return forger.build(tup, "RA", seq_add(seqs.snd_nxt, extra), seqs.rcv_nxt)


def forge_rst(
    conn: Conn,
    forger: Forger,
    tup: FourTuple,
    *,
    prebuilt: bytes | None = None,
    fired: bool = False,
    seq_offset: int = 0,
    verify_s: float = 0.05,
    retries: int = 2,
) -> bool:
    """Send a forged RST into the server's side of ``tup`` and check that it took.

    ``prebuilt`` (from :func:`rst_segment`, built before a trigger) is fired as is (or was
    already, with ``fired``: see :func:`send_then_fire`); else the sequence numbers are read
    now.  With ``seq_offset`` != 0 the RST is deliberately off the
    server's rcv_nxt: Linux must answer it with a challenge ACK and keep the connection
    (RFC 5961), counted as ``rst_ignored``.  An exact RST that did not take (the client sent
    more between reading the numbers and firing) is rebuilt from fresh numbers and sent again,
    up to ``retries`` times (``rst_retried``).  Counts ``rst_forged`` (segments sent) and
    ``rst_effective`` (the server's socket left the kernel's tables).
    """
    assert conn.sock is not None, "connect() first"
    raw = prebuilt
    for attempt in range(retries + 1):
        if raw is None:
            flush_ack(conn.sock)
            raw = rst_segment(forger, tup, read_seqs(conn.sock), extra=seq_offset)
        if not (fired and attempt == 0):
            forger.fire(raw)
        conn.report.count(RST_FORGED)
        if attempt:
            conn.report.count("rst_retried")
        if verify_reset(conn, tup, verify_s):
            return True
        if seq_offset:
            break
        raw = None
    conn.report.count("rst_ignored")
    return False


# --------------------------------------------------------------------------- running


class PacketAction(Protocol):
    """A packet fault's plan entry: an :class:`~afterclose.faults.base.Action` that forges
    segments with the run's :class:`Forger` (one per plan, opened and closed by
    :func:`run_packet_fault`)."""

    @property
    def forger(self) -> Forger: ...

    def describe(self) -> str: ...

    def needs_forger(self) -> bool: ...

    def perform(self, conn: Conn) -> None: ...


def run_packet_fault(
    fault: str,
    endpoint: Endpoint,
    actions: Sequence[PacketAction],
    *,
    concurrency: int,
    deadline: float,
) -> FaultReport:
    """Check root/scapy/loopback, then :func:`drive` the actions; their Forger is open
    meanwhile (only if some action forges: ``linger`` actions need no root)."""
    forging = any(a.needs_forger() for a in actions)
    if forging:
        require_support(fault)
    loopback_ipv4(fault, endpoint)
    forgers = list({id(a.forger): a.forger for a in actions}.values())
    try:
        if forging:
            for forger in forgers:
                forger.open()  # before the first connection's clock starts: scapy's import
        return drive(fault, endpoint, actions, concurrency=concurrency, deadline=deadline)
    finally:
        for forger in forgers:
            forger.close()


@dataclass(frozen=True)
class ForgingAction:
    """Base of a packet fault's actions: the run's :class:`Forger` (keyword-only, after the
    subclass's own fields), and :meth:`needs_forger`."""

    forger: Forger = field(default_factory=Forger, compare=False, repr=False, kw_only=True)

    def needs_forger(self) -> bool:
        return True


ActionT = TypeVar("ActionT", bound=PacketAction)


class PacketFault(Fault, Generic[ActionT]):
    """Base of the packet faults: a plan of one :meth:`action` per connection, all sharing one
    :class:`Forger`, run by :func:`run_packet_fault`.  Subclasses declare the ``connections``
    and ``concurrency`` parameters (with their own defaults and docs)."""

    connections: int
    concurrency: int

    @abc.abstractmethod
    def action(self, rng: random.Random, forger: Forger) -> ActionT:
        """One connection's action, drawn from ``rng`` alone."""

    def plan(self, rng: random.Random) -> list[ActionT]:
        forger = Forger()  # shared by the run; opens its raw socket only when used
        return [self.action(rng, forger) for _ in range(self.connections)]

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        return run_packet_fault(
            self.name,
            endpoint,
            self.plan(rng),
            concurrency=self.concurrency,
            deadline=deadline,
        )


def draw_isn(rng: random.Random) -> int:
    """A random non-zero initial sequence number (0 would mean "let the kernel choose")."""
    return rng.randrange(1, _SEQ_MOD)


# --------------------------------------------------------------------------- capture


@dataclass(frozen=True)
class Segment:
    """One captured TCP segment (duplicates on ``lo`` removed)."""

    src_port: int
    dst_port: int
    flags: str
    seq: int
    ack: int
    payload_len: int
    time: float  # when the kernel saw it, wall clock (time.time())


class Capture:
    """Sniff TCP segments to/from ``port`` on ``lo`` while in the ``with`` block (scapy).

    A capture filter needs libpcap: without it scapy's sniffer starts fine and silently sees
    nothing, so the filter is compiled first and a failure raises.  Every segment is seen twice
    on ``lo`` (once leaving, once arriving), with checksums left partial: the copies are equal
    and consecutive, and :attr:`segments` keeps one.
    """

    def __init__(self, port: int, *, start_timeout_s: float = 5.0) -> None:
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._sniffer: Any = None
        self._raw: list[Any] = []

    def __enter__(self) -> Capture:
        require_support("capture")
        # The layers first: they register the link type of lo (ARPHRD_LOOPBACK, read as
        # Ethernet, in scapy.layers.l2 which inet imports); without them every captured frame
        # decodes as raw bytes.
        import scapy.layers.inet  # noqa: F401
        from scapy.arch.common import compile_filter
        from scapy.sendrecv import AsyncSniffer

        flt = f"tcp port {self.port}"
        try:
            compile_filter(flt, iface=LOOPBACK_IFACE)
        except Exception as exc:
            raise ScenarioError(
                f"cannot compile the capture filter {flt!r}: {exc}",
                where="packet capture",
                hint="sniffing with a filter needs libpcap (apt-get install libpcap0.8)",
            ) from None
        started = threading.Event()
        self._sniffer = AsyncSniffer(
            iface=LOOPBACK_IFACE,
            filter=flt,
            store=True,
            started_callback=started.set,
        )
        self._sniffer.start()
        if not started.wait(self.start_timeout_s):
            self._sniffer.stop(join=False)
            raise ScenarioError("the packet capture did not start", where="packet capture")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sniffer is not None:
            time.sleep(0.05)  # let the capture thread catch up with the last segments
            with contextlib.suppress(Exception):
                self._raw = list(self._sniffer.stop() or [])
            self._sniffer = None

    @property
    def segments(self) -> list[Segment]:
        from scapy.layers.inet import TCP

        out: list[Segment] = []
        previous = b""
        for pkt in self._raw:
            raw = bytes(pkt)
            if raw == previous or TCP not in pkt:
                previous = raw
                continue
            previous = raw
            tcp = pkt[TCP]
            out.append(
                Segment(
                    int(tcp.sport),
                    int(tcp.dport),
                    str(tcp.flags),
                    int(tcp.seq),
                    int(tcp.ack),
                    len(bytes(tcp.payload)),
                    float(pkt.time),
                )
            )
        return out
