"""Black-box tests of the built-in C targets (seed-buggy, seed-fixed) and tests/servers/misbehave.

Everything runs over real TCP on 127.0.0.1 against freshly started server processes; the
servers are built with ``afterclose.harness.compile`` (cached) with ``-Wextra -Werror`` so a
compiler warning fails the build.

How long the seed-buggy race takes to find is measured by bench/time_to_detect.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from paths import ROOT_DIR

from afterclose.harness.compile import CBuild, build

ROOT = ROOT_DIR
HOST = "127.0.0.1"
SOURCES = {
    "seed-buggy": ROOT / "targets" / "seed-buggy" / "seed_buggy.c",
    "seed-fixed": ROOT / "targets" / "seed-fixed" / "seed_fixed.c",
    "misbehave": ROOT / "tests" / "servers" / "misbehave.c",
}
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
SEEDS = ("seed-buggy", "seed-fixed")
ASAN_ERROR = "ERROR: AddressSanitizer"
# SO_LINGER {on, 0 s}: close() then discards the send queue and sends RST instead of FIN.
LINGER_RST = struct.pack("ii", 1, 0)
TCP_CLOSE_WAIT = "08"  # st column of /proc/net/tcp

Binaries = Callable[..., Path]


def build_server(name: str, sanitizer: str = "none") -> Path:
    return build(
        CBuild(
            name=name,
            sources=(SOURCES[name],),
            cflags=CFLAGS,
            ldflags=("-pthread",),
            sanitizer=sanitizer,
        )
    )


@pytest.fixture(scope="session")
def binaries() -> Binaries:
    built: dict[tuple[str, str], Path] = {}

    def get(name: str, sanitizer: str = "none") -> Path:
        if (name, sanitizer) not in built:
            built[(name, sanitizer)] = build_server(name, sanitizer)
        return built[(name, sanitizer)]

    return get


# ---- server processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, timeout: float = 5.0) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"READY\n" not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    return False
                seen += chunk
    return True


def start_server(binary: Path, args: tuple[str, ...], log_dir: Path) -> Server:
    last = ""
    for attempt in range(3):
        # The port was free a moment ago; another process may grab it before the server
        # binds, so a server that dies before READY is retried on a fresh port.
        port = free_port()
        stderr_path = log_dir / f"{binary.name}-{port}-{attempt}.stderr"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                [str(binary), HOST, str(port), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        server = Server(proc, port, stderr_path)
        if _wait_ready(proc, 10.0):
            return server
        server.stop()
        last = server.stderr()
    raise RuntimeError(f"{binary.name} did not print READY: {last}")


Launch = Callable[..., Server]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    servers: list[Server] = []

    def _launch(binary: Path, *args: str) -> Server:
        server = start_server(binary, args, tmp_path)
        servers.append(server)
        return server

    yield _launch
    for server in servers:
        server.stop()


def crashed(server: Server) -> bool:
    return not server.alive() or ASAN_ERROR in server.stderr()


def socket_fds(pid: int) -> int:
    count = 0
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(entry.path).startswith("socket:"):
                count += 1
        except FileNotFoundError:  # closed while we were listing
            pass
    return count


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def tcp_states(port: int) -> list[str]:
    """States of the IPv4 sockets whose local port is ``port`` (listener included)."""
    states = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.append(fields[3])
    return states


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        # the command name is in parentheses and may contain spaces
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime


# ---- HTTP client -----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, path: str, headers: str = "") -> None:
        self.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def response(self) -> Response:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed mid-response: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            if not self._fill():
                raise EOFError("connection closed mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        return Response(status, headers, body)

    def read_to_eof(self) -> bytes:
        """Everything until the peer closes; an RST counts as closing."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        data, self.buf = self.buf, b""
        return data

    def pending(self, wait: float) -> bytes:
        """Bytes that arrive within ``wait`` seconds (b"" if none; EOF/RST end early)."""
        self.sock.settimeout(wait)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            self._fill()
        data, self.buf = self.buf, b""
        return data

    def rst(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def get_ok(port: int, path: str) -> bool:
    try:
        with Client(port, timeout=2.0) as c:
            c.get(path)
            r = c.response()
            return r.status == 200 and path.encode() in r.body
    except (OSError, EOFError):
        return False


# ---- client behaviours for bursts ------------------------------------------------------------
# Each takes (port, n).  "Strict" behaviours assert the answer; the others only act.


def normal(port: int, n: int) -> None:
    with Client(port) as c:
        for k in range(2):
            c.get(f"/n{n}-{k}")
            r = c.response()
            assert r.status == 200 and r.body == f"/n{n}-{k}\n".encode(), r


def half_close(port: int, n: int) -> None:
    with Client(port) as c:
        c.get(f"/h{n}")
        c.sock.shutdown(socket.SHUT_WR)
        data = c.read_to_eof()
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(f"/h{n}\n".encode()), data


def malformed(port: int, n: int) -> None:
    with Client(port) as c:
        c.send(b"NOT A REQUEST\r\n\r\n")
        data = c.read_to_eof()
        assert data.startswith(b"HTTP/1.1 400 "), data


# The peer may already have answered or closed: resets and broken pipes are expected.
quiet = contextlib.suppress(OSError, EOFError)


def rst_before(port: int, n: int) -> None:
    c = Client(port)
    if n % 2:
        with quiet:
            c.send(b"GET /partial HT")
    c.rst()


def rst_after(port: int, n: int) -> None:
    c = Client(port)
    with quiet:
        c.get(f"/r{n}")
        if n % 2:
            c.pending(0.2)
    c.rst()


def malformed_rst(port: int, n: int) -> None:
    c = Client(port)
    with quiet:
        c.send(b"BAD REQUEST\r\n\r\n")
    c.rst()


def malformed_close(port: int, n: int) -> None:
    c = Client(port)
    with quiet:
        c.send(b"BAD REQUEST\r\n\r\n")
    c.close()


def pipelined_close(port: int, n: int) -> None:
    with Client(port) as c:
        c.send(b"".join(f"GET /p{n}-{k} HTTP/1.1\r\n\r\n".encode() for k in range(3)))
        with quiet:
            c.response()


Behaviour = Callable[[int, int], None]
STRICT: frozenset[Behaviour] = frozenset({normal, half_close, malformed})
MIXED: list[tuple[Behaviour, int]] = [
    (normal, 3),
    (half_close, 2),
    (malformed, 2),
    (rst_before, 2),
    (rst_after, 2),
    (malformed_rst, 1),
    (malformed_close, 1),
    (pipelined_close, 1),
]
# the seed-buggy race: a malformed request whose connection goes away while it is answered
RACE: list[tuple[Behaviour, int]] = [
    (malformed_rst, 4),
    (malformed_close, 3),
    (malformed, 1),
    (normal, 2),
]


@dataclass
class BurstResult:
    clients: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0


def burst(
    port: int,
    duration: float,
    mix: Sequence[tuple[Behaviour, int]],
    *,
    threads: int = 4,
    until: Callable[[], bool] | None = None,
) -> BurstResult:
    """Run clients from ``threads`` threads for ``duration`` s or until ``until()`` is true."""
    result = BurstResult()
    lock = threading.Lock()
    stop = threading.Event()
    behaviours = [b for b, _ in mix]
    weights = [w for _, w in mix]

    def run(seed: int) -> None:
        rnd = random.Random(seed)
        n = seed * 1_000_000
        while not stop.is_set():
            behaviour = rnd.choices(behaviours, weights)[0]
            n += 1
            try:
                behaviour(port, n)
                error = None
            except (OSError, EOFError, AssertionError) as exc:
                error = f"{behaviour.__name__}: {exc!r}" if behaviour in STRICT else None
            with lock:
                result.clients += 1
                if error:
                    result.errors.append(error)

    workers = [threading.Thread(target=run, args=(i + 1,), daemon=True) for i in range(threads)]
    start = time.monotonic()
    for w in workers:
        w.start()
    while time.monotonic() - start < duration and not (until is not None and until()):
        time.sleep(0.01)
    result.elapsed = time.monotonic() - start
    stop.set()
    for w in workers:
        w.join(10)
    return result


# ---- both seeds: HTTP behaviour --------------------------------------------------------------


@pytest.mark.parametrize("name", SEEDS)
def test_get_echoes_path(binaries: Binaries, launch: Launch, name: str) -> None:
    server = launch(binaries(name))
    with Client(server.port) as c:
        c.get("/abc")
        r = c.response()
    assert r.status == 200
    assert b"/abc" in r.body
    assert r.headers["content-type"] == "text/plain"


@pytest.mark.parametrize("name", SEEDS)
def test_keep_alive(binaries: Binaries, launch: Launch, name: str) -> None:
    server = launch(binaries(name))
    with Client(server.port) as c:
        c.get("/one")
        first = c.response()
        c.get("/two")
        second = c.response()
    assert (first.status, first.body) == (200, b"/one\n")
    assert (second.status, second.body) == (200, b"/two\n")


@pytest.mark.parametrize("name", SEEDS)
def test_pipelined_and_fragmented(binaries: Binaries, launch: Launch, name: str) -> None:
    server = launch(binaries(name))
    with Client(server.port) as c:
        c.send(b"GET /p1 HTTP/1.1\r\n\r\nGET /p2 HTTP/1.1\r\nX: y\r\n\r\nGET /p3 HTTP/1.1\r\n\r\n")
        bodies = [c.response().body for _ in range(3)]
        # the same request in pieces: the server must buffer until the blank line
        for piece in (b"GET /fr", b"ag HTTP/1.1\r", b"\nHost: x\r\n", b"\r\n"):
            c.send(piece)
            time.sleep(0.02)
        bodies.append(c.response().body)
        # a body announced by Content-Length is skipped, not parsed as the next request
        c.send(b"GET /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nXXXXXGET /after HTTP/1.1\r\n\r\n")
        bodies += [c.response().body, c.response().body]
    assert bodies == [b"/p1\n", b"/p2\n", b"/p3\n", b"/frag\n", b"/b\n", b"/after\n"]


@pytest.mark.parametrize("name", SEEDS)
def test_connection_close_honoured(binaries: Binaries, launch: Launch, name: str) -> None:
    server = launch(binaries(name))
    with Client(server.port) as c:
        c.get("/bye", "Connection: close\r\n")
        r = c.response()
        rest = c.read_to_eof()
    assert (r.status, r.body) == (200, b"/bye\n")
    assert rest == b""


@pytest.mark.parametrize("name", SEEDS)
def test_malformed_request_gets_400_and_close(
    binaries: Binaries, launch: Launch, name: str
) -> None:
    server = launch(binaries(name))
    with Client(server.port) as c:
        c.send(b"HELLO THERE\r\n\r\n")
        r = c.response()
        rest = c.read_to_eof()
    assert r.status == 400
    assert rest == b""


@pytest.mark.parametrize("name", SEEDS)
def test_sigterm_exits_zero(binaries: Binaries, launch: Launch, name: str) -> None:
    server = launch(binaries(name))
    idle = Client(server.port)  # an open keep-alive connection must not delay the exit
    try:
        idle.get("/idle")
        idle.response()
        # The epoll_wait timeout (300 ms) bounds how long the flag goes unnoticed; a server
        # waiting for its idle connections to close would never exit.
        assert server.terminate(timeout=30.0) == 0
    finally:
        idle.close()


# ---- seed-fixed: survives hostile clients, leaks nothing -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["none", "address"])
def test_seed_fixed_survives_mixed_burst(
    binaries: Binaries, launch: Launch, sanitizer: str
) -> None:
    server = launch(binaries("seed-fixed", sanitizer))
    baseline = socket_fds(server.pid)

    result = burst(server.port, 2.5, MIXED)

    assert server.alive(), server.stderr()
    assert result.clients > 0, result
    assert result.errors == [], result.errors[:5]
    assert get_ok(server.port, "/still-here")
    # every connection whose peer went away must have been closed
    assert wait_for(lambda: socket_fds(server.pid) == baseline, 2.0), (
        f"{socket_fds(server.pid)} sockets open, baseline {baseline}"
    )
    assert server.terminate() == 0
    stderr = server.stderr()
    assert ASAN_ERROR not in stderr, stderr
    assert "LeakSanitizer" not in stderr, stderr


def test_seed_fixed_slow_reader_gets_every_answer(binaries: Binaries, launch: Launch) -> None:
    server = launch(binaries("seed-fixed"))
    count = 3000
    requests = b"".join(f"GET /s{i} HTTP/1.1\r\n\r\n".encode() for i in range(count))
    with Client(server.port, timeout=10.0) as c:
        # far more than the socket buffers hold: the server must stop reading while its
        # answers are not being read, and carry on when they are
        sender = threading.Thread(target=c.send, args=(requests,))
        sender.start()
        time.sleep(0.3)
        bodies = [c.response().body for _ in range(count)]
        sender.join(10)
    assert bodies == [f"/s{i}\n".encode() for i in range(count)]


def test_seed_fixed_backs_off_on_emfile(binaries: Binaries, launch: Launch) -> None:
    server = launch(binaries("seed-fixed"))
    baseline = socket_fds(server.pid)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (32, 32))
    clients = [Client(server.port) for _ in range(48)]
    try:
        # the pending connections stay in the backlog; a server that keeps its
        # level-triggered listener armed would burn a whole CPU calling accept()
        assert wait_for(lambda: "pausing accepts" in server.stderr(), 2.0), server.stderr()
        before = cpu_ticks(server.pid)
        time.sleep(1.0)
        spent = (cpu_ticks(server.pid) - before) / os.sysconf("SC_CLK_TCK")
        assert spent < 0.1, f"{spent:.2f} s of CPU in 1 s while out of fds"
    finally:
        for c in clients:
            c.close()
    assert wait_for(lambda: get_ok(server.port, "/after-emfile"), 3.0)
    assert wait_for(lambda: socket_fds(server.pid) == baseline, 2.0)


# ---- seed-buggy: the race is real and quick to find ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", ["address", "none"])
def test_seed_buggy_race_is_found(
    binaries: Binaries,
    launch: Launch,
    sanitizer: str,
    record_property: Callable[[str, object], None],
) -> None:
    server = launch(binaries("seed-buggy", sanitizer))

    result = burst(server.port, 20.0, RACE, until=lambda: crashed(server))
    record_property("time_to_crash_s", round(result.elapsed, 3))
    assert crashed(server), f"no crash after {result.elapsed:.1f} s and {result.clients} clients"
    code = server.wait_exit(5.0)
    if sanitizer == "address":
        assert ASAN_ERROR in server.stderr()
        assert "heap-use-after-free" in server.stderr() or "double-free" in server.stderr()
    else:
        # glibc aborts on the double free (SIGABRT) or the stale pointer faults (SIGSEGV)
        assert code in (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS), code


def test_seed_buggy_is_fine_without_malformed_requests(binaries: Binaries, launch: Launch) -> None:
    # the bug lives in the error path only: hostile but well-formed traffic never hits it
    server = launch(binaries("seed-buggy", "address"))
    mix = [(normal, 3), (half_close, 2), (rst_before, 2), (rst_after, 2), (pipelined_close, 1)]
    result = burst(server.port, 1.0, mix)
    assert server.alive(), server.stderr()
    assert result.errors == [], result.errors[:5]
    assert ASAN_ERROR not in server.stderr()


# ---- misbehave: each mode shows its bug, "none" shows none -----------------------------------


def probe_crash(server: Server) -> bool:
    with Client(server.port) as c:
        for i in range(5):
            c.get(f"/c{i}")
            if i < 4:
                c.response()
    return server.wait_exit(1.0) == -signal.SIGSEGV


def probe_leak(server: Server) -> bool:
    with Client(server.port) as c:
        c.get("/l")
        c.response()
    # a correct server closes within microseconds of the FIN; give it ample time
    time.sleep(0.3)
    return TCP_CLOSE_WAIT in tcp_states(server.port)


def probe_crosstalk(server: Server) -> bool:
    a, b, c = Client(server.port), Client(server.port), Client(server.port)
    try:
        got = []
        for client, path in ((a, "/a"), (b, "/b"), (c, "/c")):
            client.get(path)
            got.append(client.pending(0.3))
        stray = b.pending(0.2)
        return b"/c\n" in got[1] + stray or not got[2].endswith(b"/c\n")
    finally:
        for client in (a, b, c):
            client.close()


def probe_double_response(server: Server) -> bool:
    with Client(server.port) as c:
        c.get("/d")
        c.response()
        return c.pending(0.3) != b""


def probe_unsolicited(server: Server) -> bool:
    with Client(server.port) as c:
        return c.pending(0.3) != b""


def probe_wrong_body(server: Server) -> bool:
    with Client(server.port) as c:
        c.get("/w")
        return c.response().body != b"/w\n"


def probe_hang(server: Server) -> bool:
    for i in range(3):
        assert get_ok(server.port, f"/h{i}")
    with Client(server.port) as c:
        c.get("/h3")
        answered = c.pending(1.0) != b""
    return not answered and server.alive()


def probe_exit(server: Server) -> bool:
    for i in range(3):
        assert get_ok(server.port, f"/e{i}")
    return server.wait_exit(1.0) == 3


PROBES: dict[str, Callable[[Server], bool]] = {
    "crash": probe_crash,
    "leak": probe_leak,
    "crosstalk": probe_crosstalk,
    "double-response": probe_double_response,
    "unsolicited": probe_unsolicited,
    "wrong-body": probe_wrong_body,
    "hang": probe_hang,
    "exit": probe_exit,
}


@pytest.mark.parametrize("mode", sorted(PROBES))
def test_misbehave_mode_shows_its_bug(binaries: Binaries, launch: Launch, mode: str) -> None:
    server = launch(binaries("misbehave"), mode)
    assert PROBES[mode](server)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_misbehave_none_is_clean(binaries: Binaries, launch: Launch, probe: str) -> None:
    server = launch(binaries("misbehave"), "none")
    assert not PROBES[probe](server)
    assert server.alive()
    assert get_ok(server.port, "/fine")


def test_misbehave_none_handles_rst_and_malformed(binaries: Binaries, launch: Launch) -> None:
    server = launch(binaries("misbehave"), "none")
    baseline = socket_fds(server.pid)
    for n in range(20):
        rst_after(server.port, n)
        rst_before(server.port, n)
        malformed(server.port, n)
    assert get_ok(server.port, "/ok")
    assert wait_for(lambda: socket_fds(server.pid) == baseline, 2.0)


def test_build_key_follows_local_headers(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "main.c").write_text(
        '#include "sub/a.h"\n#include <stdio.h>\nint main(void){return A;}\n'
    )
    (tmp_path / "sub" / "a.h").write_text('#include "b.h"\n')
    (tmp_path / "sub" / "b.h").write_text("#define A 0\n")
    spec = CBuild(name="hdr", sources=(tmp_path / "main.c",))
    before = spec.key("cc")
    (tmp_path / "sub" / "b.h").write_text("#define A 1\n")  # two includes deep
    assert spec.key("cc") != before
    built = build(spec)
    assert subprocess.run([str(built)], check=False).returncode == 1
