"""One storm connection on an asyncio loop: :class:`~afterclose.faults.base.ConnState`'s
bookkeeping (counts, cross-talk, echo checks) over non-blocking ``loop.sock_*`` calls.

The connection owns its raw socket rather than a transport: the faults need ``shutdown(SHUT_WR)``
at an exact point, ``SO_LINGER {1, 0}`` then ``close()`` for a RST, and "what has the kernel
already queued?" reads, none of which a transport's buffering allows.  Every await runs under a
timeout bounded by the run's deadline and the endpoint's ``io_timeout_s``, as in the blocking
:class:`~afterclose.faults.base.Conn`, so a storm ends within milliseconds of its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine, Sequence
from typing import TypeVar

from afterclose.faults.base import ConnState, DeadlineReached, FaultReport, Target
from afterclose.harness import httpclient

T = TypeVar("T")


class AsyncConn(ConnState):
    """The asyncio twin of :class:`~afterclose.faults.base.Conn`: the same methods, awaited."""

    def __init__(
        self,
        target: Target,
        index: int,
        report: FaultReport,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(target, index, report, deadline)
        self.loop = loop
        self.parser = httpclient.ResponseParser()

    async def _bounded(self, op: Awaitable[T], until: float | None = None) -> T:
        """``op`` under a timeout that ends at ``until`` (default: the next op deadline)."""
        try:
            end = self._op_deadline() if until is None else until
        except DeadlineReached:
            if isinstance(op, Coroutine):  # never started: close it, or Python warns
                op.close()
            raise
        async with asyncio.timeout(max(end - time.monotonic(), 0.0)):
            return await op

    # -- actions

    async def connect(self) -> bool:
        sock = self._new_socket()
        sock.setblocking(False)
        try:
            await self._bounded(self.loop.sock_connect(sock, self.target.sockaddr))
        except TimeoutError:
            sock.close()
            self._timed_out("connect")
            return False
        except OSError as exc:
            sock.close()
            self._connect_failed(exc)
            return False
        except BaseException:
            sock.close()
            raise
        self._connected(sock)
        return True

    async def send(self, data: bytes, completes: Sequence[str | None] = ()) -> bool:
        """Send ``data``; ``completes`` are the requests it finishes (see ``awaiting``)."""
        assert self.sock is not None, "connect() first"
        try:
            # The fast path: a small request nearly always fits the socket buffer at once, and
            # then no timer, future or poll registration is needed.
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                await self._bounded(self.loop.sock_sendall(self.sock, data[sent:]))
        except TimeoutError:
            self._timed_out("send")
            return False
        except OSError as exc:
            self._send_failed(exc)
            return False
        self._sent(completes)
        return True

    async def send_requests(self, count: int, *, close_last: bool = False) -> bool:
        """Pipeline ``count`` GETs in one write."""
        data, paths = self.new_requests(count, close_last=close_last)
        return await self.send(data, paths)

    async def _recv(self, max_bytes: int = httpclient.RECV_SIZE) -> bytes:
        """One recv under the op deadline; TimeoutError, ConnectionResetError pass through."""
        assert self.sock is not None, "connect() first"
        try:  # what the kernel already queued (often the answer and the FIN), without a wait
            return self.sock.recv(max_bytes)
        except BlockingIOError:
            return await self._bounded(self.loop.sock_recv(self.sock, max_bytes))

    async def read_response(self) -> httpclient.Response | None:
        """The answer to the oldest request in ``awaiting``, or None (failure counted)."""
        expected = self.awaiting.popleft() if self.awaiting else None
        parser = self.parser
        try:
            while True:
                response = parser.next()
                if response is not None:
                    break
                if parser.eof:
                    partial = parser.buffered
                    raise httpclient.NoAnswer("closed", reset=False, partial=partial)
                try:
                    data = await self._recv()
                except ConnectionResetError:
                    raise httpclient.NoAnswer(
                        "reset", reset=True, partial=parser.buffered
                    ) from None
                if data:
                    parser.feed(data)
                else:
                    parser.feed_eof()
        except httpclient.NoAnswer as exc:
            self._no_answer(exc, expected)
            return None
        except TimeoutError:
            self._timed_out("response")
            return None
        except httpclient.GarbageResponse as exc:
            self._unsolicited_garbage(exc, expected)
            return None
        self._answered(response, expected)
        return response

    async def read_some(self, max_bytes: int) -> bytes:
        """One recv of at most ``max_bytes`` of the answers, or b"" (EOF/RST/timeout counted)."""
        data = self.parser.take_buffered()[:max_bytes]
        if data:
            return data
        try:
            data = await self._recv(max_bytes)
        except TimeoutError:
            self._timed_out("response")
            return b""
        except ConnectionResetError:
            self._peer_gone(True)
            return b""
        if not data:
            self.parser.feed_eof()
            self._peer_gone(False)
        return data

    async def check_quiet(self, wait_s: float = 0.0) -> bool:
        """Expect no bytes now (none asked for): any is cross-talk.  Watches for up to
        ``wait_s``; returns False if the peer closed or reset the connection meanwhile.
        """
        assert self.sock is not None, "connect() first"
        extra = self.parser.take_buffered()
        alive = not self.parser.eof
        if not extra and alive:
            try:
                if wait_s <= 0:
                    # The socket is non-blocking: recv() only reports what the kernel queued.
                    extra = self.sock.recv(httpclient.RECV_SIZE)
                else:
                    until = min(self.deadline, time.monotonic() + wait_s)
                    extra = await self._bounded(
                        self.loop.sock_recv(self.sock, httpclient.RECV_SIZE), until
                    )
            except (BlockingIOError, TimeoutError):
                extra = b""
            except ConnectionResetError:
                self._peer_gone(True)
                return False
            else:
                if not extra:
                    self.parser.feed_eof()
                    self._peer_gone(False)
                    return False
        if extra:
            self._unsolicited(extra, "while no answer was due")
        return alive

    async def read_to_eof(self, limit: int = 1 << 20) -> None:
        """After the last answer, expect only EOF or RST: any byte before it is cross-talk."""
        data = bytearray(self.parser.take_buffered())
        reset = False
        try:
            while not self.parser.eof and len(data) < limit:
                try:
                    chunk = await self._recv()
                except ConnectionResetError:
                    reset = True
                    break
                if not chunk:
                    self.parser.feed_eof()
                data += chunk
        except TimeoutError:
            if data:
                self._unsolicited(bytes(data), "while waiting for the close")
            self._timed_out("close")
            return
        if data:
            self._unsolicited(bytes(data), "while waiting for the close")
        self._peer_gone(reset)

    async def pause(self, seconds: float) -> None:
        """Sleep, but not past the deadline (DeadlineReached once it has passed)."""
        if time.monotonic() + seconds >= self.deadline:
            await asyncio.sleep(max(self.deadline - time.monotonic(), 0.0))
            raise DeadlineReached
        await asyncio.sleep(seconds)
