"""HTTP/1.1, the first :class:`~afterclose.harness.protocols.base.Protocol`.

Requests are GETs whose path is the tag (``/ac/<run-id>/<conn#>/<req#>``); a target that
echoes paths (``echo_path``) repeats it in its 2xx bodies, which is how an answer meant for
another connection is recognised.  The parser is strict and reads exactly one response,
leaving whatever follows it in its buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from afterclose.harness.protocols import base
from afterclose.harness.protocols.base import ClientError, GarbageReply

__all__ = ["HTTP", "ClientError", "Http", "Response", "ResponseParser", "build_get", "get"]

DEFAULT_TIMEOUT_S = 5.0
MAX_HEADER_BYTES = 64 * 1024
TAG_HEADER = "X-Afterclose-Tag"
REQUEST_TIMEOUT = 408

_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: ([^\r\n]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# Each breaks a different rule of the request grammar, to reach different error branches.
MALFORMED: dict[str, bytes] = {
    "garbage": b"GARBAGE\r\n\r\n",
    "no-target": b"GET\r\n\r\n",
    "bad-version": b"GET {path} HTTP/9.9\r\nHost: {host}\r\n\r\n",
    "bad-target": b"GET no-slash HTTP/1.1\r\nHost: {host}\r\n\r\n",
    "bad-header": b"GET {path} HTTP/1.1\r\nHost: {host}\r\nno colon here\r\n\r\n",
    "binary": b"\x00\x01\x02\xff\xfe \x7f\r\n\r\n",
}


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
    """An HTTP/1.1 GET for ``path`` with a Host header (and ``Connection: close`` if asked).
    An extra header named like one of these replaces it."""
    if not path.startswith("/") or any(c in path for c in " \r\n"):
        raise ValueError(f"not an origin-form path: {path!r}")
    given = {name.lower() for name, _ in extra_headers}
    lines = [f"GET {path} HTTP/1.1"]
    if "host" not in given:
        lines.append(f"Host: {host_header(host, port)}")
    if close and "connection" not in given:
        lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ResponseParser(base.ReplyParser):
    """HTTP/1.x responses out of a byte stream.  A body without Content-Length or chunked
    encoding ends at EOF."""

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        super().__init__()
        self._max_header_bytes = max_header_bytes

    def next(self) -> Response | None:
        """One whole response, or None; raises :class:`GarbageReply` on non-HTTP bytes."""
        buf = self._buf
        if not buf:
            return None
        prefix = b"HTTP/"
        if not buf.startswith(prefix[: len(buf)]):
            raise GarbageReply(f"not an HTTP response: {bytes(buf[:60])!r}", bytes(buf))
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > self._max_header_bytes:
                raise GarbageReply("response headers too long", bytes(buf))
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
            raise GarbageReply(f"bad status line: {lines[0][:80]!r}", head)
        version = f"HTTP/{m.group(1).decode()}.{m.group(2).decode()}"
        status = int(m.group(3))
        reason = (m.group(4) or b"").decode("latin-1")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                raise GarbageReply(f"bad header line: {line[:80]!r}", head)
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
                raise GarbageReply(f"bad Content-Length: {length_text!r}", bytes(buf))
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
                raise GarbageReply(f"bad chunk size: {size_text[:40]!r}", bytes(buf)) from None
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
                raise GarbageReply("chunk not followed by CRLF", bytes(buf))
            pos += size + 2


class Http(base.Protocol):
    """HTTP/1.1 GETs named by their path."""

    name: ClassVar[str] = "http"
    malformed_variants: ClassVar[tuple[str, ...]] = tuple(MALFORMED)

    def __init__(self, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.headers = headers  # the manifest's request_headers

    def configured(self, headers: tuple[tuple[str, str], ...]) -> Http:
        return Http(headers) if headers else self

    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        # Said explicitly: some servers keep an HTTP/1.1 connection open only when asked.
        named = any(name.lower() == "connection" for name, _ in self.headers)
        keep = () if close or named else (("Connection", "keep-alive"),)
        return build_get(tag, host, port, close=close, extra_headers=(*keep, *self.headers))

    def path_request(self, path: str, tag: str, host: str, port: int) -> bytes:
        # The tag travels in a header: the answer to a fixed path cannot echo it.
        extra = (("Connection", "keep-alive"), *self.headers, (TAG_HEADER, tag))
        return build_get(path, host, port, extra_headers=extra)

    def parser(self) -> ResponseParser:
        return ResponseParser()

    def close_notice(self, data: bytes) -> bool:
        # RFC 9110 15.5.9: a server that stops waiting for a request may say so with a 408
        # before it closes (HAProxy's default on a silent connection; Node's requestTimeout).
        parser = ResponseParser()
        parser.feed(data)
        parser.feed_eof()
        try:
            reply = parser.next()
        except GarbageReply:
            return False
        return reply is not None and reply.status == REQUEST_TIMEOUT and not parser.buffered

    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        # The path is padded after a "/": an echoed body still contains the tag, followed by
        # a non-alphanumeric character, and is as long as the request.
        pad = size - len(tag) - 1
        path = f"{tag}/{'x' * pad}" if pad > 0 else tag
        return build_get(path, host, port, extra_headers=self.headers)

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        template = MALFORMED[variant]
        shown = host_header(host, port).encode()
        return template.replace(b"{path}", tag.encode()).replace(b"{host}", shown)


HTTP = Http()


def get(
    host: str,
    port: int,
    path: str = "/",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    tls: bool = False,
    headers: tuple[tuple[str, str], ...] = (),
) -> Response:
    """One GET on a fresh connection (``Connection: close``), all of it within ``timeout_s``;
    ``headers``: the manifest's ``request_headers``."""
    reply = HTTP.configured(headers).ask(host, port, path, timeout_s, tls=tls)
    assert isinstance(reply, Response)
    return reply
