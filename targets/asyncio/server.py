"""A small HTTP/1.1 server on asyncio's protocols: the afterclose target ``asyncio``.

It answers ``GET <target>`` (any method, any path) with 200 and the body ``<target>\\n``, so the
harness can check that every answer belongs to its request (``echo_path``).  HTTP/1.1 keeps the
connection open unless the request says ``Connection: close``; HTTP/1.0 closes unless it says
``keep-alive``.  Pipelined requests are answered in order.  A malformed request gets a 4xx/5xx
with ``Connection: close``, after which the connection is closed once the answer is flushed.
After the client's FIN (half-close) every complete request already read is answered, then the
connection is closed.  An idle keep-alive connection is closed after ``--keepalive-timeout``.

The server runs one event loop in one thread; ``targets/uvloop/server.py`` runs the same code on
uvloop's loop.  ``python server.py --host H --port P --log-dir DIR`` prints ``READY`` once it
listens; SIGTERM/SIGINT close the listener and every connection, and it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import socket
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

SERVER_NAME = "afterclose-asyncio"
MAX_HEAD = 16 * 1024
MAX_BODY = 1 << 20
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/(\d)\.(\d)")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


class BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Request:
    __slots__ = ("keep_alive", "method", "target", "version")

    def __init__(self, method: str, target: str, version: str, keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.keep_alive = keep_alive


def parse_head(head: bytes) -> tuple[Request, int]:
    """One request head (without the blank line) -> the request and its body length."""
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadRequest(400, "malformed request line")
    method, target, major, minor = match.groups()
    if (major, minor) not in ((b"1", b"1"), (b"1", b"0")):
        raise BadRequest(505, "unsupported HTTP version")
    if not target.startswith(b"/"):
        raise BadRequest(400, "the request target is not an absolute path")
    connection: set[bytes] = set()
    length = 0
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            raise BadRequest(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key == b"connection":
            connection.update(v.strip().lower() for v in value.split(b","))
        elif key == b"content-length":
            if not value.isdigit():
                raise BadRequest(400, "bad Content-Length")
            length = int(value)
            if length > MAX_BODY:
                raise BadRequest(413, "body too large")
        elif key == b"transfer-encoding":
            raise BadRequest(501, "Transfer-Encoding is not supported")
    version = f"HTTP/{major.decode()}.{minor.decode()}"
    if version == "HTTP/1.1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection
    return Request(method.decode(), target.decode("latin-1"), version, keep_alive), length


def render(status: int, body: bytes, keep_alive: bool, server: str = SERVER_NAME) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Server: {server}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


class Logs:
    """Access and error log, line-buffered files in the workdir."""

    def __init__(self, log_dir: Path | None) -> None:
        self.access: TextIO | None = None
        self.error: TextIO = sys.stderr
        if log_dir is not None:
            self.access = (log_dir / "access.log").open("a", buffering=1)
            self.error = (log_dir / "error.log").open("a", buffering=1)

    def request(self, peer: str, line: str, status: int, size: int) -> None:
        if self.access is not None:
            stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
            self.access.write(f'{peer} - - [{stamp}] "{line}" {status} {size}\n')

    def note(self, text: str) -> None:
        self.error.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


class HttpProtocol(asyncio.Protocol):
    """One connection.  Everything happens in the loop's callbacks; nothing outlives
    ``connection_lost`` (the idle timer is cancelled there)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.body_left = 0
        self.closing = False
        self.peer = "-"
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = typing.cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "-"
        self.server.connections.add(self)
        self.arm_timer()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # answered with Connection: close already; the rest is ignored
        self.buf += data
        self.serve()
        self.arm_timer()

    def eof_received(self) -> bool:
        # Half-close: every complete request was answered in data_received() already; a
        # partial one never will be.  Returning False makes the transport close itself once
        # its write buffer is flushed, so the answers still reach the client.
        self.closing = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.connections.discard(self)
        self.transport = None

    def pause_writing(self) -> None:
        # Flow control: a client that pipelines without reading must not grow our buffer.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- request handling

    def arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        timeout = self.server.keepalive_s if not self.buf else self.server.request_s
        self.timer = self.server.loop.call_later(timeout, self.idle)

    def idle(self) -> None:
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def serve(self) -> None:
        transport = self.transport
        assert transport is not None
        out: list[bytes] = []
        while not self.closing:
            if self.body_left:
                skip = min(self.body_left, len(self.buf))
                del self.buf[:skip]
                self.body_left -= skip
                if self.body_left:
                    break
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    out.append(self.reject(BadRequest(431, "request head too large")))
                break
            if end > MAX_HEAD:
                out.append(self.reject(BadRequest(431, "request head too large")))
                break
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            try:
                request, self.body_left = parse_head(head)
            except BadRequest as exc:
                out.append(self.reject(exc))
                break
            body = f"{request.target}\n".encode("latin-1")
            out.append(render(200, body, request.keep_alive, self.server.name))
            line = f"{request.method} {request.target} {request.version}"
            self.server.logs.request(self.peer, line, 200, len(body))
            if not request.keep_alive:
                self.closing = True
        if out:
            transport.write(b"".join(out))
        if self.closing:
            # close() flushes what is buffered first, then closes the socket.
            transport.close()

    def reject(self, exc: BadRequest) -> bytes:
        self.closing = True
        self.buf.clear()
        self.server.logs.note(f"{self.peer}: {exc.status} {exc}")
        self.server.logs.request(self.peer, "-", exc.status, 0)
        return render(exc.status, f"{exc}\n".encode(), False, self.server.name)


@dataclass(eq=False)
class Server:
    name: str
    loop: asyncio.AbstractEventLoop
    logs: Logs
    keepalive_s: float
    request_s: float
    connections: set[HttpProtocol] = field(default_factory=set)


def listen_socket(host: str, port: int) -> socket.socket:
    # Made here rather than by create_server(host, port): that would resolve the host with
    # getaddrinfo() in the default executor, starting a thread the server does not need.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace, name: str, loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    logs = Logs(args.log_dir)
    state = Server(name, loop, logs, args.keepalive_timeout, args.request_timeout)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: HttpProtocol(state), sock=listen_socket(args.host, args.port)
    )
    logs.note(f"{name} ({loop_name}) listening on {args.host}:{args.port}")
    print("READY", flush=True)
    await stop.wait()
    # A second SIGTERM or SIGINT may follow the first (a runner that signals the process
    # group and then its members, a user's Ctrl-C during the stop).  Closing the loop below
    # restores the default action, which would let that one kill us mid-shutdown: block both
    # signals instead (a pending blocked signal is discarded when the process exits).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    logs.note("stopping")
    server.close()
    for conn in list(state.connections):
        if conn.transport is not None:
            conn.transport.abort()
    await server.wait_closed()
    await asyncio.sleep(0)  # let the aborted transports run connection_lost()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-dir", type=Path, default=None, help="access.log, error.log here")
    parser.add_argument("--keepalive-timeout", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    return parser.parse_args(argv)


def main(
    argv: list[str] | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
    loop_name: str = "asyncio",
    name: str = SERVER_NAME,
) -> int:
    args = parse_args(argv)
    with (
        asyncio.Runner(loop_factory=loop_factory) as runner,
        contextlib.suppress(KeyboardInterrupt),
    ):
        runner.run(serve(args, name, loop_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
