"""The Redis serialization protocol (RESP2, with RESP3's simple types read too).

A request is ``SET <key> <tag>`` then ``GET <key>`` in one write, where the key is the
connection's own (``afterclose:<run-id>-<conn#>``): the GET's bulk reply must be the tag just
set, so a value, or a reply, that belongs to another connection is cross-talk.  The parser
reads one value at a time and folds the SET's ``+OK`` into the GET's reply.
"""

from __future__ import annotations

from typing import ClassVar

from afterclose.harness.protocols import base
from afterclose.harness.protocols.base import Frame, GarbageReply

MAX_LINE = 64 * 1024
MAX_BULK = 64 << 20
MAX_DEPTH = 8
MAX_ITEMS = 1 << 20

MALFORMED: dict[str, bytes] = {
    "unknown-command": b"*2\r\n$14\r\nAFTERCLOSE-BAD\r\n${n}\r\n{tag}\r\n",
    "bad-length": b"*1\r\n$x{tag}\r\n",
    "wrong-arity": b"*1\r\n$3\r\nGET\r\n",
    "unterminated": b"*2\r\n$4\r\nECHO\r\n${n}\r\n{tag}XX",
    "bad-count": b"*x\r\n",
}


def command(*parts: bytes) -> bytes:
    """One command as an array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def key_of(tag: str) -> bytes:
    return f"afterclose:{base.session_of(tag)}".encode()


class _Short(Exception):
    """More bytes are needed."""


class RespParser(base.ReplyParser):
    def next(self) -> Frame | None:
        try:
            first, end = self._value(0, 0)
            if first.kind == "simple" and first.body == b"OK":
                # The SET's answer: the reply is the GET's value that follows.
                second, end = self._value(end, 0)
                first = second
        except _Short:
            return None
        del self._buf[:end]
        return first

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos, pos + MAX_LINE)
        if end < 0:
            if len(self._buf) - pos > MAX_LINE:
                raise GarbageReply("a RESP line longer than 64 KiB", bytes(self._buf[:200]))
            raise _Short
        return bytes(self._buf[pos:end]), end + 2

    def _number(self, text: bytes) -> int:
        try:
            return int(text)
        except ValueError:
            raise GarbageReply(f"bad RESP length {text[:40]!r}", bytes(self._buf[:200])) from None

    def _value(self, pos: int, depth: int) -> tuple[Frame, int]:
        if pos >= len(self._buf):
            raise _Short
        kind = bytes(self._buf[pos : pos + 1])
        line, end = self._line(pos + 1)
        if kind == b"+":
            return Frame(200, line, kind="simple"), end
        if kind == b"-":
            return Frame(400, line, kind="error"), end
        if kind in (b":", b",", b"#", b"("):
            return Frame(200, line, kind="number"), end
        if kind == b"_":
            return Frame(404, b"", kind="null"), end
        if kind in (b"$", b"=", b"!"):
            size = self._number(line)
            if size == -1:
                return Frame(404, b"", kind="null"), end
            if not 0 <= size <= MAX_BULK:
                raise GarbageReply(f"RESP bulk length {size} out of bounds", bytes(line))
            if len(self._buf) < end + size + 2:
                raise _Short
            if self._buf[end + size : end + size + 2] != b"\r\n":
                raise GarbageReply("a RESP bulk string not followed by CRLF", bytes(line))
            status = 400 if kind == b"!" else 200
            return Frame(status, bytes(self._buf[end : end + size]), kind="bulk"), end + size + 2
        if kind in (b"*", b"%", b"~", b">"):
            count = self._number(line)
            if count == -1:
                return Frame(404, b"", kind="null"), end
            if kind == b"%":
                count *= 2
            if not 0 <= count <= MAX_ITEMS or depth >= MAX_DEPTH:
                raise GarbageReply(f"RESP aggregate of {count} out of bounds", bytes(line))
            parts = []
            for _ in range(count):
                item, end = self._value(end, depth + 1)
                parts.append(item.body)
            return Frame(200, b" ".join(parts), kind="array"), end
        raise GarbageReply(f"not a RESP reply: {bytes(self._buf[pos : pos + 60])!r}", bytes(line))


class Resp(base.Protocol):
    name: ClassVar[str] = "resp"
    malformed_variants: ClassVar[tuple[str, ...]] = tuple(MALFORMED)
    tagged_replies: ClassVar[bool] = True

    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        return self._set_get(tag, tag.encode())

    def _set_get(self, tag: str, value: bytes) -> bytes:
        key = key_of(tag)
        return command(b"SET", key, value) + command(b"GET", key)

    def parser(self) -> RespParser:
        return RespParser()

    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        return self._set_get(tag, tag.encode() + b" " + b"x" * max(size - len(tag) - 1, 0))

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        raw = tag.encode()
        return MALFORMED[variant].replace(b"{n}", b"%d" % len(raw)).replace(b"{tag}", raw)
