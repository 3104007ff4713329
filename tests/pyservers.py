"""A small selectors HTTP/1.1 server for the fault tests: correct, or misbehaving on purpose.

It answers ``GET <path> HTTP/1.x`` with 200 and the body ``<path>\\n`` (keep-alive, pipelining,
``Connection: close``); a malformed request gets 400 and a close; after the client's FIN it
answers what it already read and closes.  It records, per connection, the requests it read and
how the connection ended (``eof``: read returned 0; ``reset``: ECONNRESET/EPIPE; ``server-close``
after a 400 or ``Connection: close``; ``stopped``).

Modes: ``ok``; ``double`` (every answer twice); ``unsolicited`` (a response right after accept);
``wrong_body`` (the body is the previous request's path); ``silent_close`` (closes on a request, no
answer); ``idle_408`` (a connection quiet for ``IDLE_S`` gets a 408 and is closed: HTTP's notice
of an idle close); ``idle_408_open`` (the same 408, but the connection stays open).

Run as a script it serves in its own process (no GIL shared with the clients) and prints the
port on stdout: ``python pyservers.py [--mode MODE] [--host HOST]``.
"""

from __future__ import annotations

import argparse
import re
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MODES = ("ok", "double", "unsolicited", "wrong_body", "silent_close", "idle_408", "idle_408_open")
IDLE_S = 0.3
_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[^ ]*) HTTP/1\.([01])")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_MAX_HEAD = 16 * 1024


@dataclass
class ConnRecord:
    index: int
    requests: list[str] = field(default_factory=list)
    bad_requests: int = 0
    responses: int = 0
    end: str = ""


@dataclass
class _Conn:
    sock: socket.socket
    record: ConnRecord
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    close_after_flush: bool = False
    peer_eof: bool = False
    writing: bool = False
    quiet_since: float = field(default_factory=time.monotonic)
    noticed: bool = False


def _response(status: str, body: bytes, close: bool) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


class EchoServer:
    def __init__(self, mode: str = "ok", host: str = "127.0.0.1", record: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.mode = mode
        self.host = host
        self.record = record
        self._sel = selectors.DefaultSelector()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._records: list[ConnRecord] = []
        self._accepted = 0
        self._last_path = b"/ac/nobody/0/0"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> EchoServer:
        self._thread = threading.Thread(target=self.serve, name="echo-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def records(self) -> list[ConnRecord]:
        with self._lock:
            return list(self._records)

    def wait_for(
        self, done: Callable[[list[ConnRecord]], bool], timeout_s: float = 5.0
    ) -> list[ConnRecord]:
        """The records once ``done(records)`` holds, or after ``timeout_s`` anyway."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            recs = self.records()
            if done(recs):
                return recs
            time.sleep(0.01)
        return self.records()

    def wait_ended(self, count: int, timeout_s: float = 5.0) -> list[ConnRecord]:
        """The records once ``count`` connections were accepted and all of them ended."""
        return self.wait_for(lambda rs: len(rs) >= count and all(r.end for r in rs), timeout_s)

    # -- loop

    def serve(self) -> None:
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        try:
            while not self._stopping.is_set():
                for key, mask in self._sel.select(0.05):
                    if key.data is None:
                        self._accept()
                        continue
                    conn: _Conn = key.data
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if mask & selectors.EVENT_READ and conn.record.end == "":
                        self._read(conn)
                if self.mode.startswith("idle_408"):
                    self._notice_idle()
        finally:
            for key in list(self._sel.get_map().values()):
                if key.data is not None:
                    self._end(key.data, "stopped")
            self._sel.close()
            self._listener.close()

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            sock.setblocking(False)
            record = ConnRecord(self._accepted)
            self._accepted += 1
            if self.record:
                with self._lock:
                    self._records.append(record)
            conn = _Conn(sock, record)
            self._sel.register(sock, selectors.EVENT_READ, conn)
            if self.mode == "unsolicited":
                conn.outbuf += _response("200 OK", b"nobody asked\n", close=False)
                self._flush(conn)

    def _notice_idle(self) -> None:
        now = time.monotonic()
        for key in list(self._sel.get_map().values()):
            conn = key.data
            if conn is None or conn.record.end or conn.noticed or conn.outbuf or conn.inbuf:
                continue
            if now - conn.quiet_since >= IDLE_S:
                conn.noticed = True
                conn.outbuf += _response("408 Request Time-out", b"", close=True)
                conn.close_after_flush = self.mode == "idle_408"
                self._flush(conn)

    def _end(self, conn: _Conn, how: str) -> None:
        if conn.record.end:
            return
        conn.record.end = how
        self._sel.unregister(conn.sock)
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self._end(conn, "reset")
            return
        if not data:
            conn.peer_eof = True
            if not conn.outbuf:
                self._end(conn, "eof")
            else:
                # Level-triggered: a socket at EOF stays readable, so stop watching reads
                # while the last answers drain.
                self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
                conn.writing = True
            return
        conn.inbuf += data
        conn.quiet_since = time.monotonic()
        self._handle(conn)
        self._flush(conn)

    def _handle(self, conn: _Conn) -> None:
        while not conn.close_after_flush:
            head_end = conn.inbuf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(conn.inbuf) > _MAX_HEAD:
                    self._bad(conn)
                return
            head = bytes(conn.inbuf[:head_end])
            del conn.inbuf[: head_end + 4]
            lines = head.split(b"\r\n")
            m = _REQUEST_LINE.fullmatch(lines[0])
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, colon, value = line.partition(b":")
                if not colon or _TOKEN.fullmatch(name) is None:
                    m = None
                    break
                headers[name.lower()] = value.strip().lower()
            if m is None:
                self._bad(conn)
                return
            path = m.group(2)
            conn.record.requests.append(path.decode("latin-1"))
            connection = headers.get(b"connection", b"")
            close = b"close" in connection or (
                m.group(3) == b"0" and b"keep-alive" not in connection
            )
            if self.mode == "silent_close":
                conn.close_after_flush = True
                return
            body = path + b"\n"
            if self.mode == "wrong_body":
                # The classic cross-talk: the answer meant for the previous request.
                body, self._last_path = self._last_path + b"\n", path
            answer = _response("200 OK", body, close)
            conn.outbuf += answer * (2 if self.mode == "double" else 1)
            conn.record.responses += 1
            conn.close_after_flush = close

    def _bad(self, conn: _Conn) -> None:
        conn.record.bad_requests += 1
        conn.outbuf += _response("400 Bad Request", b"bad request\n", close=True)
        conn.record.responses += 1
        conn.close_after_flush = True
        conn.inbuf.clear()

    def _flush(self, conn: _Conn) -> None:
        if conn.record.end:
            return
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                sent = 0
            except (ConnectionResetError, BrokenPipeError):
                # EPIPE instead of ECONNRESET when the RST came after the client's FIN
                # (the kernel reports EPIPE for a reset in CLOSE_WAIT).
                self._end(conn, "reset")
                return
            del conn.outbuf[:sent]
        if conn.outbuf:
            if not conn.writing:
                self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
                conn.writing = True
            return
        if conn.close_after_flush:
            self._end(conn, "server-close")
        elif conn.peer_eof:
            self._end(conn, "eof")
        elif conn.writing:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            conn.writing = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="ok", choices=MODES)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    server = EchoServer(args.mode, args.host, record=False)
    print(server.port, flush=True)
    server.serve()  # until SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
