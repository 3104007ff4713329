"""The built-in scenario suite: every fault, and the storm, against the target under test.

Collected by the plugin when pytest runs with ``--target``; each test gets a freshly started
target, and the oracle judges it after the body (crash, liveness, cross-talk, fd-leak and,
with the tracer, the fd-lifecycle rules).
"""

from __future__ import annotations

import pytest

from afterclose.faults import netem
from afterclose.faults._packets import unavailable_reason
from afterclose.harness.session import Harness, TargetRun

# Forged segments need root and scapy; without them these scenarios skip and say why.
_PACKETS_MISSING = unavailable_reason()
_PACKETS = pytest.mark.skipif(_PACKETS_MISSING is not None, reason=_PACKETS_MISSING or "")

# netem needs sch_netem: the kernel matrix's guests have it, many hosts do not.  Asked once
# per process: the probe runs tc in a throwaway network namespace.
_NETEM_MISSING = netem.unavailable_reason()
_NETEM = pytest.mark.skipif(_NETEM_MISSING is not None, reason=_NETEM_MISSING or "")

pytestmark = pytest.mark.afterclose_scenario

# A fault that could not do what it exists for (no connection stayed open to reset, no answer
# was large enough) raises FaultNotApplied from run_fault: the plugin judges the run, then
# skips the test with what was missing and the manifest key that fixes it.

# How long past the manifest's idle_timeout_s the idle connections are held: timers are often
# checked once a second, and a timer wheel may round the timeout up.
IDLE_MARGIN_S = 1.0
IDLE_MARGIN_SHARE = 0.2


# A TLS connection costs the harness's client about 4 to 6 times the CPU of a plaintext one
# (2.4 to 2.7 ms against 0.4 to 0.6 ms for a connect, one request and its answer, measured
# against nginx and nginx-tls): the storms plan a TLS target a quarter of the rate, so the
# client spends what it spends on a plaintext storm.  At the full rate a 2-CPU machine starts
# under a third of the plan and the run is judged incomplete-evidence.
TLS_RATE_SHARE = 0.25


def storm_rate(target: TargetRun, rate_per_s: float) -> float:
    """The rate a storm plans against ``target``: ``rate_per_s``, less for TLS."""
    return rate_per_s * TLS_RATE_SHARE if target.manifest.tls else rate_per_s


@pytest.fixture
def idle_timeout_s(afterclose_harness: Harness) -> float:
    """The manifest's idle timeout, or a skip (before the target starts) saying how to set it."""
    timeout = afterclose_harness.manifest.idle_timeout_s
    if timeout is None:
        pytest.skip(
            "the manifest declares no idle_timeout_s: connections are not held idle past the "
            "server's idle timer; set idle_timeout_s = <seconds> in the manifest to run this"
        )
    return timeout


def needs_replies(target: TargetRun) -> None:
    """Skip a scenario that judges replies when the target's protocol has none (``raw``)."""
    protocol = target.manifest.speaks
    if not protocol.has_replies:
        pytest.skip(protocol.no_replies_reason)


def test_keepalive_requests(target: TargetRun) -> None:
    needs_replies(target)
    target.run_fault(
        "connection_storm",
        rate_per_s=storm_rate(target, 200),
        concurrency=20,
        duration_s=1.0,
        max_connections=200,
        mix={"keepalive": 1},
    )


@pytest.mark.parametrize(
    "phase", ["before-request", "mid-request", "after-request", "mid-response", "after-half-close"]
)
def test_reset_peer(target: TargetRun, phase: str) -> None:
    if phase in ("mid-response", "after-half-close"):
        needs_replies(target)
    target.run_fault("reset_peer", phase=phase, connections=60, concurrency=10)


def test_reset_mid_handshake(target: TargetRun) -> None:
    if not target.manifest.tls:
        pytest.skip("the target does not speak TLS (tls = true in its manifest)")
    target.run_fault("reset_peer", phase="mid-handshake", connections=60, concurrency=10)


def test_half_close(target: TargetRun) -> None:
    needs_replies(target)
    target.run_fault("half_close", connections=60, concurrency=10, requests_per_connection=2)


def test_shutdown_race(target: TargetRun) -> None:
    needs_replies(target)
    target.run_fault(
        "shutdown_race", connections=300, concurrency=20, close_mode="mixed", max_delay_us=500
    )


# The two long storms last half as long as they used to, at the same rate: the harness is asked
# for no more connections per second than before (a storm that falls short still fails on
# incomplete-evidence: under-delivered), and 1,600 and 400 connections still hand every fd
# number out again many times.  Server timers are test_idle_timeout's, which holds connections
# past the manifest's idle_timeout_s whatever the storms last.
def test_connection_storm(target: TargetRun) -> None:
    needs_replies(target)
    target.run_fault(
        "connection_storm",
        rate_per_s=storm_rate(target, 800),
        concurrency=100,
        duration_s=2.0,
        max_connections=4000,
        mix={
            "keepalive": 4,
            "close": 2,
            "reset_peer": 2,
            "half_close": 2,
            "shutdown_race": 3,
            "idle_drop": 1,
        },
    )


# Faults a correct server survives (harness/syscall_faults.py): every one is a result the kernel
# could give; the server must retry, re-arm or close the connection, never act on it after.
@pytest.mark.syscall_faults(
    epoll_wait={"eintr": 0.02},
    read={"eagain": 0.05},
    write={"short": 0.1, "econnreset": 0.005, "epipe": 0.005},
    accept={"emfile": 0.005, "econnaborted": 0.01},
)
def test_syscall_faults(target: TargetRun) -> None:
    needs_replies(target)
    target.run_fault(
        "connection_storm",
        rate_per_s=storm_rate(target, 400),
        concurrency=50,
        duration_s=1.0,
        max_connections=800,
        mix={"keepalive": 4, "close": 2, "reset_peer": 1, "half_close": 1, "shutdown_race": 2},
    )


@_PACKETS
@pytest.mark.parametrize("phase", ["idle", "after-request"])
def test_forged_rst(target: TargetRun, phase: str) -> None:
    target.run_fault("forged_rst", phase=phase, connections=20, concurrency=4)


@_PACKETS
@pytest.mark.parametrize("variant", ["single", "duplicate"])
def test_forged_fin(target: TargetRun, variant: str) -> None:
    target.run_fault("forged_fin", variant=variant, connections=20, concurrency=4)


@_PACKETS
def test_rst_before_accept(target: TargetRun) -> None:
    target.run_fault("rst_before_accept", method="random", connections=60)


@_PACKETS
def test_rst_mid_response(target: TargetRun) -> None:
    needs_replies(target)
    target.run_fault("rst_mid_response", connections=4, concurrency=2)


@_NETEM
def test_netem(target: TargetRun) -> None:
    needs_replies(target)
    target.run_fault("netem", storm_s=2.0, rate_per_s=storm_rate(target, 150), concurrency=20)


def test_idle_timeout(idle_timeout_s: float, target: TargetRun) -> None:
    # Idle connections outlive the server's idle timeout while short ones churn, so that its
    # timers fire while their fd numbers are being handed out again.
    needs_replies(target)
    hold_s = idle_timeout_s * (1 + IDLE_MARGIN_SHARE) + IDLE_MARGIN_S
    target.run_fault(
        "idle_hold", idle_connections=20, hold_s=hold_s, rate_per_s=100, concurrency=20
    )
