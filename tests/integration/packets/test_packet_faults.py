"""The packet-level faults (forged segments on loopback) against a real, traced target.

Each integration test runs one fault against ``seed-fixed`` under the LD_PRELOAD tracer and
then shows *from the server's side* that the forged segment did what it claims, by reading the
server's trace: a keep-alive connection that answered requests and then got EPOLLHUP|EPOLLERR
(forged RST), a ``read() == 0`` on a connection whose client never closed (forged FIN), an
accepted fd that was dead before its first operation (RST before accept), a connection whose
send buffer was full (EAGAIN on write) when the RST came (RST mid-response).  seed-fixed must
survive all of it: the run's outcome has no violations.

These tests send real packets, on ``lo`` only, and need root and scapy; the parameter and
environment checks do not.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import capabilities
import pytest

from afterclose import faults
from afterclose.faults import _capture
from afterclose.faults import _forging as fg
from afterclose.faults.base import Endpoint, FaultReport
from afterclose.harness.errors import ScenarioError
from afterclose.harness.session import Harness, Outcome, Settings, TargetRun
from afterclose.harness.trace.format import (
    EPOLLERR,
    EPOLLHUP,
    Op,
    Record,
    epoll_events_str,
)
from afterclose.harness.trace.reader import read_trace_dir

PACKET_FAULTS = ("forged_rst", "forged_fin", "rst_before_accept", "rst_mid_response")
ECONNRESET, EPIPE, EAGAIN = 104, 32, 11
HUP_ERR = EPOLLHUP | EPOLLERR  # 0x18

needs_root = capabilities.requires("root")  # raw sockets, TCP_REPAIR
needs_scapy = capabilities.requires("packets")
Test = TypeVar("Test", bound=Callable[..., None])


def packet_test(test: Test) -> Test:
    """Sends real packets on lo: root and scapy, else skipped with the reason."""
    for mark in (pytest.mark.root, needs_root, needs_scapy):
        test = mark(test)
    return test


# --------------------------------------------------------------------------- the server's view


@dataclass
class ServerConn:
    """One accepted connection as the server's trace shows it, from accept to close."""

    pid: int
    fd: int
    accept: Record
    ops: list[Record] = field(default_factory=list)  # READ, WRITE, EPOLL_EVENT, CLOSE
    closed: bool = False

    def io(self) -> list[Record]:
        return [r for r in self.ops if r.op in (Op.READ, Op.WRITE)]

    def answered(self) -> int:
        return sum(1 for r in self.ops if r.op == Op.WRITE and r.ret > 0)

    def hup_err(self) -> list[Record]:
        return [r for r in self.ops if r.op == Op.EPOLL_EVENT and r.events & HUP_ERR]

    def reset_io(self) -> list[Record]:
        return [r for r in self.io() if r.ret < 0 and r.err in (ECONNRESET, EPIPE)]

    def eof_reads(self) -> list[Record]:
        return [r for r in self.ops if r.op == Op.READ and r.ret == 0]

    def first(self) -> Record | None:
        """The first thing that happened to it after accept (a call or an event)."""
        return next((r for r in self.ops if r.op != Op.CLOSE), None)

    def describe(self) -> str:
        def one(r: Record) -> str:
            if r.op == Op.EPOLL_EVENT:
                return f"event {epoll_events_str(r.events)}"
            if r.op == Op.CLOSE:
                return "close"
            return f"{r.op.name.lower()}={r.ret}" + (f"/e{r.err}" if r.ret < 0 else "")

        return f"fd {self.fd}: " + ", ".join(one(r) for r in self.ops)


def server_conns(trace_dir: Path | None) -> list[ServerConn]:
    """The accepted connections in the order the server accepted them."""
    assert trace_dir is not None, "the run was not traced"
    trace = read_trace_dir(trace_dir)
    assert trace.complete, trace.warnings
    conns: list[ServerConn] = []
    by_fd: dict[tuple[int, int], ServerConn] = {}
    by_data: dict[tuple[int, int], ServerConn] = {}  # epoll data pointer -> connection

    # An fd number changes hands inside the calls: close() frees it between its entry and its
    # exit, and accept() takes it between its own.  Another thread's accept can therefore
    # start before a close and return the same number before that close returns; ordered by
    # accept's exit and close's entry, each close meets its own incarnation.  An event exists
    # from its epoll_wait's return: the epoll thread is often back inside epoll_wait, waiting
    # for the next event, before a worker reads the last one.
    def when(r: Record) -> int:
        return r.seq_out if r.op in (Op.ACCEPT, Op.EPOLL_EVENT) else r.seq_in

    for r in sorted(trace.records, key=when):
        key = (r.pid, r.fd)
        if r.op == Op.ACCEPT and r.ret >= 0:
            conn = ServerConn(r.pid, r.ret, r)
            conns.append(conn)
            by_fd[(r.pid, r.ret)] = conn
        elif r.op == Op.EPOLL_CTL and key in by_fd and r.flags in (1, 3):  # ADD, MOD
            by_data[(r.pid, r.data)] = by_fd[key]
        elif r.op == Op.EPOLL_EVENT and (r.pid, r.data) in by_data:
            target = by_data[(r.pid, r.data)]
            if not target.closed:
                target.ops.append(r)
        elif r.op in (Op.READ, Op.WRITE) and key in by_fd:
            by_fd[key].ops.append(r)
        elif r.op == Op.CLOSE and key in by_fd:
            conn = by_fd.pop(key)
            conn.ops.append(r)
            conn.closed = True
    return conns


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    root = tmp_path_factory.mktemp("packet-faults")
    return Harness(
        Settings(target="seed-fixed", rootdir=root, run_id=uuid.uuid4().hex, tracer="auto")
    )


@pytest.fixture
def target(harness: Harness, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TargetRun]:
    with harness.start(tmp_path / "run", request.node.name) as run:
        assert harness.tracer_mode == "preload", "these tests read the server's trace"
        yield run


def finish(run: TargetRun) -> tuple[Outcome, list[ServerConn]]:
    outcome = run.finish()
    assert outcome.ok, run.failure_message(outcome)
    return outcome, server_conns(outcome.trace_dir)


def fault_conns(conns: list[ServerConn], report: FaultReport) -> list[ServerConn]:
    """The server's side of the fault's connections: accepted first (the oracle's liveness
    request comes after the faults, and seed-fixed needs no readiness connection)."""
    n = report.counts["connections"]
    assert len(conns) > n, f"{len(conns)} accepted, the fault made {n} and the oracle 1"
    return conns[:n]


def show(conns: list[ServerConn]) -> str:
    return "\n".join(c.describe() for c in conns)


# --------------------------------------------------------------------------- forged_rst


@packet_test
def test_forged_rst_idle_resets_a_live_keepalive_connection(target: TargetRun) -> None:
    report = target.run_fault(
        "forged_rst", phase="idle", connections=4, concurrency=2, requests_before=2
    )
    c = report.counts
    assert c["rst_forged"] == 4 and c["rst_effective"] == 4, report.summary()
    # The client's kernel was told nothing: it saw no FIN or RST, and its next request met
    # the RST of a server kernel that no longer knows the connection.
    assert c["client_still_open"] == 4 and c["probe_reset"] == 4, report.summary()
    assert c["responses"] == 8 and not report.observations, report.summary()

    _, conns = finish(target)
    mine = fault_conns(conns, report)
    for conn in mine:
        # Live and keep-alive: both requests answered on it; then the RST surfaced as
        # EPOLLHUP|EPOLLERR, and seed-fixed closed it without touching it again.
        assert conn.answered() == 2, show(mine)
        assert conn.hup_err(), show(mine)
        after = conn.ops[conn.ops.index(conn.hup_err()[0]) + 1 :]
        assert [r.op for r in after] == [Op.CLOSE], show(mine)


@packet_test
def test_forged_rst_after_request_hits_the_server_mid_exchange(target: TargetRun) -> None:
    report = target.run_fault("forged_rst", phase="after-request", connections=6, concurrency=2)
    c = report.counts
    assert c["rst_effective"] == 6 and c["probe_reset"] == 6, report.summary()
    # The RST lands microseconds behind the request: the server either answered first (the
    # answer then reached the client) or not; both are counted, together 6.
    assert c["answered_before_rst"] + c["unanswered_after_rst"] == 6, report.summary()
    assert not report.observations

    _, conns = finish(target)
    mine = fault_conns(conns, report)
    for conn in mine:
        assert conn.hup_err() or conn.reset_io(), show(mine)
        assert conn.closed, show(mine)


@packet_test
def test_forged_rst_one_off_the_exact_seq_gets_a_challenge_ack(target: TargetRun) -> None:
    """RFC 5961 3.2: an in-window RST that is not exactly at rcv_nxt must not reset."""
    with _capture.Capture(target.port) as capture:
        report = target.run_fault(
            "forged_rst", phase="idle", connections=2, concurrency=1, seq_offset=1, observe_ms=50
        )
    c = report.counts
    assert c["rst_forged"] == 2 and c["rst_ignored"] == 2 and not c["rst_effective"]
    assert c["probe_answered"] == 2, report.summary()

    segments = capture.segments
    rsts = [s for s in segments if "R" in s.flags and s.dst_port == target.port]
    assert len(rsts) == 2, segments
    for rst in rsts:
        # The server's kernel answers with an ACK naming the sequence number it expected:
        # exactly one below the forged RST's.
        challenge = [
            s
            for s in segments[segments.index(rst) + 1 :]
            if s.src_port == target.port
            and s.dst_port == rst.src_port
            and s.flags == "A"
            and s.ack == (rst.seq - 1) % 2**32
        ]
        assert challenge, f"no challenge ACK for {rst}: {segments}"

    _, conns = finish(target)
    mine = fault_conns(conns, report)
    for conn in mine:
        assert not conn.hup_err() and not conn.reset_io(), show(mine)
        assert conn.answered() == 2, show(mine)  # the request before and the probe


# --------------------------------------------------------------------------- forged_fin


@packet_test
@pytest.mark.parametrize(("variant", "fins"), [("single", 1), ("duplicate", 2)])
def test_forged_fin_makes_the_server_read_eof_of_an_open_client(
    target: TargetRun, variant: str, fins: int
) -> None:
    # observe_ms only bounds the wait for the server to close: a loaded machine may be slow.
    report = target.run_fault(
        "forged_fin", variant=variant, connections=4, concurrency=2, observe_ms=3000
    )
    c = report.counts
    assert c["fin_forged"] == 4 * fins and c["fin_effective"] == 4, report.summary()
    assert c["server_closed"] == 4, report.summary()
    # The client never closed nor half-closed, and still believed the connection open after
    # the server closed its end (the server's FIN acknowledges a byte it never sent).
    assert not c["fin_sent"] and not c["rst_sent"]
    assert c["client_still_open"] == 4 and c["probe_reset"] == 4, report.summary()

    _, conns = finish(target)
    mine = fault_conns(conns, report)
    for conn in mine:
        assert conn.answered() == 1, show(mine)
        eof = conn.eof_reads()
        assert eof, show(mine)
        # read() == 0 after the answer, with no RST before it, then seed-fixed closed.
        assert conn.ops.index(eof[0]) > next(
            i for i, r in enumerate(conn.ops) if r.op == Op.WRITE and r.ret > 0
        ), show(mine)
        assert not conn.hup_err() and not conn.reset_io(), show(mine)
        assert conn.closed, show(mine)


# --------------------------------------------------------------------------- rst_before_accept


N_FORGED = 60


@packet_test
def test_rst_before_accept_hands_the_server_dead_sockets(
    target: TargetRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    fired: list[int] = []
    real_fire = fg.Forger.fire

    def fire(self: fg.Forger, raw: bytes) -> None:
        real_fire(self, raw)
        fired.append(time.monotonic_ns())  # the shim's t_ns is CLOCK_MONOTONIC too

    monkeypatch.setattr(fg.Forger, "fire", fire)
    # Many connections: which RST beats accept() is a race (see below).
    forged = target.run_fault("rst_before_accept", method="forged", connections=N_FORGED)
    c = forged.counts
    assert c["rst_forged"] == N_FORGED and c["rst_effective"] == N_FORGED, forged.summary()
    assert c["probe_reset"] == N_FORGED, forged.summary()
    linger = target.run_fault("rst_before_accept", method="linger", connections=10)
    assert linger.counts["rst_sent"] == 10 and linger.counts["rst_effective"] == 10

    _, conns = finish(target)
    assert len(conns) == N_FORGED + 11, show(conns)  # + 10 linger + the oracle's request
    dead = conns[: N_FORGED + 10]
    for conn in dead:
        # accept() succeeded (Linux hands out reset sockets); the very first thing the server
        # learnt about the fd was EPOLLHUP|EPOLLERR, and no read or write ever worked on it.
        first = conn.first()
        assert first is not None and first.op == Op.EPOLL_EVENT, show(dead)
        assert first.events & HUP_ERR, show(dead)
        assert not any(r.ret > 0 for r in conn.io()), show(dead)
        assert conn.closed, show(dead)
    # Which RSTs beat accept() is a race with the server's accept loop: the shim stamps each
    # accept4() on entry, so an accept that began after the RST was sent took a dead socket.
    # Measured on a loaded 2-CPU VM: from 8 of 50 to 50 of 50.
    assert len(fired) == N_FORGED
    lead_ns = [conn.accept.t_ns - t for conn, t in zip(conns[:N_FORGED], fired, strict=True)]
    assert sum(lead > 0 for lead in lead_ns) >= 1, f"no RST beat accept(); lead (ns): {lead_ns}"


# --------------------------------------------------------------------------- rst_mid_response


@packet_test
def test_rst_mid_response_resets_a_server_with_a_full_send_buffer(target: TargetRun) -> None:
    report = target.run_fault("rst_mid_response", connections=4, concurrency=2)
    c = report.counts
    assert c["server_stalled"] == 4, report.summary()
    assert c["rst_effective"] == 4 and c["after_rst_reset"] == 4, report.summary()
    assert c["requests"] > 100 * 4, report.summary()  # a large pipelined backlog
    assert not report.observations

    _, conns = finish(target)
    mine = fault_conns(conns, report)
    for conn in mine:
        # The server had a response half written: write() met a full send buffer (EAGAIN),
        # then the RST ended it (EPOLLOUT|EPOLLERR|EPOLLHUP, or a write failing).
        eagain = [r for r in conn.ops if r.op == Op.WRITE and r.err == EAGAIN]
        assert eagain, show(mine)
        ending = conn.hup_err() + conn.reset_io()
        assert ending and min(conn.ops.index(r) for r in ending) > conn.ops.index(eagain[0])
        assert conn.closed, show(mine)


# --------------------------------------------------------------------------- mechanisms


@needs_root
def test_tcp_repair_reads_exact_sequence_numbers_and_sets_the_isn() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        try:
            client.bind(("127.0.0.1", 0))
            fg.set_isn(client, 1000)
            client.connect(listener.getsockname())
            server, _ = listener.accept()
            with server:
                assert fg.read_seqs(client).snd_nxt == 1001  # the SYN takes one
                client.sendall(b"hello")
                server.sendall(b"world!")
                assert server.recv(16) == b"hello" and client.recv(16) == b"world!"
                mine, theirs = fg.read_seqs(client), fg.read_seqs(server)
                assert mine.snd_nxt == 1006 == theirs.rcv_nxt
                assert mine.rcv_nxt == theirs.snd_nxt and mine.unsent == 0
                tup = fg.FourTuple.of(client)
                assert fg.server_state(tup) == "ESTABLISHED"
                assert fg._proc_state(tup) == "ESTABLISHED"  # the slow way agrees
                client.close()
                assert asyncio.run(fg.wait_server_state(tup, fg.fin_took, 1.0)) == "CLOSE_WAIT"
        finally:
            client.close()


@packet_test
def test_flush_ack_sends_the_delayed_ack_at_once() -> None:
    """In request/response mode Linux delays the ACK of an answer by 40 ms: sent after a
    forged RST, it would draw a RST from the server's kernel (so the faults flush it first)."""
    delays: list[float] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # Up to 3 connections: once, on a VM at load 40, the ACK still left ~20 ms late.
        for _ in range(3):
            with (
                _capture.Capture(port) as capture,
                socket.create_connection(("127.0.0.1", port)) as c,
            ):
                server, _ = listener.accept()
                with server:
                    for _ in range(5):  # enough round trips to leave quick-ACK mode
                        c.sendall(b"ping")
                        assert server.recv(16) == b"ping"
                        server.sendall(b"pong")
                        assert c.recv(16) == b"pong"
                    fg.flush_ack(c)
                    flushed = time.time()
                    ack = (fg.read_seqs(c).rcv_nxt, c.getsockname()[1])
                    time.sleep(0.1)
            acks = [s for s in capture.segments if (s.ack, s.src_port) == ack and s.flags == "A"]
            assert acks, capture.segments
            delays.append(acks[0].time - flushed)
            # The kernel stamped the ACK before flush_ack() returned, not 40 ms later.
            if delays[-1] <= 0:
                return
    pytest.fail(f"the ACK left after flush_ack() returned, by {delays} s")


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("fault", "params", "message"),
    [
        ("forged_rst", {"phase": "mid-request"}, "'phase' = 'mid-request' is not one of"),
        ("forged_rst", {"idle_ms": -1}, "'idle_ms' = -1.0 is out of range"),
        ("forged_rst", {"seq_offset": 1.5}, "'seq_offset' must be an integer"),
        ("forged_fin", {"variant": "triple"}, "is not one of: single, duplicate, random"),
        ("forged_fin", {"observe_ms": 0}, "'observe_ms' = 0.0 is out of range"),
        ("rst_before_accept", {"method": "syn"}, "is not one of: forged, linger, random"),
        ("rst_before_accept", {"connections": 0}, "'connections' = 0 is out of range"),
        ("rst_mid_response", {"path_bytes": 8}, "'path_bytes' = 8 is out of range"),
        ("rst_mid_response", {"path_len": 100}, "did you mean 'path_bytes'"),
        ("rst_mid_response", {"probe": True}, "unknown parameter 'probe'"),
    ],
)
def test_bad_parameters_are_clear_errors(
    fault: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ScenarioError) as err:
        faults.create(fault, params, where="test")
    assert message in str(err.value)


def test_packet_faults_are_registered_with_deterministic_schedules() -> None:
    assert set(PACKET_FAULTS) <= set(faults.available())
    for name in PACKET_FAULTS:
        fault = faults.create(name, {"connections": 5}, where="test")
        assert fault.describe_params()
        assert fault.schedule(random.Random(7)) == fault.schedule(random.Random(7))
        assert len(fault.schedule(random.Random(7))) == 5


@pytest.mark.parametrize("name", PACKET_FAULTS)
def test_without_root_the_fault_says_so(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    fault = faults.create(name, {"connections": 1}, where="test")
    with pytest.raises(ScenarioError, match="need root"):
        fault.run(Endpoint("127.0.0.1", 9), random.Random(1), time.monotonic() + 5)


def test_without_scapy_the_fault_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "scapy" else real(name, *a),
    )
    fault = faults.create("forged_fin", {"connections": 1}, where="test")
    with pytest.raises(ScenarioError, match="pip install scapy"):
        fault.run(Endpoint("127.0.0.1", 9), random.Random(1), time.monotonic() + 5)


@needs_root
def test_only_loopback_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    fault = faults.create("forged_rst", {"connections": 1}, where="test")
    # No packet is sent: the address is refused before anything is opened.
    monkeypatch.setattr(fg.Forger, "open", lambda self: pytest.fail("opened a raw socket"))
    with pytest.raises(ScenarioError, match="IPv4 loopback interface only"):
        fault.run(Endpoint("192.0.2.1", 80), random.Random(1), time.monotonic() + 5)


def test_linger_method_needs_no_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        port = listener.getsockname()[1]
        fault = faults.create("rst_before_accept", {"connections": 3, "method": "linger"}, "t")
        report = fault.run(Endpoint("127.0.0.1", port), random.Random(1), time.monotonic() + 10)
    assert report.counts["rst_sent"] == 3 and report.counts["rst_effective"] == 3
