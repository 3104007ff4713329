"""Each black-box rule on a real small server that violates it, and on one that does not.

The servers are ``tests/servers/misbehave.c`` in its modes; faults come from the fault
registry, exactly as the built-in suite uses them.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from afterclose.harness.oracle import verdict
from afterclose.harness.session import Harness, Outcome, Settings

MISBEHAVE = Path(__file__).parent / "servers" / "misbehave.c"


def harness_for(tmp_path: Path, mode: str) -> Harness:
    manifest = tmp_path / f"misbehave-{mode}.toml"
    manifest.write_text(
        f"""
name = "misbehave-{mode}"
command = ["{{build}}", "{{host}}", "{{port}}", "{mode}"]
echo_path = true
fd_grace_s = 1.0
[compile]
sources = ["{MISBEHAVE}"]
cflags = ["-O2", "-Wall"]
[ready]
log = "READY"
"""
    )
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
# A response sent to the wrong connection needs connections open at the same time.
OVERLAPPING = {**MIXED, "rate_per_s": 2000, "concurrency": 20, "max_connections": 300}


@pytest.mark.parametrize(
    ("mode", "fault", "params", "rule"),
    [
        ("crash", "connection_storm", KEEPALIVE, verdict.CRASH),
        ("exit", "connection_storm", KEEPALIVE, verdict.CRASH),
        ("hang", "connection_storm", KEEPALIVE, verdict.LIVENESS),
        ("crosstalk", "connection_storm", OVERLAPPING, verdict.CROSS_TALK),
        ("double-response", "connection_storm", MIXED, verdict.CROSS_TALK),
        ("unsolicited", "connection_storm", MIXED, verdict.CROSS_TALK),
        ("wrong-body", "connection_storm", MIXED, verdict.CROSS_TALK),
        ("leak", "half_close", {"connections": 10, "concurrency": 2}, verdict.FD_LEAK),
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
    crash = [v for v in outcome.violations if v.rule == verdict.CRASH]
    assert crash, [v.render() for v in outcome.violations]
    assert "ERROR: AddressSanitizer" in crash[0].details


def test_fd_leak_counts_close_wait(tmp_path: Path) -> None:
    outcome = judge(tmp_path, "leak", "half_close", connections=6, concurrency=1)
    leak = [v for v in outcome.violations if v.rule == verdict.FD_LEAK]
    assert leak and "CLOSE_WAIT" in leak[0].details
    assert leak[0].count >= 6
