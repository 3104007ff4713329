"""The memcached text protocol.

A request is ``set <key> 0 0 <n>`` with the tag as data, then ``get <key>``, in one write; the
key is the connection's own (``afterclose:<run-id>-<conn#>``), so the value a GET returns must
be the tag just stored.  The parser folds the set's ``STORED`` into the get's reply.
"""

from __future__ import annotations

from typing import ClassVar

from afterclose.harness.protocols.base import Frame, GarbageReply
from afterclose.harness.protocols.keyvalue import Short, StoreFetch, StoreFetchParser

MAX_LINE = 2048  # a reply line: a 250-byte key and four numbers fit many times over
MAX_VALUE = 64 << 20

MALFORMED: dict[str, bytes] = {
    "unknown-command": b"afterclose-bad {tag}\r\n",
    # No data line follows: a server that cannot read the length cannot skip the data either,
    # and would answer the data line as a second command.
    "bad-length": b"set afterclose:bad 0 0 many\r\n",
    "long-key": b"get " + b"k" * 300 + b"\r\n",
    "binary": b"\x00\xff\xfe\r\n",
}

# Reply lines that are the whole reply, and their status.
_SINGLE: dict[bytes, int] = {
    b"STORED": 200,
    b"NOT_STORED": 409,
    b"EXISTS": 409,
    b"NOT_FOUND": 404,
    b"DELETED": 200,
    b"TOUCHED": 200,
    b"OK": 200,
    b"END": 404,  # a get of nothing
    b"ERROR": 400,
}


class MemcachedParser(StoreFetchParser):
    max_line = MAX_LINE
    too_long = "a memcached reply line too long"

    def is_stored(self, frame: Frame) -> bool:
        return frame.kind == "STORED"

    def reply(self, pos: int) -> tuple[Frame, int]:
        line, end = self.line(pos)
        word, _, rest = line.partition(b" ")
        if word in _SINGLE and not rest:
            return Frame(_SINGLE[word], b"", kind=word.decode()), end
        if word in (b"CLIENT_ERROR", b"SERVER_ERROR"):
            return Frame(400 if word == b"CLIENT_ERROR" else 500, rest, kind=word.decode()), end
        if word == b"VERSION":
            return Frame(200, rest, kind="VERSION"), end
        if line.isdigit():  # incr/decr
            return Frame(200, line, kind="number"), end
        if word != b"VALUE":
            raise GarbageReply(f"not a memcached reply: {line[:60]!r}", bytes(self._buf[:200]))
        body = bytearray()
        while True:
            fields = line.split(b" ")
            if fields[0] == b"END" and len(fields) == 1:
                return Frame(200, bytes(body), kind="VALUE"), end
            if fields[0] != b"VALUE" or len(fields) not in (4, 5) or not fields[3].isdigit():
                raise GarbageReply(f"bad memcached value line {line[:60]!r}", bytes(line))
            size = int(fields[3])
            if size > MAX_VALUE:
                raise GarbageReply(f"memcached value of {size} bytes", bytes(line))
            if len(self._buf) < end + size + 2:
                raise Short
            if self._buf[end + size : end + size + 2] != b"\r\n":
                raise GarbageReply("a memcached value not followed by CRLF", bytes(line))
            body += self._buf[end : end + size]
            line, end = self.line(end + size + 2)


class Memcached(StoreFetch):
    name: ClassVar[str] = "memcached"
    malformed_variants: ClassVar[tuple[str, ...]] = tuple(MALFORMED)
    tagged_replies: ClassVar[bool] = True

    def store_fetch(self, key: bytes, value: bytes) -> bytes:
        return b"set %s 0 0 %d\r\n%s\r\nget %s\r\n" % (key, len(value), value, key)

    def parser(self) -> MemcachedParser:
        return MemcachedParser()

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        return MALFORMED[variant].replace(b"{tag}", tag.encode())
