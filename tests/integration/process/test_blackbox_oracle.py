"""Each black-box rule on a real small server that violates it, and on one that does not.

The servers are ``tests/servers/misbehave.c`` in its modes; faults come from the fault
registry, exactly as the built-in suite uses them.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import capabilities
import pytest
from misbehave import misbehave_manifest

from afterclose.harness.session import Harness, Outcome, Settings


def harness_for(tmp_path: Path, mode: str) -> Harness:
    manifest = misbehave_manifest(tmp_path, mode)
    settings = Settings(
        target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex, tracer="off"
    )
    return Harness(settings)


def judge(tmp_path: Path, mode: str, fault: str, **params: object) -> Outcome:
    harness = harness_for(tmp_path, mode)
    with harness.start(tmp_path / "run", f"test-{mode}") as run:
        run.run_fault(fault, **params)
        return run.finish()


def rules(outcome: Outcome) -> set[str]:
    return {v.rule for v in outcome.violations}


KEEPALIVE = {
    "rate_per_s": 200,
    "concurrency": 5,
    "duration_s": 0.5,
    "max_connections": 30,
    "mix": {"keepalive": 1},
}
# Misdirected or unsolicited bytes are seen by clients that read until the close, or that
# wait quietly, not by one busy with its next request.
MIXED = {**KEEPALIVE, "mix": {"keepalive": 1, "close": 1, "idle_drop": 1}}
# A response sent to the wrong connection needs connections open at the same time: the
# crosstalk server misdirects to the connection it served before only while that one is still
# open, and the compiled engine is through with each connection before the server serves the
# next (on a quiet machine it never misdirected once), so these clients are asyncio's.
OVERLAPPING = {
    **MIXED,
    "rate_per_s": 2000,
    "concurrency": 20,
    "max_connections": 300,
    "engine": "asyncio",
}


@pytest.mark.parametrize(
    ("mode", "fault", "params", "rule"),
    [
        ("crash", "connection_storm", KEEPALIVE, "crash"),
        ("exit", "connection_storm", KEEPALIVE, "crash"),
        ("hang", "connection_storm", KEEPALIVE, "liveness"),
        ("crosstalk", "connection_storm", OVERLAPPING, "cross-talk"),
        ("double-response", "connection_storm", MIXED, "cross-talk"),
        ("unsolicited", "connection_storm", MIXED, "cross-talk"),
        ("wrong-body", "connection_storm", MIXED, "cross-talk"),
        ("leak", "half_close", {"connections": 10, "concurrency": 2}, "fd-leak"),
        ("drop", "connection_storm", {**KEEPALIVE, "max_connections": 60}, "dropped-request"),
        ("spin", "half_close", {"connections": 2, "concurrency": 1}, "busy-loop"),
    ],
)
def test_rule_fires_on_violating_server(
    tmp_path: Path, mode: str, fault: str, params: dict[str, object], rule: str
) -> None:
    outcome = judge(tmp_path, mode, fault, **params)
    assert rule in rules(outcome), [v.render() for v in outcome.violations]


@pytest.mark.parametrize(
    ("fault", "params"),
    [
        ("connection_storm", KEEPALIVE),
        ("half_close", {"connections": 10, "concurrency": 2}),
        ("reset_peer", {"phase": "after-request", "connections": 20, "concurrency": 4}),
        ("shutdown_race", {"connections": 30, "concurrency": 4}),
    ],
)
def test_correct_server_has_no_violation(
    tmp_path: Path, fault: str, params: dict[str, object]
) -> None:
    outcome = judge(tmp_path, "none", fault, **params)
    assert outcome.ok, [v.render() for v in outcome.violations]


def test_closing_between_keepalive_requests_is_no_dropped_request(tmp_path: Path) -> None:
    """The server answers each request and closes before the next one arrives: the next
    request races a close the server made first, which is no dropped request."""
    params = {**KEEPALIVE, "max_connections": 60, "mix": {"keepalive": 1, "slow_sender": 1}}
    outcome = judge(tmp_path, "close-between", "connection_storm", **params)
    assert outcome.ok, [v.render() for v in outcome.violations]
    assert outcome.reports[0].counts["responses"] > 0


def test_crash_quotes_sanitizer_report(tmp_path: Path) -> None:
    harness = harness_for(tmp_path, "crash")
    harness = Harness(
        Settings(
            target=harness.settings.target,
            rootdir=tmp_path,
            run_id=uuid.uuid4().hex,
            tracer="off",
            sanitize="address",
        )
    )
    with harness.start(tmp_path / "run", "asan") as run:
        run.run_fault("connection_storm", **KEEPALIVE)
        outcome = run.finish()
    crash = [v for v in outcome.violations if v.rule == "crash"]
    assert crash, [v.render() for v in outcome.violations]
    assert "ERROR: AddressSanitizer" in crash[0].details


def test_fd_leak_counts_close_wait(tmp_path: Path) -> None:
    outcome = judge(tmp_path, "leak", "half_close", connections=6, concurrency=1)
    leak = [v for v in outcome.violations if v.rule == "fd-leak"]
    assert leak and "CLOSE_WAIT" in leak[0].details
    assert leak[0].count >= 6


TCP_REPAIR = 19  # linux/tcp.h


def connect_idle(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


@capabilities.requires("root")  # TCP_REPAIR needs CAP_NET_ADMIN
def test_fd_leak_sets_aside_connections_stranded_by_the_network(tmp_path: Path) -> None:
    # A socket in repair mode closes without sending FIN or RST (CRIU relies on this), so the
    # client's end vanishes while the server's kernel still calls the connection live: what a
    # lost FIN or RST leaves behind.  A client that is merely still connected is not stranded.
    harness = harness_for(tmp_path, "none")
    with harness.start(tmp_path / "run", "stranded") as run:
        port = run.server.port
        gone = [connect_idle(port) for _ in range(3)]
        for sock in gone:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            sock.close()
        outcome = run.finish()
    assert outcome.ok, [v.render() for v in outcome.violations]
    assert any("3 connection(s) still ESTABLISHED" in w for w in outcome.warnings), outcome.warnings

    with harness.start(tmp_path / "run2", "still-connected") as run:
        port = run.server.port
        gone = [connect_idle(port) for _ in range(2)]
        live = connect_idle(port)
        for sock in gone:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            sock.close()
        try:
            outcome = run.finish()
        finally:
            live.close()
    leak = [v for v in outcome.violations if v.rule == "fd-leak"]
    assert leak and leak[0].count == 1, [v.render() for v in outcome.violations]
    assert "2 ESTABLISHED with the client's end gone" in leak[0].details
    assert any("2 connection(s) still ESTABLISHED" in w for w in outcome.warnings), outcome.warnings
