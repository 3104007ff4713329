"""The faults, their registry and the shared HTTP client, against real servers on loopback."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping

import pytest
from paths import TESTS_DIR
from pyservers import EchoServer

from afterclose import faults
from afterclose.faults.base import Endpoint, FaultReport
from afterclose.harness.client.observations import who
from afterclose.harness.errors import ScenarioError
from afterclose.harness.oracle.evidence import (
    FOREIGN_ANSWER,
    UNDER_DELIVERED,
    UNSOLICITED_BYTES,
    Observation,
)
from afterclose.harness.protocols import base as proto
from afterclose.harness.protocols import http

HOST = "127.0.0.1"
CROSS_TALK_KINDS = (UNSOLICITED_BYTES, FOREIGN_ANSWER)


def run_fault(
    name: str,
    params: Mapping[str, object],
    port: int,
    *,
    seed: int = 1,
    echo_path: bool = True,
    budget_s: float = 10.0,
) -> FaultReport:
    fault = faults.create(name, params, where="test_faults.py")
    endpoint = Endpoint(HOST, port, echo_path=echo_path, io_timeout_s=2.0)
    return fault.run(endpoint, random.Random(seed), time.monotonic() + budget_s)


def cross_talk(report: FaultReport) -> list[Observation]:
    return [o for o in report.observations if o.kind in CROSS_TALK_KINDS]


@pytest.fixture
def serve() -> Iterator[Callable[..., EchoServer]]:
    """Start in-process servers (``serve(mode)``); all are stopped at teardown."""
    started: list[EchoServer] = []

    def start(mode: str = "ok") -> EchoServer:
        server = EchoServer(mode, HOST).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def fast_server() -> Iterator[int]:
    """The same server in its own process, so it does not share the GIL with the clients."""
    script = TESTS_DIR / "pyservers.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--host", HOST], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the port, printed once listening
        assert line.strip().isdigit(), f"server did not start: {line!r}"
        yield int(line)
    finally:
        proc.terminate()
        proc.wait(timeout=5)


# --------------------------------------------------------------------------- protocols


def test_parser_content_length_pipelined_and_leftovers() -> None:
    p = http.ResponseParser()
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    p.feed(one + one[:10])
    r = p.next()
    assert r is not None and (r.status, r.body, r.keep_alive) == (200, b"abc", True)
    assert p.next() is None and p.buffered == one[:10]
    p.feed(one[10:] + b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert p.next() == r
    last = p.next()
    assert last is not None and last.status == 204 and not last.keep_alive
    assert p.buffered == b""


def test_parser_chunked_and_until_eof() -> None:
    p = http.ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n")
    assert p.next() is None
    p.feed(b"0\r\nTrailer: 1\r\n\r\nHTTP/1.0 200 OK\r\n\r\nto the end")
    r = p.next()
    assert r is not None and r.body == b"abcde"
    assert p.next() is None  # no length: the body ends at EOF
    p.feed_eof()
    r = p.next()
    assert r is not None and r.body == b"to the end" and r.version == "HTTP/1.0"


@pytest.mark.parametrize(
    "data",
    [b"SSH-2.0-x\r\n", b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"],
)
def test_parser_rejects_garbage(data: bytes) -> None:
    p = http.ResponseParser()
    p.feed(data)
    with pytest.raises(proto.GarbageReply):
        p.next()


def test_paths_are_unique_and_echo_is_exact() -> None:
    gen = proto.Tags("abc1")
    assert gen.tag(3, 0) == "/ac/abc1/3/0"
    assert proto.parse_tag("/ac/abc1/3/10") == ("abc1", 3, 10)
    assert proto.parse_tag("/other") is None
    assert proto.carries(b"/ac/abc1/1/1\n", "/ac/abc1/1/1")
    assert not proto.carries(b"/ac/abc1/1/10\n", "/ac/abc1/1/1")
    assert proto.new_run_id() != proto.new_run_id()
    assert http.build_get("/x", "::1", 80, close=True) == (
        b"GET /x HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n"
    )


def test_get_and_its_three_failures(serve: Callable[..., EchoServer]) -> None:
    ok = serve()
    r = http.get(HOST, ok.port, "/hello", timeout_s=2)
    assert (r.status, r.body) == (200, b"/hello\n")

    with pytest.raises(proto.NoAnswer) as no_answer:
        http.get(HOST, serve("silent_close").port, "/x", timeout_s=2)
    assert not no_answer.value.reset

    # A listener nobody accepts from: the kernel completes the handshake, nobody answers.
    with socket.create_server((HOST, 0)) as mute, pytest.raises(proto.ReplyTimeout):
        http.get(HOST, mute.getsockname()[1], "/x", timeout_s=0.3)

    with socket.create_server((HOST, 0)) as liar:

        def answer() -> None:
            conn, _ = liar.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")
                conn.recv(1024)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(proto.GarbageReply):
            http.get(HOST, liar.getsockname()[1], "/x", timeout_s=2)
        t.join(timeout=3)

    with socket.create_server((HOST, 0)) as gone:
        port = gone.getsockname()[1]
    with pytest.raises(proto.ConnectFailed):
        http.get(HOST, port, "/x", timeout_s=1)


# --------------------------------------------------------------------------- reset_peer


def test_reset_after_request_is_a_reset_the_server_sees(serve: Callable[..., EchoServer]) -> None:
    server = serve()
    report = run_fault("reset_peer", {"connections": 20, "phase": "after-request"}, server.port)
    assert report.counts["connections"] == 20
    assert report.counts["requests"] == 20
    assert report.counts["rst_sent"] == 20
    assert report.counts["closed_without_answer"] == 0  # we reset them on purpose
    assert report.observations == []
    records = server.wait_ended(20)
    assert len(records) == 20
    # The RST arrives after the request: the server reads it, then ECONNRESET (never EOF).
    assert {r.end for r in records} <= {"reset", "eof"}, Counter(r.end for r in records)
    assert all(len(r.requests) <= 1 for r in records)


@pytest.mark.parametrize("phase", ["before-request", "mid-request", "mid-response"])
def test_reset_phases(serve: Callable[..., EchoServer], phase: str) -> None:
    server = serve()
    report = run_fault("reset_peer", {"connections": 12, "phase": phase}, server.port)
    assert report.counts["connections"] == 12
    assert report.counts["rst_sent"] == 12
    assert report.observations == []
    records = server.wait_ended(12)
    assert {r.end for r in records} <= {"reset", "eof"}
    if phase == "before-request":
        assert report.counts["requests"] == 0
        assert all(r.requests == [] for r in records)
    elif phase == "mid-request":
        assert report.counts["partial_requests"] == 12
        assert all(r.requests == [] and r.bad_requests == 0 for r in records)
    else:
        assert report.counts["requests"] >= 24  # 2-8 pipelined each
        assert all(len(r.requests) <= 8 for r in records)


# --------------------------------------------------------------------------- half_close


def test_half_close_gets_every_answer(serve: Callable[..., EchoServer]) -> None:
    server = serve()
    params = {"connections": 20, "requests_per_connection": 3, "concurrency": 5}
    report = run_fault("half_close", params, server.port)
    assert report.counts["requests"] == 60
    assert report.counts["responses"] == report.counts["status:200"] == 60
    assert report.counts["fin_sent"] == report.counts["closed_by_peer"] == 20
    assert report.counts["closed_without_answer"] == 0
    assert report.observations == []
    records = server.wait_ended(20)
    assert [r.end for r in records] == ["eof"] * 20
    assert sum(len(r.requests) for r in records) == 60


def test_half_close_counts_requests_closed_without_answer(
    serve: Callable[..., EchoServer],
) -> None:
    server = serve("silent_close")
    report = run_fault("half_close", {"connections": 5, "requests_per_connection": 2}, server.port)
    # A request written after the server closed may be refused by the server's kernel with a
    # RST: then it was never a whole request.  Every whole one is counted unanswered.
    assert report.counts["requests"] >= 5
    assert report.counts["closed_without_answer"] == report.counts["requests"]
    assert report.counts["responses"] == 0
    assert report.observations == []


# --------------------------------------------------------------------------- shutdown_race


def test_shutdown_race_fin_malformed_requests_get_400(serve: Callable[..., EchoServer]) -> None:
    server = serve()
    params = {"connections": 20, "close_mode": "fin", "valid_first_ratio": 0.5}
    report = run_fault("shutdown_race", params, server.port)
    c = report.counts
    assert c["malformed_sent"] == c["fin_sent"] == 20
    assert c["malformed_answered"] + c["malformed_closed"] == 20
    assert c["status:400"] == c["malformed_answered"] == 20  # this server always answers
    assert c["status:200"] == c["requests"]  # the valid requests sent first
    assert c["closed_without_answer"] == 0
    assert report.observations == []
    records = server.wait_ended(20)
    assert all(r.bad_requests == 1 for r in records)


def test_shutdown_race_rst(serve: Callable[..., EchoServer]) -> None:
    server = serve()
    report = run_fault("shutdown_race", {"connections": 20, "close_mode": "rst"}, server.port)
    assert report.counts["malformed_sent"] == report.counts["rst_sent"] == 20
    assert report.observations == []
    records = server.wait_ended(20)
    # Either the RST won (reset) or the server's 400-and-close did.
    assert {r.end for r in records} <= {"reset", "eof", "server-close"}


# --------------------------------------------------------------------------- cross-talk


STORM_SMALL: dict[str, object] = {"rate_per_s": 400, "duration_s": 0.1, "concurrency": 8}


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("reset_peer", {"connections": 20}),
        ("half_close", {"connections": 10}),
        ("shutdown_race", {"connections": 20}),
        ("connection_storm", STORM_SMALL),
    ],
)
def test_no_cross_talk_against_a_correct_server(
    serve: Callable[..., EchoServer], name: str, params: dict[str, object]
) -> None:
    report = run_fault(name, params, serve().port)
    assert report.counts["connections"] >= 10
    assert report.observations == [], report.observations


@pytest.mark.parametrize("echo_path", [True, False])
def test_double_response_is_cross_talk(serve: Callable[..., EchoServer], echo_path: bool) -> None:
    server = serve("double")
    params = {"connections": 4, "requests_per_connection": 2}
    report = run_fault("half_close", params, server.port, echo_path=echo_path)
    assert len(cross_talk(report)) >= 4, report.observations
    keepalive = {**STORM_SMALL, "mix": {"keepalive": 1}}
    report = run_fault("connection_storm", keepalive, server.port, echo_path=echo_path)
    found = cross_talk(report)
    assert found, report.summary()
    if not echo_path:
        assert "no request outstanding" in found[0].detail


def test_unsolicited_bytes_are_cross_talk(serve: Callable[..., EchoServer]) -> None:
    server = serve("unsolicited")
    report = run_fault("connection_storm", {**STORM_SMALL, "mix": {"idle_drop": 1}}, server.port)
    found = cross_talk(report)
    # The server (a thread of this process) must accept and write within the 1-10 ms each
    # client idles; with the storm's worker processes and xdist sharing two cores it misses
    # some of them.
    assert len(found) >= report.counts["connections"] // 4 > 0
    assert "before sending any request" in found[0].detail


# Four idle connections (two after one request, by seed 1) held past the server's 0.3 s.
IDLE_NOTICED: dict[str, object] = {
    "idle_connections": 4,
    "hold_s": 1.0,
    "request_ratio": 0.5,
    "rate_per_s": 1,
    "mix": {"keepalive": 1},
}


def test_a_408_then_the_close_of_an_idle_connection_is_no_cross_talk(
    serve: Callable[..., EchoServer],
) -> None:
    server = serve("idle_408")
    report = run_fault("idle_hold", IDLE_NOTICED, server.port)
    assert report.counts["idle_closed_by_server"] == 4
    # The one churn connection draws a notice too if a loaded machine stalls it for 0.3 s.
    assert report.counts["close_notices"] >= 4
    assert report.observations == []


def test_a_408_on_a_connection_that_stays_open_is_unasked_for(
    serve: Callable[..., EchoServer],
) -> None:
    server = serve("idle_408_open")
    report = run_fault("idle_hold", IDLE_NOTICED, server.port)
    found = cross_talk(report)
    held = {who("idle_hold", i) for i in range(4)}  # the plan puts them first
    assert held <= {o.who for o in found} and "close_notices" not in report.counts
    assert all(b"408 Request Time-out" in o.data for o in found)


def test_wrong_body_is_cross_talk_only_when_the_target_echoes(
    serve: Callable[..., EchoServer],
) -> None:
    server = serve("wrong_body")
    params = {"connections": 3, "requests_per_connection": 2}
    report = run_fault("half_close", params, server.port, echo_path=True)
    found = cross_talk(report)
    assert len(found) == 6
    assert any("carries the answer to /ac/" in a.detail for a in found), found
    assert run_fault("half_close", params, server.port, echo_path=False).observations == []


# --------------------------------------------------------------------------- replay


REPLAYABLE: list[tuple[str, dict[str, object]]] = [
    ("reset_peer", {"connections": 20}),
    ("half_close", {"connections": 20}),
    ("shutdown_race", {"connections": 20}),
    ("connection_storm", {"rate_per_s": 1000, "duration_s": 5, "max_connections": 30}),
]


@pytest.mark.parametrize(("name", "params"), REPLAYABLE)
def test_same_seed_same_schedule(
    serve: Callable[..., EchoServer], name: str, params: dict[str, object]
) -> None:
    server = serve()
    first = run_fault(name, params, server.port, seed=7)
    again = run_fault(name, params, server.port, seed=7)
    other = run_fault(name, params, server.port, seed=8)
    assert first.schedule == again.schedule
    assert first.schedule != other.schedule
    fault = faults.create(name, params, "test")
    assert fault.schedule(random.Random(7)) == first.schedule
    assert len(first.schedule) in (20, 30)


def test_schedule_does_not_depend_on_timing(serve: Callable[..., EchoServer]) -> None:
    server = serve()
    params: dict[str, object] = {"rate_per_s": 100, "duration_s": 1, "max_connections": 40}
    full = run_fault("connection_storm", params, server.port, seed=3)
    cut = run_fault("connection_storm", params, server.port, seed=3, budget_s=0.1)
    assert cut.counts["not_started"] > 0
    assert cut.schedule == full.schedule and len(full.schedule) == 40


# --------------------------------------------------------------------------- parameters, registry


def test_unknown_parameter_suggests_the_close_match() -> None:
    with pytest.raises(ScenarioError) as err:
        faults.create("reset_peer", {"conections": 5}, where="scenarios.toml [smoke]")
    e = err.value
    assert e.where == "scenarios.toml [smoke]"
    assert "conections" in e.message and "connections, concurrency, phase" in e.message
    assert e.hint is not None and "did you mean 'connections'" in e.hint


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("reset_peer", {"connections": "10"}, ["'connections'", "'10'", "1..100000"]),
        ("reset_peer", {"connections": 0}, ["'connections'", "= 0", "1..100000"]),
        ("reset_peer", {"concurrency": True}, ["'concurrency'", "True"]),
        ("reset_peer", {"phase": "after_request"}, ["'phase'", "after_request"]),
        ("shutdown_race", {"valid_first_ratio": 1.5}, ["valid_first_ratio", "0..1"]),
        ("connection_storm", {"rate_per_s": -1}, ["'rate_per_s'", "-1", "0.1..100000"]),
        ("connection_storm", {"mix": {"keepalve": 1}}, ["'keepalve'", "keepalive"]),
        ("connection_storm", {"mix": {"close": -1}}, ["mix.close", "-1"]),
        ("connection_storm", {"mix": {"close": 0}}, ["weight > 0"]),
    ],
)
def test_bad_parameter_values(name: str, params: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ScenarioError) as err:
        faults.create(name, params, where="here")
    text = err.value.render()
    assert text.startswith("here: ")
    for word in words:
        assert word in text


def test_typo_in_a_choice_suggests_it() -> None:
    with pytest.raises(ScenarioError) as err:
        faults.create("reset_peer", {"phase": "after_request"}, where="w")
    assert err.value.hint is not None and "'after-request'" in err.value.hint


def test_direct_construction_is_validated_too() -> None:
    cls = faults.get("reset_peer")
    with pytest.raises(ScenarioError):
        cls(connections=0)  # type: ignore[call-arg]
    fault = faults.create("connection_storm", {"mix": {"close": 1}, "duration_s": 1}, "w")
    assert fault == faults.get("connection_storm")(mix={"close": 1.0}, duration_s=1.0)  # type: ignore[call-arg]


def test_registry() -> None:
    names = faults.available()
    assert {"connection_storm", "half_close", "reset_peer", "shutdown_race"} <= set(names)
    assert names == sorted(names) and "base" not in names
    assert not any(name.startswith("_") for name in names)
    for name in faults.available():
        cls = faults.get(name)
        assert cls.name == name and cls.describe_params()
    with pytest.raises(ScenarioError) as err:
        faults.get("reset_per", where="scenarios.toml")
    assert err.value.hint is not None and "did you mean 'reset_peer'" in err.value.hint
    assert "half_close" in err.value.hint
    with pytest.raises(ScenarioError):
        faults.get("base")


def test_report_merge_and_summary() -> None:
    a = FaultReport("reset_peer", Counter({"connections": 2}), schedule=["conn 0: rst x"])
    b = FaultReport("half_close", Counter({"connections": 3, "responses": 1}))
    seen = Observation(UNSOLICITED_BYTES, "conn 0 (half_close)", "boom")
    b.observe(seen)
    a.merge(b)
    assert a.fault == "reset_peer+half_close"
    assert a.counts == Counter({"connections": 5, "responses": 1})
    assert a.observations == [seen] and a.schedule == ["conn 0: rst x"]
    line = a.summary()
    assert "\n" not in line and line.startswith("reset_peer+half_close: connections=5")
    assert "unsolicited-bytes=1" in line


# --------------------------------------------------------------------------- storm


def test_storm_at_a_high_rate_sees_no_anomaly(fast_server: int) -> None:
    # The rate it reaches is measured by bench/storm_rate.py.
    params = {"rate_per_s": 3000, "duration_s": 1.0, "concurrency": 32}
    report = run_fault("connection_storm", params, fast_server, budget_s=5)
    assert report.counts["connections"] > 0
    # A loaded machine may start fewer than planned (an under-delivered observation, for the
    # incomplete-evidence rule): that is the client's shortfall, not an anomaly of the server.
    assert [o for o in report.observations if o.kind != UNDER_DELIVERED] == []


def test_storm_stops_by_its_deadline(fast_server: int) -> None:
    params = {"rate_per_s": 200, "duration_s": 30, "concurrency": 8}
    report = run_fault("connection_storm", params, fast_server, budget_s=0.5)
    # Ended by the budget, not by the storm's own 30 s: connections left unstarted.
    assert report.counts["not_started"] > 0
    # Connection i starts at i/rate: at most 101 fit before the half-second deadline.
    assert 1 <= report.counts["connections"] <= 101


def test_storm_stops_at_max_connections(fast_server: int) -> None:
    params = {"rate_per_s": 10_000, "duration_s": 5, "max_connections": 50}
    report = run_fault("connection_storm", params, fast_server)
    # The plan itself ends at the 50th connection: nothing is left to wait for.
    assert report.counts["connections"] == 50 and len(report.schedule) == 50
    assert report.counts["not_started"] == 0
