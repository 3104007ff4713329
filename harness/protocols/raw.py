"""Bytes only: for a server whose replies the harness cannot read.  Connection-level faults
(resets, half-closes, storms of connects) still apply; every check that needs a reply is
skipped with :attr:`Raw.no_replies_reason`, and liveness is "accepts a connection and keeps
it"."""

from __future__ import annotations

import socket
import ssl
import time
from typing import ClassVar

from afterclose.harness.protocols import base
from afterclose.harness.protocols.base import Frame

HOLD_S = 0.3


class RawParser(base.ReplyParser):
    """Whatever arrived is one reply: nothing can be told apart."""

    def next(self) -> Frame | None:
        if not self._buf:
            return None
        return Frame(200, self.take_buffered(), kind="bytes")


class Raw(base.Protocol):
    name: ClassVar[str] = "raw"
    malformed_variants: ClassVar[tuple[str, ...]] = ("binary",)
    has_replies: ClassVar[bool] = False
    no_replies_reason: ClassVar[str] = (
        "protocol 'raw': the harness cannot read this server's replies, so answers, "
        "cross-talk and malformed requests cannot be judged"
    )

    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        return tag.encode() + b"\n"

    def parser(self) -> RawParser:
        return RawParser()

    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        return tag.encode() + b"x" * max(size - len(tag), 0)

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        return b"\x00\xff\xfe" + tag.encode()

    def liveness_problem(self, host: str, port: int, timeout_s: float, *, tls: bool) -> str:
        try:
            sock = base.connect(host, port, timeout_s, tls=tls)
        except base.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"
        with sock:
            time.sleep(HOLD_S)
            sock.setblocking(False)
            try:
                # An SSL socket takes no recv() flags; a byte read there is not missed.
                data = sock.recv(1) if tls else sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, ssl.SSLWantReadError):
                return ""
            except OSError as exc:
                return f"the connection failed within {HOLD_S:g} s: {exc}"
            if not data:
                return f"the server closed a fresh connection within {HOLD_S:g} s"
        return ""
