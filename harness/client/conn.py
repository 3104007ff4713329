"""One client connection on an asyncio loop, and what it did and saw.

The connection owns its raw socket rather than a transport: the faults need ``shutdown(SHUT_WR)``
at an exact point, ``SO_LINGER {1, 0}`` then ``close()`` for a RST, and "what has the kernel
already queued?" reads, none of which a transport's buffering allows.  Every await runs under a
timeout bounded by the run's deadline and the endpoint's ``io_timeout_s``, so a run ends within
milliseconds of its deadline.

What the connection does and sees is tallied into a
:class:`~afterclose.faults.base.FaultReport`: counts (``connections``, ``requests``,
``responses``, ``reset_by_peer``...) and observations: bytes nobody asked for
(``UNSOLICITED_BYTES``) and answers carrying another request's tag (``FOREIGN_ANSWER``).  It
records facts; the rules decide what they mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from afterclose.harness.client.observations import (
    NOT_DUE,
    WAITING_CLOSE,
    dropped_observation,
    foreign_observation,
    garbage_observation,
    unsolicited_context,
    unsolicited_observation,
    who,
)
from afterclose.harness.client.tls_layer import TlsLayer
from afterclose.harness.errors import HarnessResourceError, ScenarioError
from afterclose.harness.protocols import base as proto
from afterclose.harness.protocols.http import HTTP, Http

if TYPE_CHECKING:
    from afterclose.faults.base import Endpoint, FaultReport

T = TypeVar("T")
UNREAD_RST_WAIT_S = 0.001
# How long a close notice (HTTP's 408) may precede the close it announces.
NOTICE_CLOSE_S = 1.0
_OUT_OF = {errno.EMFILE: "file descriptors", errno.ENFILE: "file descriptors (system-wide)"}


class DeadlineReached(Exception):
    """The run's deadline passed while a connection was in the middle of something."""


@dataclass(frozen=True)
class Remote:
    """An endpoint resolved once per run, the run's tags and the protocol it speaks."""

    fault: str
    endpoint: Endpoint
    family: socket.AddressFamily
    sockaddr: tuple[Any, ...]
    tags: proto.Tags
    protocol: proto.Protocol = HTTP

    @classmethod
    def resolve(cls, fault: str, endpoint: Endpoint, run_id: str | None = None) -> Remote:
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ScenarioError(
                f"cannot resolve {endpoint.host!r}: {exc}", where=f"fault {fault}"
            ) from None
        family, _, _, _, sockaddr = infos[0]
        protocol = endpoint.protocol or HTTP
        if isinstance(protocol, Http):
            protocol = protocol.configured(endpoint.request_headers)
        return cls(fault, endpoint, family, tuple(sockaddr), proto.Tags(run_id), protocol)


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()


def harness_error(exc: OSError, what: str) -> HarnessResourceError | None:
    """The harness's own shortage behind ``exc`` (EMFILE...), as an error a user can act on."""
    resource = _OUT_OF.get(exc.errno or 0)
    if resource is None and exc.errno not in (errno.ENOBUFS, errno.ENOMEM):
        return None
    return HarnessResourceError(
        f"the harness ran out of {resource or 'memory'} while {what}: {exc}",
        where="afterclose client",
        hint="raise the open-file limit of the process running afterclose (ulimit -n), or "
        "lower the fault's concurrency",
    )


def set_rst_on_close(sock: socket.socket) -> None:
    """Make the next ``close()`` abort the connection with a RST instead of a FIN.

    With SO_LINGER {on, 0 s} the kernel does not linger to deliver queued data: close() throws
    away the send and receive queues, sends a RST and frees the socket at once (no TIME_WAIT).
    The peer's next recv() returns whatever it had already queued, then fails with ECONNRESET;
    its next send() fails with ECONNRESET or EPIPE.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def unread_when_closed(sock: socket.socket) -> bool:
    """After the peer's FIN: whether the peer closed without reading what we had sent.

    Linux answers a close() that leaves received bytes unread, and bytes that reach a socket
    already closed, with a RST; after the FIN (a shutdown(SHUT_WR) first) that RST leaves
    SO_ERROR = EPIPE on our side.  A server that read a request and closed without answering
    sends a FIN alone.  The RST follows the FIN by the server's time from its shutdown() to
    its close(), so it is awaited for up to UNREAD_RST_WAIT_S.
    """
    until = time.monotonic() + UNREAD_RST_WAIT_S
    while True:
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.EPIPE:
                return True
        except OSError:
            return False
        if time.monotonic() >= until:
            return False
        time.sleep(UNREAD_RST_WAIT_S / 10)


def rst_close(sock: socket.socket) -> None:
    """Close ``sock`` with a RST (see :func:`set_rst_on_close`)."""
    # If the peer's RST already killed the connection, a plain close is all that is left.
    with contextlib.suppress(OSError):
        set_rst_on_close(sock)
    sock.close()


class Conn:
    """One client connection: non-blocking socket calls under deadlines, tallied into a report.

    ``awaiting`` lists the requests sent and not yet answered, oldest first: a tag (answer
    required, checked against the tag) or None (a malformed request, whose answer may be an
    error reply or a close).

    ``disturbed``: the behaviour plans a RST, a half-close or a shutdown on this connection
    (see :meth:`disturb`); a request left unanswered on a connection that is not disturbed,
    and that the peer had not already closed when the request went out, is observed as a
    ``DROPPED_REQUEST``.
    """

    def __init__(self, remote: Remote, index: int, report: FaultReport, deadline: float) -> None:
        self.remote = remote
        self.endpoint = remote.endpoint
        self.protocol = remote.protocol
        self.index = index
        self.report = report
        self.deadline = deadline
        self.sock: socket.socket | None = None
        self.parser = remote.protocol.parser()
        self.awaiting: deque[str | None] = deque()
        self.sent_any = False
        self.last_answered: str | None = None
        self.gone = False  # the peer closed or reset the connection
        self.unechoed: set[str] = set()  # requests for the fixed large_path: no echo expected
        self.disturbed = False
        self._closed_first = False  # the peer's FIN or RST was queued before a request went out
        self._quiet_since = 0.0  # the connection's last activity (connect, send, answer)
        self._idle_s = 0.0  # how quiet the connection was when its last request went out
        self._next_req = 0
        self.tls: TlsLayer | None = None

    # -- bookkeeping

    @property
    def who(self) -> str:
        return who(self.remote.fault, self.index)

    def op_deadline(self) -> float:
        """When the next socket operation must give up (DeadlineReached if the run's passed)."""
        now = time.monotonic()
        if now >= self.deadline:
            raise DeadlineReached
        return min(self.deadline, now + self.endpoint.io_timeout_s)

    def new_socket(self) -> socket.socket:
        try:
            sock = socket.socket(self.remote.family, socket.SOCK_STREAM)
        except OSError as exc:
            error = harness_error(exc, "opening a client socket")
            if error is not None:
                raise error from None
            raise
        # Without TCP_NODELAY, Nagle holds a small write back while an earlier one is unACKed,
        # and the peer delays its ACK (up to 40 ms on Linux): requests written one at a time
        # would reach the server late and coalesced, not in the order and timing we planned.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def adopt(self, sock: socket.socket) -> None:
        """Take a socket connected elsewhere (see the packet faults' ``connect``)."""
        sock.setblocking(False)
        self.sock = sock
        self._quiet_since = time.monotonic()
        self.report.count("connections")

    def connect_failed(self, sock: socket.socket, exc: BaseException) -> bool:
        """Close ``sock``, whose connect raised ``exc``.  A timeout or an OS error is counted
        (True); anything else is the caller's to raise (False)."""
        sock.close()
        if isinstance(exc, TimeoutError):
            self.timed_out("connect")
            return True
        if isinstance(exc, OSError):
            self.report.count(f"errors:connect_{errno_name(exc)}")
            return True
        return False

    def timed_out(self, what: str) -> None:
        if time.monotonic() >= self.deadline - 0.002:
            raise DeadlineReached
        self.report.count(f"errors:timeout_{what}")

    def disturb(self) -> None:
        """The behaviour will reset, half-close or shut down this connection itself."""
        self.disturbed = True

    def peer_gone(self, reset: bool) -> None:
        self.gone = True
        self.report.count("reset_by_peer" if reset else "closed_by_peer")
        unanswered = sum(p is not None for p in self.awaiting)
        self.report.count("closed_without_answer", unanswered)
        if (
            unanswered
            and not self.disturbed
            and not self._closed_first
            and (reset or self.sock is None or not unread_when_closed(self.sock))
        ):
            self._dropped(unanswered, reset)
        self.awaiting.clear()

    def _dropped(self, unanswered: int, reset: bool) -> None:
        first = next(p for p in self.awaiting if p is not None)
        self.report.count("dropped_requests", unanswered)
        self.report.observe(
            dropped_observation(
                self.remote.fault, self.index, first, unanswered, reset, self._idle_s
            )
        )

    def _peer_closed_already(self) -> bool:
        """Whether the peer's FIN or RST is already queued (a peek, which consumes nothing):
        a request sent after it was refused, not dropped."""
        assert self.sock is not None
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def unsolicited(self, data: bytes, when: str) -> None:
        context = unsolicited_context(self.sent_any, self.last_answered, bool(self.awaiting), when)
        self.report.observe(unsolicited_observation(self.remote.fault, self.index, data, context))

    def next_tag(self) -> str:
        """A fresh tag naming the next request of this connection."""
        tag = self.remote.tags.tag(self.index, self._next_req)
        self._next_req += 1
        return tag

    def new_request(self, *, close: bool = False) -> tuple[str, bytes]:
        """The next request of this connection: ``(tag, bytes)``."""
        tag = self.next_tag()
        return tag, self.protocol.request(tag, self.endpoint.host, self.endpoint.port, close=close)

    def new_requests(self, count: int, *, close_last: bool = False) -> tuple[bytes, list[str]]:
        """``count`` requests to pipeline in one write, and their tags."""
        reqs = [self.new_request(close=close_last and i == count - 1) for i in range(count)]
        return b"".join(r for _, r in reqs), [p for p, _ in reqs]

    def large_answer_requests(self, count: int) -> tuple[bytes, list[str]]:
        """``count`` requests to pipeline whose answers are as large as the target has: the
        manifest's ``large_path`` if it names one, else the usual requests."""
        path = self.endpoint.large_path
        if path is None:
            return self.new_requests(count)
        host, port = self.endpoint.host, self.endpoint.port
        tags = [self.next_tag() for _ in range(count)]
        self.unechoed.update(tags)
        data = b"".join(self.protocol.path_request(path, tag, host, port) for tag in tags)
        return data, tags

    def malformed_request(self, variant: str) -> bytes:
        """The protocol's malformed request ``variant``, with a fresh tag where it has one.

        Plans draw HTTP's variant names (so that seeded schedules stay what they were); a
        protocol without that variant gets its own variant of the same rank."""
        host, port = self.endpoint.host, self.endpoint.port
        own = sorted(self.protocol.malformed_variants)
        if variant not in own:
            drawn_from = sorted(HTTP.malformed_variants)
            rank = drawn_from.index(variant) if variant in drawn_from else 0
            variant = own[rank % len(own)]
        return self.protocol.malformed(variant, self.next_tag(), host, port)

    def sent(self, completes: Sequence[str | None]) -> None:
        """Record that requests ``completes`` went out whole (see ``awaiting``)."""
        self.sent_any = True
        self._quiet_since = time.monotonic()
        for tag in completes:
            self.awaiting.append(tag)
            if tag is not None:
                self.report.count("requests")

    def send_failed(self, exc: OSError) -> None:
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            # EPIPE means the socket is already fully shut, which for a connection we never
            # shut ourselves means the peer's RST arrived first.  (Python ignores SIGPIPE, so
            # this is an error, not a signal.)
            self.peer_gone(True)
        else:
            self.report.count(f"errors:send_{errno_name(exc)}")

    def _no_answer(self, exc: proto.NoAnswer, expected: str | None) -> None:
        if expected is not None:
            self.awaiting.appendleft(expected)
        if exc.partial:
            self.report.count("truncated_responses")
        self.peer_gone(exc.reset)

    def _answered(self, reply: proto.Reply, expected: str | None) -> None:
        self._quiet_since = time.monotonic()
        self.report.count("responses")
        self.report.count(f"status:{reply.status}")
        if expected is None:
            return
        self.last_answered = expected
        echoes = self.endpoint.echo_path and expected not in self.unechoed
        if not self.protocol.answers(reply, expected, echoes=echoes):
            self.report.observe(
                foreign_observation(
                    self.remote.fault, self.index, reply.status, expected, reply.body
                )
            )

    def _garbage(self, exc: proto.GarbageReply, expected: str | None) -> None:
        self.report.count("errors:garbage")
        # Not a reply is not proof of cross-talk by itself, but bytes naming another request are.
        seen = garbage_observation(self.remote.fault, self.index, expected, exc.partial)
        if seen is not None:
            self.report.observe(seen)

    # -- awaiting under deadlines

    async def bounded(self, op: Awaitable[T], until: float | None = None) -> T:
        """``op`` under a timeout that ends at ``until`` (default: the next op deadline)."""
        try:
            end = self.op_deadline() if until is None else until
        except DeadlineReached:
            if isinstance(op, Coroutine):  # never started: close it, or Python warns
                op.close()
            raise
        async with asyncio.timeout(max(end - time.monotonic(), 0.0)):
            return await op

    async def recv(self, max_bytes: int = proto.RECV_SIZE, until: float | None = None) -> bytes:
        """One recv under the op deadline; TimeoutError, ConnectionResetError pass through.
        Over TLS: plaintext, b"" once the stream ended (a TLS error is counted and ends it)."""
        if self.tls is None:
            return await self._recv_raw(max_bytes, until)
        while True:
            plain = self._decrypt(max_bytes)
            if plain is not None:
                return plain
            self.tls.feed(await self._recv_raw(proto.RECV_SIZE, until))

    def recv_now(self, max_bytes: int) -> bytes:
        """What the kernel already queued (plaintext over TLS); BlockingIOError if nothing."""
        assert self.sock is not None, "connect() first"
        if self.tls is None:
            return self.sock.recv(max_bytes)
        while True:
            plain = self._decrypt(max_bytes)
            if plain is not None:
                return plain
            self.tls.feed(self.sock.recv(proto.RECV_SIZE))

    def _decrypt(self, max_bytes: int) -> bytes | None:
        assert self.tls is not None
        try:
            return self.tls.decrypt(max_bytes)
        except ssl.SSLError as exc:
            self.report.count(f"errors:tls_{exc.reason or 'error'}".lower())
            return b""

    async def _recv_raw(self, max_bytes: int, until: float | None) -> bytes:
        assert self.sock is not None, "connect() first"
        try:  # what the kernel already queued (often the answer and the FIN), without a wait
            return self.sock.recv(max_bytes)
        except BlockingIOError:
            loop = asyncio.get_running_loop()
            return await self.bounded(loop.sock_recv(self.sock, max_bytes), until)

    async def writable(self, timeout_s: float) -> bool:
        """Wait until the socket can take more bytes; False after ``timeout_s``."""
        assert self.sock is not None, "connect() first"
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, wake)
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await ready
        except TimeoutError:
            return False
        finally:
            loop.remove_writer(fd)
        return True

    async def pause(self, seconds: float) -> None:
        """Sleep, but not past the deadline (DeadlineReached once it has passed)."""
        if time.monotonic() + seconds >= self.deadline:
            await asyncio.sleep(max(self.deadline - time.monotonic(), 0.0))
            raise DeadlineReached
        await asyncio.sleep(seconds)

    # -- actions

    async def connect(self, *, session: bool = True) -> bool:
        """Connect; then, with ``session``, the TLS handshake and the protocol's prologue."""
        sock = self.new_socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await self.bounded(loop.sock_connect(sock, self.remote.sockaddr))
        except BaseException as exc:
            if not self.connect_failed(sock, exc):
                raise
            return False
        self.adopt(sock)
        return await self.start_session() if session else True

    async def start_session(self) -> bool:
        """On a connected socket: the TLS handshake (``tls = true``), then the protocol's
        prologue.  False (counted) if either failed."""
        if self.endpoint.tls and not await self.handshake():
            return False
        return await self.open_session()

    async def handshake(self, *, stop_after_hello: bool = False) -> bool:
        """The TLS handshake, at the TCP level like everything else.  ``stop_after_hello``:
        send the ClientHello and return once the first bytes of the answer arrived (for a RST
        in the middle of the handshake)."""
        self.tls = TlsLayer(self.endpoint.host)
        try:
            while not self.tls.step():
                if not await self.send_raw(self.tls.wire()):
                    return False
                try:
                    raw = await self._recv_raw(proto.RECV_SIZE, None)
                except TimeoutError:
                    self.timed_out("handshake")
                    return False
                except ConnectionResetError:
                    self.peer_gone(True)
                    return False
                if not raw:
                    self.peer_gone(False)
                    return False
                if stop_after_hello:
                    self.report.count("handshakes_cut")
                    return True
                self.tls.feed(raw)
        except ssl.SSLError as exc:
            self.report.count(f"errors:tls_{exc.reason or 'handshake'}".lower())
            return False
        self.report.count("handshakes")
        return await self.send_raw(self.tls.wire())

    async def open_session(self) -> bool:
        """Send the protocol's per-connection prologue and read its replies (none for most
        protocols).  False if the server did not accept the session."""
        prologue = self.protocol.prologue(self.remote.tags.tag(self.index, 0))
        if not prologue:
            return True
        if not await self.send(prologue):
            return False
        self.sent_any = False  # the requests are what later checks speak of
        for _ in range(self.protocol.prologue_replies):
            reply = await self._read_one()
            if reply is None or not 200 <= reply.status < 300:
                self.report.count("errors:session_refused")
                return False
        return True

    async def _read_one(self) -> proto.Reply | None:
        """One reply of the session prologue, or None (the failure counted)."""
        try:
            return await self._next_reply()
        except proto.NoAnswer as exc:
            self.peer_gone(exc.reset)
        except TimeoutError:
            self.timed_out("session")
        except proto.GarbageReply:
            self.report.count("errors:garbage")
        return None

    async def send(self, data: bytes, completes: Sequence[str | None] = ()) -> bool:
        """Send ``data``; ``completes`` are the requests it finishes (see ``awaiting``).

        False if the peer is gone (counted as ``reset_by_peer``) or on any other error.
        """
        if any(tag is not None for tag in completes):
            self._idle_s = time.monotonic() - self._quiet_since
            if not self._closed_first:
                self._closed_first = self._peer_closed_already()
        wire = data if self.tls is None else self.tls.encrypt(data)
        if not await self.send_raw(wire):
            return False
        self.sent(completes)
        return True

    async def send_raw(self, data: bytes) -> bool:
        """Send ``data`` as it is (ciphertext over TLS); False as :meth:`send`."""
        assert self.sock is not None, "connect() first"
        try:
            # The fast path: a small request nearly always fits the socket buffer at once, and
            # then no timer, future or poll registration is needed.
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                loop = asyncio.get_running_loop()
                await self.bounded(loop.sock_sendall(self.sock, data[sent:]))
        except TimeoutError:
            self.timed_out("send")
            return False
        except OSError as exc:
            self.send_failed(exc)
            return False
        return True

    async def send_requests(self, count: int, *, close_last: bool = False) -> bool:
        """Pipeline ``count`` requests in one write."""
        data, tags = self.new_requests(count, close_last=close_last)
        return await self.send(data, tags)

    async def read_reply(self) -> proto.Reply | None:
        """The answer to the oldest request in ``awaiting``, or None (failure counted)."""
        expected = self.awaiting.popleft() if self.awaiting else None
        try:
            reply = await self._next_reply()
        except proto.NoAnswer as exc:
            self._no_answer(exc, expected)
            return None
        except TimeoutError:
            self.timed_out("response")
            return None
        except proto.GarbageReply as exc:
            self._garbage(exc, expected)
            return None
        self._answered(reply, expected)
        return reply

    async def _next_reply(self) -> proto.Reply:
        parser = self.parser
        while True:
            reply = parser.next()
            if reply is not None:
                return reply
            if parser.eof:
                raise proto.NoAnswer("closed", reset=False, partial=parser.buffered)
            try:
                data = await self.recv()
            except ConnectionResetError:
                raise proto.NoAnswer("reset", reset=True, partial=parser.buffered) from None
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()

    async def read_some(self, max_bytes: int) -> bytes:
        """One recv of at most ``max_bytes`` of the answers, or b"" (EOF/RST/timeout counted)."""
        data = self.parser.take_buffered()[:max_bytes]
        if data:
            return data
        try:
            data = await self.recv(max_bytes)
        except TimeoutError:
            self.timed_out("response")
            return b""
        except ConnectionResetError:
            self.peer_gone(True)
            return b""
        if not data:
            self.parser.feed_eof()
            self.peer_gone(False)
        return data

    async def check_quiet(self, wait_s: float = 0.0) -> bool:
        """Expect no bytes now (none asked for): any is an observation.  Watches for up to
        ``wait_s``; returns False if the peer closed or reset the connection meanwhile.
        """
        assert self.sock is not None, "connect() first"
        extra = self.parser.take_buffered()
        alive = not self.parser.eof
        if not extra and alive:
            try:
                if wait_s <= 0:
                    # The socket is non-blocking: recv() only reports what the kernel queued.
                    extra = self.recv_now(proto.RECV_SIZE)
                else:
                    until = min(self.deadline, time.monotonic() + wait_s)
                    extra = await self.recv(proto.RECV_SIZE, until)
            except (BlockingIOError, TimeoutError):
                extra = b""
            except ConnectionResetError:
                self.peer_gone(True)
                return False
            else:
                if not extra:
                    self.parser.feed_eof()
                    self.peer_gone(False)
                    return False
        if extra:
            rest = await self._notice_then_close(extra)
            if rest is None:
                return False
            self.unsolicited(rest, NOT_DUE)
        return alive

    async def _notice_then_close(self, data: bytes) -> bytes | None:
        """``data`` came unasked.  When the protocol may send it as it closes an idle
        connection (:meth:`~afterclose.harness.protocols.base.Protocol.close_notice`), wait
        up to ``NOTICE_CLOSE_S`` for that close.  None when it came: the notice is counted
        as ``close_notices`` (or, if more bytes came first, all of them are reported here).
        Otherwise everything that arrived, for the caller to report.  The compiled engine
        (:mod:`.native`) has no such wait: its behaviours stay quiet 10 ms at most, far short
        of any idle timer, and ``idle_hold``, which outlasts them, runs on this one."""
        if self.parser.eof or not self.protocol.close_notice(data):
            return data
        until = min(self.deadline, time.monotonic() + NOTICE_CLOSE_S)
        more = bytearray()
        reset = False
        try:
            while True:
                chunk = await self.recv(proto.RECV_SIZE, until)
                if not chunk:
                    break
                more += chunk
        except TimeoutError:
            return data + bytes(more)
        except ConnectionResetError:
            reset = True
        if more:
            self.unsolicited(data + bytes(more), NOT_DUE)
        else:
            self.report.count("close_notices")
        self.parser.feed_eof()
        self.peer_gone(reset)
        return None

    async def read_to_eof(self, limit: int = 1 << 20) -> None:
        """After the last answer, expect only EOF or RST: any byte before it is unsolicited."""
        data = bytearray(self.parser.take_buffered())
        reset = False
        try:
            while not self.parser.eof and len(data) < limit:
                try:
                    chunk = await self.recv()
                except ConnectionResetError:
                    reset = True
                    break
                if not chunk:
                    self.parser.feed_eof()
                data += chunk
        except TimeoutError:
            if data:
                self.unsolicited(bytes(data), WAITING_CLOSE)
            self.timed_out("close")
            return
        if data and (self.parser.eof or reset) and self.protocol.close_notice(bytes(data)):
            self.report.count("close_notices")
        elif data:
            self.unsolicited(bytes(data), WAITING_CLOSE)
        self.peer_gone(reset)

    def shutdown_write(self) -> bool:
        """Half-close: send a FIN but keep reading (never blocks)."""
        assert self.sock is not None, "connect() first"
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                # ENOTCONN here means the peer's RST already tore the connection down.
                self.peer_gone(True)
            else:
                self.report.count(f"errors:shutdown_{errno_name(exc)}")
            return False
        self.report.count("fin_sent")
        return True

    def rst(self) -> None:
        """Abort the connection with a RST (SO_LINGER {1, 0}); the fault meant it."""
        if self.sock is not None:
            rst_close(self.sock)
            self.sock = None
            self.awaiting.clear()
            self.report.count("rst_sent")

    def close(self) -> None:
        """A plain close().  Linux sends a FIN, unless received bytes are still unread: then
        it sends a RST instead (RFC 2525 2.17), since the peer's data was never consumed.
        """
        if self.sock is not None:
            self.sock.close()
            self.sock = None
