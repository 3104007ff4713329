"""Traced rules on ``tests/servers/misbehave.c`` under the real LD_PRELOAD tracer: a thread
that spins on a half-closed connection (busy-loop, naming the call and the thread) and an idle
timer that closes reused fd numbers (foreign-close, reported before its EBADF echoes)."""

from __future__ import annotations

import uuid
from pathlib import Path

from misbehave import misbehave_manifest

from afterclose.harness.session import Harness, Outcome, Settings


def judge(tmp_path: Path, mode: str, fault: str, **params: object) -> Outcome:
    manifest = misbehave_manifest(tmp_path, mode)
    harness = Harness(Settings(target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex))
    assert harness.tracer_mode == "preload"
    with harness.start(tmp_path / "run", f"test-{mode}") as run:
        run.run_fault(fault, **params)
        return run.finish()


def explain(outcome: Outcome) -> str:
    return "\n".join([v.render() for v in outcome.violations] + outcome.warnings)


def test_a_thread_spinning_on_a_half_closed_connection_is_a_busy_loop(tmp_path: Path) -> None:
    outcome = judge(tmp_path, "spin", "half_close", connections=2, concurrency=1)
    found = [v for v in outcome.violations if v.rule == "busy-loop"]
    assert found, explain(outcome)
    assert "read() returned 0 (EOF)" in found[0].summary, found[0].summary
    assert "spins on" in found[0].summary and "(tid " in found[0].summary


def test_an_idle_timer_closing_reused_numbers_is_named_before_its_echoes(
    tmp_path: Path,
) -> None:
    storm = {
        "rate_per_s": 400,
        "concurrency": 8,
        "duration_s": 1.5,
        "max_connections": 600,
        # Silent connections: the timer closes them before their first event.
        "mix": {"keepalive": 1, "close": 1, "idle_drop": 1},
    }
    outcome = judge(tmp_path, "stale-timer", "connection_storm", **storm)
    rules = [v.rule for v in outcome.violations]
    assert "foreign-close" in rules, explain(outcome)
    traced = [r for r in rules if r in {"foreign-close", "use-after-close", "wrong-incarnation"}]
    assert traced[0] == "foreign-close", explain(outcome)
    v = outcome.violations[rules.index("foreign-close")]
    assert "never handed" in v.summary and ">>>" in v.details, v.render()


def test_the_correct_mode_is_clean_under_the_tracer(tmp_path: Path) -> None:
    storm = {
        "rate_per_s": 400,
        "concurrency": 8,
        "duration_s": 1.0,
        "max_connections": 300,
        "mix": {"keepalive": 1, "close": 1, "half_close": 1, "idle_drop": 1},
    }
    outcome = judge(tmp_path, "none", "connection_storm", **storm)
    assert outcome.ok, explain(outcome)
