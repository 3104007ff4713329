"""What the key-value protocols (``resp``, ``memcached``) share.

A request stores the tag under the connection's own key (``afterclose:<run-id>-<conn#>``) and
fetches it back, in one write: the fetch's value must be the tag just stored, so a value, or a
reply, that belongs to another connection is cross-talk.  The parser reads CRLF-ended lines and
folds the store's acknowledgement into the fetch's reply.
"""

from __future__ import annotations

import abc

from afterclose.harness.protocols import base
from afterclose.harness.protocols.base import Frame, GarbageReply


def key_of(tag: str) -> bytes:
    return f"afterclose:{base.session_of(tag)}".encode()


class Short(Exception):
    """More bytes are needed."""


class StoreFetchParser(base.ReplyParser):
    """One reply: a value read by :meth:`reply`, the store's acknowledgement skipped."""

    max_line: int
    too_long: str  # what a line longer than max_line is called in the error

    def next(self) -> Frame | None:
        try:
            first, end = self.reply(0)
            if self.is_stored(first):
                first, end = self.reply(end)
        except Short:
            return None
        del self._buf[:end]
        return first

    def line(self, pos: int) -> tuple[bytes, int]:
        """The line at ``pos`` without its CRLF, and where the next begins."""
        end = self._buf.find(b"\r\n", pos, pos + self.max_line)
        if end < 0:
            if len(self._buf) - pos > self.max_line:
                raise GarbageReply(self.too_long, bytes(self._buf[:200]))
            raise Short
        return bytes(self._buf[pos:end]), end + 2

    @abc.abstractmethod
    def reply(self, pos: int) -> tuple[Frame, int]:
        """The value at ``pos`` and where the next begins; raises :class:`Short`."""

    @abc.abstractmethod
    def is_stored(self, frame: Frame) -> bool:
        """Whether ``frame`` is the store's acknowledgement."""


class StoreFetch(base.Protocol):
    """A request is :meth:`store_fetch` of the tag under the connection's key."""

    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        return self.store_fetch(key_of(tag), tag.encode())

    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        value = tag.encode() + b" " + b"x" * max(size - len(tag) - 1, 0)
        return self.store_fetch(key_of(tag), value)

    @abc.abstractmethod
    def store_fetch(self, key: bytes, value: bytes) -> bytes:
        """The bytes that store ``value`` under ``key``, then fetch it."""
