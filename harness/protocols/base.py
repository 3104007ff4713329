"""The seam between the clients and the format they speak.

A client connection never builds or parses bytes itself: it asks its :class:`Protocol` for a
request carrying a *tag* (``/ac/<run-id>/<conn#>/<req#>``, unique per request of a run), feeds
what it receives to the protocol's :class:`ReplyParser`, and asks :meth:`Protocol.answers`
whether a reply answers the request it sent (a reply that carries another connection's tag is
cross-talk).  Everything here is I/O-free except :meth:`Protocol.ask`, the one blocking
exchange that readiness probes and the liveness rule use.

A new protocol is one module beside ``http.py`` implementing :class:`Protocol`.
"""

from __future__ import annotations

import abc
import os
import re
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from typing import ClassVar
from typing import Protocol as Structural

RECV_SIZE = 64 * 1024

# A tag as made by make_tag(); the run id is lowercase hex.
_TAG = re.compile(rb"/ac/([0-9a-z]+)/(\d+)/(\d+)(?![0-9A-Za-z])")


class ClientError(Exception):
    """Base of every failure of one exchange; ``partial`` holds the bytes received, if any."""

    def __init__(self, message: str, partial: bytes = b"") -> None:
        super().__init__(message)
        self.partial = partial


class ConnectFailed(ClientError):
    """The TCP connection could not be made (refused, unreachable, or timed out)."""


class NoAnswer(ClientError):
    """The peer closed (FIN) or reset (RST) the connection before a whole reply arrived."""

    def __init__(self, message: str, *, reset: bool, partial: bytes = b"") -> None:
        super().__init__(message, partial)
        self.reset = reset


class ReplyTimeout(ClientError):
    """No whole reply arrived before the deadline; the connection is still open."""


class GarbageReply(ClientError):
    """The bytes received are not a reply of this protocol."""


class Reply(Structural):
    """One whole reply, as the clients read it."""

    @property
    def status(self) -> int:
        """The reply's status code (protocols without one map success to 200)."""
        ...

    @property
    def body(self) -> bytes: ...

    @property
    def keep_alive(self) -> bool:
        """Whether the server keeps the connection open after this reply."""
        ...


@dataclass(frozen=True)
class Frame:
    """One whole reply of a protocol without HTTP's shape: a success maps to status 200, a
    miss to 404, an error reply to 400 (500 for a server error)."""

    status: int
    body: bytes
    keep_alive: bool = True
    kind: str = ""  # what the protocol calls it ("bulk", "PUBLISH"...), for messages


# --------------------------------------------------------------------------- tags


def new_run_id() -> str:
    """A short id, unique enough that two runs against one server never share a tag."""
    return f"{os.getpid():x}{secrets.token_hex(3)}"


def make_tag(run_id: str, conn: int, req: int) -> str:
    """The tag of request ``req`` on connection ``conn`` of run ``run_id``."""
    return f"/ac/{run_id}/{conn}/{req}"


def parse_tag(tag: str | bytes) -> tuple[str, int, int] | None:
    """Invert :func:`make_tag`: ``(run_id, conn, req)``, or None if not one of ours."""
    raw = tag.encode() if isinstance(tag, str) else tag
    m = _TAG.fullmatch(raw)
    if m is None:
        return None
    return m.group(1).decode(), int(m.group(2)), int(m.group(3))


def tags_in(data: bytes) -> list[str]:
    """Every tag (as made by :func:`make_tag`) that ``data`` contains."""
    return [m.group(0).decode() for m in _TAG.finditer(data)]


def carries(data: bytes, tag: str) -> bool:
    """Whether ``data`` contains exactly ``tag`` (``/ac/r/1/1`` does not match ``/ac/r/1/10``)."""
    return tag in tags_in(data)


def session_of(tag: str) -> str:
    """A name shared by every tag of one connection (``<run-id>-<conn#>``): the per-connection
    key, topic or client id of protocols that keep state per connection."""
    parsed = parse_tag(tag)
    if parsed is None:
        return tag.strip("/").replace("/", "-")
    return f"{parsed[0]}-{parsed[1]}"


class Tags:
    """Makes the tags of one run."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id if run_id is not None else new_run_id()

    def tag(self, conn: int, req: int) -> str:
        return make_tag(self.run_id, conn, req)


# --------------------------------------------------------------------------- the interface


class ReplyParser(abc.ABC):
    """Parses replies out of a byte stream without any I/O.

    ``feed()`` what arrived, ``feed_eof()`` when the peer closed, then ``next()`` returns one
    whole reply (removing its bytes) or None if more bytes are needed; it raises
    :class:`GarbageReply` on bytes that are not a reply.  Bytes after a reply stay in
    ``buffered``: that is how a second, unasked-for reply is noticed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> bytes:
        return bytes(self._buf)

    def take_buffered(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes) -> None:
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    @abc.abstractmethod
    def next(self) -> Reply | None:
        """One whole reply, or None."""


class Protocol(abc.ABC):
    """What a client needs to know about one request/answer format.

    ``malformed_variants``: names of the malformed requests :meth:`malformed` makes, each
    breaking a different rule of the grammar (plans draw from them, sorted).
    """

    name: ClassVar[str]
    malformed_variants: ClassVar[tuple[str, ...]]
    # False for a protocol the harness cannot read replies of (``raw``): only connection-level
    # faults apply, and scenarios that judge replies skip with ``no_replies_reason``.
    has_replies: ClassVar[bool] = True
    no_replies_reason: ClassVar[str] = ""
    # True when every successful reply repeats its request's tag by construction (an echo, a
    # GET of the value just set, a message delivered back): cross-talk is then always checked,
    # whatever the manifest's ``echo_path`` says.
    tagged_replies: ClassVar[bool] = False
    # How many replies the per-connection session prologue (see :meth:`prologue`) gets.
    prologue_replies: ClassVar[int] = 0

    @abc.abstractmethod
    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        """One valid request carrying ``tag``; with ``close``, asking the server to close
        after answering it."""

    @abc.abstractmethod
    def parser(self) -> ReplyParser:
        """A fresh parser for one connection's replies."""

    def prologue(self, session: str) -> bytes:
        """What a connection sends once, before its first request (MQTT's CONNECT and
        SUBSCRIBE); ``session`` names the connection (unique per run).  Its
        ``prologue_replies`` replies are read before any request's."""
        return b""

    def answers(self, reply: Reply, tag: str, *, echoes: bool) -> bool:
        """Whether ``reply`` may answer the request tagged ``tag``.  With ``echoes`` (the
        target repeats the tag in its successful replies) a successful reply must carry it."""
        echoes = echoes or self.tagged_replies
        if not echoes or not 200 <= reply.status < 300:
            return True
        return carries(reply.body, tag)

    def close_notice(self, data: bytes) -> bool:
        """Whether ``data``, everything that came unasked before the server closed the
        connection, is one whole reply a server may send on a connection it closes for want
        of a request (HTTP's 408).  Followed by the close it answers nobody else's request."""
        return False

    def configured(self, headers: tuple[tuple[str, str], ...]) -> Protocol:
        """This protocol sending ``headers`` (the manifest's ``request_headers``) too."""
        return self

    def path_request(self, path: str, tag: str, host: str, port: int) -> bytes:
        """A valid request for the fixed ``path`` (the manifest's ``large_path``) still
        carrying ``tag``; its answer is not expected to echo the tag."""
        raise NotImplementedError(f"protocol {self.name} cannot ask for a fixed path")

    @abc.abstractmethod
    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        """A request of about ``size`` bytes carrying ``tag`` whose reply is about as large
        (a reply that backs up into the server's buffers)."""

    @abc.abstractmethod
    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        """The malformed request ``variant`` (one of ``malformed_variants``)."""

    def liveness_request(self, path: str, host: str, port: int) -> bytes:
        """The request that asks a live server for ``path`` (then closes)."""
        return self.request(path, host, port, close=True)

    def ask(self, host: str, port: int, path: str, timeout_s: float, *, tls: bool = False) -> Reply:
        """One request on a fresh connection, its reply, all within ``timeout_s`` (blocking).
        Raises :class:`ClientError` subclasses."""
        deadline = time.monotonic() + timeout_s
        sock = connect(host, port, timeout_s, tls=tls)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            parser = self.parser()
            try:
                sock.sendall(self.prologue(path) + self.liveness_request(path, host, port))
            except TimeoutError:
                raise ReplyTimeout("request not sent before the deadline") from None
            except (ConnectionResetError, BrokenPipeError):
                raise NoAnswer("connection reset while sending the request", reset=True) from None
            for _ in range(self.prologue_replies):
                read_reply(sock, parser, deadline)
            return read_reply(sock, parser, deadline)
        finally:
            sock.close()

    def liveness_problem(self, host: str, port: int, timeout_s: float, *, tls: bool) -> str:
        """Why a fresh tagged request did not get its answer ("" when it did): the liveness
        check of a protocol whose manifest keys (``liveness_path``...) are HTTP's."""
        tag = make_tag(f"live{secrets.token_hex(3)}", 0, 0)
        try:
            reply = self.ask(host, port, tag, timeout_s, tls=tls)
        except (OSError, ClientError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if not self.answers(reply, tag, echoes=True):
            return f"the reply {reply.body[:80]!r} does not answer {tag}"
        return ""


# --------------------------------------------------------------------------- blocking I/O


def connect(host: str, port: int, timeout_s: float, *, tls: bool = False) -> socket.socket:
    """A connected TCP socket (TLS-wrapped with ``tls``), or :class:`ConnectFailed`."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        raise ConnectFailed(f"connect to {host}:{port} timed out") from None
    except OSError as exc:
        raise ConnectFailed(f"connect to {host}:{port} failed: {exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not tls:
        return sock
    from afterclose.harness.protocols.tls import client_context

    try:
        return client_context().wrap_socket(sock, server_hostname=host)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise ConnectFailed(f"TLS handshake with {host}:{port} failed: {exc}") from None


def read_reply(sock: socket.socket, parser: ReplyParser, deadline: float) -> Reply:
    """One whole reply from blocking ``sock`` through ``parser`` before ``deadline``."""
    while True:
        reply = parser.next()
        if reply is not None:
            return reply
        if parser.eof:
            partial = parser.buffered
            what = "before a whole reply" if partial else "with no answer"
            raise NoAnswer(f"connection closed {what}", reset=False, partial=partial)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReplyTimeout("deadline passed", parser.buffered)
        sock.settimeout(remaining)
        try:
            data = sock.recv(RECV_SIZE)
        except TimeoutError:
            raise ReplyTimeout("no whole reply before the deadline", parser.buffered) from None
        except ConnectionResetError:
            raise NoAnswer(
                "connection reset by peer", reset=True, partial=parser.buffered
            ) from None
        except ssl.SSLError as exc:
            raise NoAnswer(f"TLS: {exc}", reset=False, partial=parser.buffered) from None
        if data:
            parser.feed(data)
        else:
            parser.feed_eof()
