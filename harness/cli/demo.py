"""``afterclose demo``: find the bug in seed-buggy, then pass seed-fixed with the same storm."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from afterclose.harness import replay
from afterclose.harness.cli import common

if TYPE_CHECKING:
    from afterclose.harness.session import Outcome, Settings, TargetRun

DEMO_BUDGET_S = 60.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="find the bug in seed-buggy, then pass seed-fixed")
    common.add_run_options(demo, target=False)
    demo.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    demo.set_defaults(func=run_demo)


def storm(run: TargetRun) -> None:
    """The demo's storm: many short connections, a mix of closes, resets and races."""
    run.run_fault(
        "connection_storm",
        rate_per_s=800,
        concurrency=100,
        duration_s=3.0,
        max_connections=3000,
        mix={"keepalive": 3, "close": 1, "reset_peer": 2, "half_close": 2, "shutdown_race": 4},
    )


def hunt(target: str, args: argparse.Namespace, budget_s: float) -> tuple[bool, float, int]:
    """Storm ``target`` in rounds until a rule is violated or the budget is spent."""
    from afterclose.harness.session import Harness

    settings = common.settings(target, args)
    harness = Harness(settings)
    start = time.monotonic()
    rounds = 0
    base = Path(tempfile.mkdtemp(prefix=f"afterclose-demo-{target}-"))
    print(f"\n== {target}: {harness.manifest.description}")
    print(
        f"   tracer {harness.tracer_mode}, fault seed {settings.fault_seed}, "
        f"artifacts of failing rounds in {base}"
    )
    try:
        while time.monotonic() - start < budget_s:
            rounds += 1
            folder = base / f"round-{rounds}"
            with harness.start(folder, f"demo-round-{rounds}") as run:
                storm(run)
                outcome = run.finish()
            if outcome.ok:
                common.drop_artifacts(folder, args)
            found = _report_round(run, outcome, rounds, time.monotonic() - start, settings)
            if found:
                return True, time.monotonic() - start, rounds
            if args.rounds and rounds >= args.rounds:
                break
    finally:
        with contextlib.suppress(OSError):
            base.rmdir()  # empty: every round passed and was deleted
    return False, time.monotonic() - start, rounds


def _report_round(
    run: TargetRun, outcome: Outcome, rounds: int, elapsed: float, settings: Settings
) -> bool:
    for report in outcome.reports:
        print(f"   round {rounds} ({elapsed:.1f} s): {report.summary()}")
    if outcome.ok:
        return False
    print(f"   FOUND after {elapsed:.1f} s: " + ", ".join(v.rule for v in outcome.violations))
    print(run.failure_message(outcome, replay=replay.command(settings, "demo")))
    return True


def run_demo(args: argparse.Namespace) -> int:
    found, took, rounds = hunt("seed-buggy", args, DEMO_BUDGET_S)
    if not found:
        print(f"\nseed-buggy: no violation in {took:.1f} s ({rounds} rounds) - unexpected")
        return 1
    args.rounds = max(rounds, 2)
    clean, _, fixed_rounds = hunt("seed-fixed", args, DEMO_BUDGET_S)
    print("\n== summary")
    print(f"   seed-buggy: violation found in {took:.1f} s ({rounds} storm round(s))")
    if clean:
        print("   seed-fixed: a violation was reported - see above")
        return 1
    print(f"   seed-fixed: no violation in {fixed_rounds} round(s) of the same storm")
    print("\nNext: pytest --target=seed-buggy   (the built-in scenario suite, fails)")
    print("      pytest --target=seed-fixed   (passes)")
    return 0
