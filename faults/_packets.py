"""What the packet faults share: availability checks, the client steps around a forged
segment (connect with pre-handshake options, probe, drain, forge-and-verify), and running a
plan of forging actions on the one client (:mod:`afterclose.harness.client`).

The packet faults (``forged_rst``, ``forged_fin``, ``rst_before_accept``, ``rst_mid_response``)
forge TCP segments that look as if the client had sent them, the way a middlebox or an
off-path attacker would, while the real client socket stays open and knows nothing
(:mod:`afterclose.faults._forging` explains how; :mod:`afterclose.faults._capture` checks the
wire).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import ipaddress
import os
import random
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import util as importlib_util
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from afterclose.faults._forging import (
    Forger,
    FourTuple,
    Seqs,
    flush_ack,
    read_seqs,
    reset_took,
    seq_add,
    set_isn,
    wait_server_state,
)
from afterclose.faults.base import Endpoint, Fault, FaultReport, param
from afterclose.harness.client import engine
from afterclose.harness.client.conn import Conn, Remote
from afterclose.harness.errors import ScenarioError

# Counts every packet fault reports about the forged segments and what the client saw.
RST_FORGED = "rst_forged"
FIN_FORGED = "fin_forged"
_SEQ_MOD = 1 << 32


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
    remote = Remote.resolve(fault, endpoint)
    host = str(remote.sockaddr[0])
    if remote.family != socket.AF_INET or not ipaddress.ip_address(host).is_loopback:
        raise ScenarioError(
            f"packet faults forge segments on the IPv4 loopback interface only; "
            f"the target listens on {host}",
            where=f"fault {fault}",
            hint="run the target with host 127.0.0.1 and the process runner",
        )
    return host


async def verify_reset(conn: Conn, tup: FourTuple, timeout_s: float) -> bool:
    """Whether the server's socket of ``tup`` leaves the kernel's tables within
    ``timeout_s`` (what an accepted RST does); counts ``rst_effective`` if it does."""
    if reset_took(await wait_server_state(tup, reset_took, timeout_s)):
        conn.report.count("rst_effective")
        return True
    return False


# --------------------------------------------------------------------------- client steps


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

    The connect() itself blocks (the loop waits for it): on loopback it is one syscall, and
    the hooks must run right before and after it with nothing in between.
    """
    # Forged segments end or confuse these connections on purpose: a request they leave
    # unanswered says nothing about the server (dropped-request).
    conn.disturb()
    timeout = max(conn.op_deadline() - time.monotonic(), 0.001)
    sock = conn.new_socket()
    remote = conn.remote
    try:
        if rcvbuf_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        if mss_bytes:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss_bytes)
        if isn is not None or before_connect is not None or on_connected is not None:
            # Bound first, so the 4-tuple is known before the handshake.
            sock.bind((remote.sockaddr[0], 0))
        if isn is not None:
            set_isn(sock, isn)
        if before_connect is not None:
            before_connect(sock)
        if on_connected is not None:
            tup = FourTuple.of(sock, remote.sockaddr)
        sock.settimeout(timeout)
        # On loopback the whole handshake typically runs inside this call (the softirqs run on
        # the way out of the SYN's transmission): when it returns, the server's kernel has
        # queued the new connection on the listener and is waking the server up.
        with realtime() if realtime_hook else contextlib.nullcontext(False):
            sock.connect(remote.sockaddr)
            if on_connected is not None:
                on_connected(sock)  # first: before anything else costs time
        if on_connected is None:
            tup = FourTuple.of(sock)
    except BaseException as exc:
        if not conn.connect_failed(sock, exc):
            raise
        return None
    if sock.fileno() < 0:  # on_connected closed it (an abort right after the handshake)
        conn.report.count("connections")
    else:
        conn.adopt(sock)
    return tup


async def connect_keepalive(conn: Conn, exchanges: int) -> tuple[FourTuple, socket.socket] | None:
    """:func:`connect`, then ``exchanges`` request/response round trips on the connection: its
    4-tuple and the client socket, or None on any failure (counted)."""
    tup = connect(conn)
    if tup is None or not await conn.start_session():
        return None
    for _ in range(exchanges):
        if not await conn.send_requests(1):
            return None
        reply = await conn.read_reply()
        if reply is None:
            return None
        if not reply.keep_alive:
            # The server is closing this connection already: a forged segment would hit
            # nothing it still serves.  Counted, so that the fault can say what was missing.
            conn.report.count("not_kept_alive")
            await conn.read_to_eof()
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
        for observation in scratch.observations:
            real.observe(observation)


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


async def watch_quiet(conn: Conn, wait_s: float, prefix: str) -> str:
    """Watch the client socket for ``wait_s`` with no request due: counts and returns
    ``<prefix>_still_open`` (nothing arrived: the client thinks all is well), ``_eof`` or
    ``_reset``.  Bytes that arrive are observed, as in :meth:`Conn.check_quiet`.
    """
    with _scratch(conn) as scratch:
        alive = await conn.check_quiet(wait_s)
    if alive:
        outcome = "still_open"
    elif scratch.counts.get("reset_by_peer"):
        outcome = "reset"
    else:
        outcome = "eof"
    conn.report.count(f"{prefix}_{outcome}")
    return outcome


async def probe(conn: Conn, prefix: str = "probe") -> str:
    """One more request on a connection the client still believes open; counts and returns
    ``<prefix>_reset`` (the server's kernel no longer knows the connection and answered RST),
    ``_answered`` (the connection survived), ``_closed``, ``_timeout`` or ``_error``.
    """
    if conn.sock is None or conn.gone:
        conn.report.count(f"{prefix}_skipped")
        return "skipped"
    with _scratch(conn) as scratch:
        answered = await conn.send_requests(1) and await conn.read_reply() is not None
    outcome = _outcome(scratch, answered)
    conn.report.count(f"{prefix}_{outcome}")
    return outcome


async def drain_responses(conn: Conn, prefix: str) -> int:
    """Read the answers the server sent before it died, checked like any others (bounded by
    the connection's io timeout; see :func:`short_io`).  Counts ``<prefix>_responses`` and
    how the reading ended: ``<prefix>_reset`` / ``_closed`` / ``_timeout``; forgets the
    requests still unanswered.  Returns the number of answers read.
    """
    n = 0
    with _scratch(conn) as scratch:
        while conn.awaiting and await conn.read_reply() is not None:
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


@contextlib.contextmanager
def short_io(conn: Conn, seconds: float) -> Iterator[None]:
    """Bound each of the connection's socket operations by ``seconds`` inside the block (an
    answer that may never come, because the server is gone, is waited for briefly)."""
    real = conn.endpoint
    conn.endpoint = dataclasses.replace(real, io_timeout_s=max(seconds, 0.001))
    try:
        yield
    finally:
        conn.endpoint = real


async def late_probe(conn: Conn, observe_s: float) -> str:
    """:func:`probe` once the fault is done, each socket operation bounded by ``observe_s``
    but no less than half a second."""
    with short_io(conn, max(observe_s, 0.5)):
        return await probe(conn)


async def send_then_fire(conn: Conn, tag: str, request: bytes, forger: Forger, raw: bytes) -> bool:
    """Send one whole request, then fire ``raw`` with nothing in between (a few microseconds,
    where :meth:`Conn.send` and its bookkeeping would take tens): the forged segment lands
    right behind the request, before a server on another CPU has finished waking up for it.
    False if the request could not be sent (counted like Conn.send; nothing fired).
    """
    sock = conn.sock
    assert sock is not None, "connect() first"
    try:
        sent = sock.send(request)
    except BlockingIOError:
        sent = 0
    except OSError:
        sent = -1
    if sent != len(request):
        # Not whole at once (or failed): Conn.send finishes it with the usual accounting.
        if not await conn.send(request[max(sent, 0) :], [tag]):
            return False
    else:
        conn.sent([tag])
    forger.fire(raw)
    return True


def rst_segment(forger: Forger, tup: FourTuple, seqs: Seqs, *, extra: int = 0) -> bytes:
    """A RST|ACK at the server's rcv_nxt (+ ``extra``), as a middlebox would send it."""
    return forger.build(tup, "RA", seq_add(seqs.snd_nxt, extra), seqs.rcv_nxt)


async def forge_rst(
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
        if await verify_reset(conn, tup, verify_s):
            return True
        if seq_offset:
            break
        raw = None
    conn.report.count("rst_ignored")
    return False


# --------------------------------------------------------------------------- running


class PacketAction(Protocol):
    """A packet fault's plan entry: an :class:`~afterclose.harness.client.plan.Action` that
    forges segments with the run's :class:`Forger` (one per plan, opened and closed by
    :func:`run_packet_fault`)."""

    @property
    def forger(self) -> Forger: ...

    def describe(self) -> str: ...

    def needs_forger(self) -> bool: ...

    async def perform(self, conn: Conn) -> None: ...


def run_packet_fault(
    fault: str,
    endpoint: Endpoint,
    actions: Sequence[PacketAction],
    *,
    concurrency: int,
    deadline: float,
) -> FaultReport:
    """Check root/scapy/loopback, then run the actions on the client; their Forger is open
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
        return engine.run_plan(fault, endpoint, actions, concurrency=concurrency, deadline=deadline)
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
    disturbs_connections: ClassVar[bool] = True

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


def concurrency_param() -> Any:
    """The ``concurrency`` parameter of the keep-alive packet faults."""
    return param(2, lo=1, hi=64, doc="connections open at once")


def probe_param() -> Any:
    """The ``probe`` parameter of the faults that forge on a live connection."""
    return param(True, doc="send one more request afterwards, to see what the client gets")


def draw_isn(rng: random.Random) -> int:
    """A random non-zero initial sequence number (0 would mean "let the kernel choose")."""
    return rng.randrange(1, _SEQ_MOD)
