"""A tiny blocking HTTP/1.1 client shared by the faults and the oracle.

It speaks just enough HTTP to notice when a server answers the wrong connection: GET requests
whose path names the request (``/ac/<run-id>/<conn#>/<req#>``), a strict response parser that
reads exactly one response and leaves whatever follows it in its buffer, and the ``SO_LINGER``
trick that makes ``close()`` send a RST.

The parser (:class:`ResponseParser`) does no I/O, so a non-blocking caller can feed it too;
:class:`ResponseReader` drives it from a blocking socket under a deadline.  Failures are split
by what they mean for a verdict: :class:`NoAnswer` (closed or reset before a whole response),
:class:`HttpTimeout` (the peer said nothing in time), :class:`GarbageResponse` (bytes that are not
HTTP) and :class:`ConnectFailed`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

DEFAULT_TIMEOUT_S = 5.0
MAX_HEADER_BYTES = 64 * 1024
RECV_SIZE = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: ([^\r\n]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A request path as made by request_path(); the run id is lowercase hex.
_PATH = re.compile(rb"/ac/([0-9a-z]+)/(\d+)/(\d+)(?![0-9A-Za-z])")


class HttpClientError(Exception):
    """Base of every failure of this client; ``partial`` holds the bytes received, if any."""

    def __init__(self, message: str, partial: bytes = b"") -> None:
        super().__init__(message)
        self.partial = partial


class ConnectFailed(HttpClientError):
    """The TCP connection could not be made (refused, unreachable, or timed out)."""


class NoAnswer(HttpClientError):
    """The peer closed (FIN) or reset (RST) the connection before a whole response arrived."""

    def __init__(self, message: str, *, reset: bool, partial: bytes = b"") -> None:
        super().__init__(message, partial)
        self.reset = reset


class HttpTimeout(HttpClientError):
    """No whole response arrived before the deadline; the connection is still open."""


class GarbageResponse(HttpClientError):
    """The bytes received are not an HTTP/1.x response."""


@dataclass(frozen=True)
class Response:
    """One parsed response.  Header names are lowercased; a repeated header keeps the last."""

    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    version: str = "HTTP/1.1"

    @property
    def keep_alive(self) -> bool:
        """Whether the server will keep the connection open after this response."""
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


# --------------------------------------------------------------------------- requests


def new_run_id() -> str:
    """A short id, unique enough that two runs against one server never share a path."""
    return f"{os.getpid():x}{secrets.token_hex(3)}"


def request_path(run_id: str, conn: int, req: int) -> str:
    """The path of request ``req`` on connection ``conn`` of run ``run_id``."""
    return f"/ac/{run_id}/{conn}/{req}"


def parse_request_path(path: str | bytes) -> tuple[str, int, int] | None:
    """Invert :func:`request_path`: ``(run_id, conn, req)``, or None if not one of ours."""
    raw = path.encode() if isinstance(path, str) else path
    m = _PATH.fullmatch(raw)
    if m is None:
        return None
    return m.group(1).decode(), int(m.group(2)), int(m.group(3))


def paths_in(body: bytes) -> list[str]:
    """Every request path (as made by :func:`request_path`) that ``body`` contains."""
    return [m.group(0).decode() for m in _PATH.finditer(body)]


def echoes(body: bytes, path: str) -> bool:
    """Whether ``body`` contains exactly ``path`` (``/ac/r/1/1`` does not match ``/ac/r/1/10``)."""
    return path in paths_in(body)


class PathGen:
    """Makes the ``/ac/<run-id>/<conn#>/<req#>`` paths of one run."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id if run_id is not None else new_run_id()

    def path(self, conn: int, req: int) -> str:
        return request_path(self.run_id, conn, req)


def host_header(host: str, port: int | None = None) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return shown if port is None else f"{shown}:{port}"


def build_get(
    path: str,
    host: str,
    port: int | None = None,
    *,
    close: bool = False,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """An HTTP/1.1 GET for ``path`` with a Host header (and ``Connection: close`` if asked)."""
    if not path.startswith("/") or any(c in path for c in " \r\n"):
        raise ValueError(f"not an origin-form path: {path!r}")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host_header(host, port)}"]
    if close:
        lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --------------------------------------------------------------------------- responses


class ResponseParser:
    """Parses HTTP/1.x responses out of a byte stream, without doing any I/O.

    ``feed()`` what arrived, ``feed_eof()`` when the peer closed, then ``next()`` returns one whole
    response (removing its bytes) or None if more bytes are needed.  A body without
    Content-Length or chunked encoding ends at EOF.  Bytes after a response stay in ``buffered``:
    that is how a second, unasked-for response is noticed.
    """

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self._buf = bytearray()
        self._eof = False
        self._max_header_bytes = max_header_bytes

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

    def next(self) -> Response | None:
        """One whole response, or None; raises :class:`GarbageResponse` on non-HTTP bytes."""
        buf = self._buf
        if not buf:
            return None
        prefix = b"HTTP/"
        if not buf.startswith(prefix[: len(buf)]):
            raise GarbageResponse(f"not an HTTP response: {bytes(buf[:60])!r}", bytes(buf))
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > self._max_header_bytes:
                raise GarbageResponse("response headers too long", bytes(buf))
            return None
        status, reason, version, headers = self._parse_head(bytes(buf[:head_end]))
        body_start = head_end + 4
        parsed = self._body(status, headers, body_start)
        if parsed is None:
            return None
        body, end = parsed
        del buf[:end]
        return Response(status, reason, headers, body, version)

    def _parse_head(self, head: bytes) -> tuple[int, str, str, dict[str, str]]:
        lines = head.split(b"\r\n")
        m = _STATUS_LINE.fullmatch(lines[0])
        if m is None:
            raise GarbageResponse(f"bad status line: {lines[0][:80]!r}", head)
        version = f"HTTP/{m.group(1).decode()}.{m.group(2).decode()}"
        status = int(m.group(3))
        reason = (m.group(4) or b"").decode("latin-1")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                raise GarbageResponse(f"bad header line: {line[:80]!r}", head)
            headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
        return status, reason, version, headers

    def _body(self, status: int, headers: dict[str, str], start: int) -> tuple[bytes, int] | None:
        buf = self._buf
        if 100 <= status < 200 or status in (204, 304):
            return b"", start
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._chunked(start)
        length_text = headers.get("content-length")
        if length_text is not None:
            lengths = {part.strip() for part in length_text.split(",")}
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise GarbageResponse(f"bad Content-Length: {length_text!r}", bytes(buf))
            end = start + int(next(iter(lengths)))
            if len(buf) < end:
                return None
            return bytes(buf[start:end]), end
        if not self._eof:
            return None
        return bytes(buf[start:]), len(buf)

    def _chunked(self, pos: int) -> tuple[bytes, int] | None:
        buf = self._buf
        body = bytearray()
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size_text = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise GarbageResponse(f"bad chunk size: {size_text[:40]!r}", bytes(buf)) from None
            pos = line_end + 2
            if size == 0:
                # Skip trailers up to the empty line.
                while True:
                    line_end = buf.find(b"\r\n", pos)
                    if line_end < 0:
                        return None
                    empty = line_end == pos
                    pos = line_end + 2
                    if empty:
                        return bytes(body), pos
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos : pos + size]
            if buf[pos + size : pos + size + 2] != b"\r\n":
                raise GarbageResponse("chunk not followed by CRLF", bytes(buf))
            pos += size + 2


class ResponseReader:
    """Reads whole responses from a blocking socket, each under a ``time.monotonic()`` deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = ResponseParser()

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HttpTimeout("deadline passed", self.parser.buffered)
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(RECV_SIZE)
        except TimeoutError:
            raise HttpTimeout(
                "no whole response before the deadline", self.parser.buffered
            ) from None
        except ConnectionResetError:
            raise NoAnswer(
                "connection reset by peer", reset=True, partial=self.parser.buffered
            ) from None

    def read_response(self, deadline: float) -> Response:
        while True:
            response = self.parser.next()
            if response is not None:
                return response
            if self.parser.eof:
                partial = self.parser.buffered
                what = "before a whole response" if partial else "with no answer"
                raise NoAnswer(f"connection closed {what}", reset=False, partial=partial)
            data = self._recv(deadline)
            if data:
                self.parser.feed(data)
            else:
                self.parser.feed_eof()

    def read_until_eof(self, deadline: float, limit: int = 1 << 20) -> tuple[bytes, bool]:
        """Everything left (buffered first) until EOF or RST: ``(data, reset)``.

        Stops early after ``limit`` bytes; raises :class:`HttpTimeout` if the peer neither closes
        nor resets the connection before the deadline.
        """
        data = bytearray(self.parser.take_buffered())
        while not self.parser.eof and len(data) < limit:
            try:
                chunk = self._recv(deadline)
            except NoAnswer:
                return bytes(data), True
            except HttpTimeout as exc:
                raise HttpTimeout(str(exc), bytes(data)) from None
            if not chunk:
                self.parser.feed_eof()
            data += chunk
        return bytes(data), False


# --------------------------------------------------------------------------- sockets


def set_rst_on_close(sock: socket.socket) -> None:
    """Make the next ``close()`` abort the connection with a RST instead of a FIN.

    With SO_LINGER {on, 0 s} the kernel does not linger to deliver queued data: close() throws
    away the send and receive queues, sends a RST and frees the socket at once (no TIME_WAIT).
    The peer's next recv() returns whatever it had already queued, then fails with ECONNRESET;
    its next send() fails with ECONNRESET or EPIPE.  Data still in flight towards the peer is
    lost, which is exactly the race the faults want a server to survive.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def rst_close(sock: socket.socket) -> None:
    """Close ``sock`` with a RST (see :func:`set_rst_on_close`)."""
    # If the peer's RST already killed the connection, a plain close is all that is left.
    with contextlib.suppress(OSError):
        set_rst_on_close(sock)
    sock.close()


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A connected TCP socket, or :class:`ConnectFailed`."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        raise ConnectFailed(f"connect to {host_header(host, port)} timed out") from None
    except OSError as exc:
        raise ConnectFailed(f"connect to {host_header(host, port)} failed: {exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get(host: str, port: int, path: str = "/", timeout_s: float = DEFAULT_TIMEOUT_S) -> Response:
    """One GET on a fresh connection (``Connection: close``), all of it within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    sock = connect(host, port, timeout_s)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.sendall(build_get(path, host, port, close=True))
        except TimeoutError:
            raise HttpTimeout("request not sent before the deadline") from None
        except (ConnectionResetError, BrokenPipeError):
            raise NoAnswer("connection reset while sending the request", reset=True) from None
        return ResponseReader(sock).read_response(deadline)
    finally:
        sock.close()
