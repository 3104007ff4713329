"""Newline-terminated echo: a request is one line holding the tag, its reply the same line."""

from __future__ import annotations

from typing import ClassVar

from afterclose.harness.protocols import base
from afterclose.harness.protocols.base import Frame, GarbageReply

MAX_LINE = 1 << 20

# Lines an echo server may refuse: control bytes, or bytes that are not UTF-8.
MALFORMED: dict[str, bytes] = {
    "nul": b"\x00{tag}\n",
    "control": b"\x01\x02\x1b[0m{tag}\n",
    "binary": b"\xff\xfe\x80{tag}\n",
}


class LineParser(base.ReplyParser):
    """One line per reply; a line longer than MAX_LINE bytes is no reply."""

    def next(self) -> Frame | None:
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > MAX_LINE:
                raise GarbageReply(f"no newline in {MAX_LINE} bytes", bytes(self._buf[:200]))
            return None
        line = bytes(self._buf[:end]).removesuffix(b"\r")
        del self._buf[: end + 1]
        return Frame(200, line, kind="line")


class Line(base.Protocol):
    name: ClassVar[str] = "line"
    malformed_variants: ClassVar[tuple[str, ...]] = tuple(MALFORMED)
    tagged_replies: ClassVar[bool] = True

    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        return tag.encode() + b"\n"

    def parser(self) -> LineParser:
        return LineParser()

    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        return tag.encode() + b" " + b"x" * max(size - len(tag) - 2, 0) + b"\n"

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        return MALFORMED[variant].replace(b"{tag}", tag.encode())
