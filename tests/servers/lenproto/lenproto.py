"""A length-prefixed binary protocol: a 4-byte big-endian length, then that many bytes."""

import struct

from afterclose.harness.protocols.base import Frame, GarbageReply, Protocol, ReplyParser


class LengthParser(ReplyParser):
    def next(self) -> Frame | None:
        size = struct.unpack("!I", self._buf[:4])[0] if len(self._buf) >= 4 else -1
        if size > 1 << 20:
            raise GarbageReply(f"a frame of {size} bytes", bytes(self._buf[:16]))
        if size < 0 or len(self._buf) < 4 + size:
            return None  # more bytes needed
        body = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        return Frame(200, body)


class LengthPrefixed(Protocol):
    name = "length-prefixed"
    malformed_variants = ("too-long", "short-header")
    tagged_replies = True  # the server echoes each payload: a reply must carry its tag

    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        return struct.pack("!I", len(tag)) + tag.encode()

    def parser(self) -> LengthParser:
        return LengthParser()

    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        return self.request(f"{tag} {'x' * size}", host, port)

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        return b"\xff\xff\xff\xff" if variant == "too-long" else b"\x00\x01"
