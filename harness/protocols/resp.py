"""The Redis serialization protocol (RESP2, with RESP3's simple types read too).

A request is ``SET <key> <tag>`` then ``GET <key>`` in one write, where the key is the
connection's own (``afterclose:<run-id>-<conn#>``): the GET's bulk reply must be the tag just
set, so a value, or a reply, that belongs to another connection is cross-talk.  The parser
reads one value at a time and folds the SET's ``+OK`` into the GET's reply.
"""

from __future__ import annotations

from typing import ClassVar

from afterclose.harness.protocols.base import Frame, GarbageReply
from afterclose.harness.protocols.keyvalue import Short, StoreFetch, StoreFetchParser

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


class RespParser(StoreFetchParser):
    max_line = MAX_LINE
    too_long = "a RESP line longer than 64 KiB"

    def is_stored(self, frame: Frame) -> bool:
        return frame.kind == "simple" and frame.body == b"OK"  # the SET's answer

    def reply(self, pos: int) -> tuple[Frame, int]:
        return self._value(pos, 0)

    def _number(self, text: bytes) -> int:
        try:
            return int(text)
        except ValueError:
            raise GarbageReply(f"bad RESP length {text[:40]!r}", bytes(self._buf[:200])) from None

    def _value(self, pos: int, depth: int) -> tuple[Frame, int]:
        if pos >= len(self._buf):
            raise Short
        kind = bytes(self._buf[pos : pos + 1])
        line, end = self.line(pos + 1)
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
                raise Short
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


class Resp(StoreFetch):
    name: ClassVar[str] = "resp"
    malformed_variants: ClassVar[tuple[str, ...]] = tuple(MALFORMED)
    tagged_replies: ClassVar[bool] = True

    def store_fetch(self, key: bytes, value: bytes) -> bytes:
        return command(b"SET", key, value) + command(b"GET", key)

    def parser(self) -> RespParser:
        return RespParser()

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        raw = tag.encode()
        return MALFORMED[variant].replace(b"{n}", b"%d" % len(raw)).replace(b"{tag}", raw)
