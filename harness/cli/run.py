"""``afterclose run``: one fault, or a scenario file, against a freshly started target."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from afterclose.harness import replay
from afterclose.harness.cli import common
from afterclose.harness.cli.progress import ProgressView
from afterclose.harness.errors import AftercloseError, FaultNotApplied

if TYPE_CHECKING:
    from afterclose.harness.session import Outcome, TargetRun


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="run one fault, or a scenario file, against a target",
        description="Run one fault (FAULT key=value ...) or a scenario file (FILE.toml, or "
        "--scenario FILE) against a freshly started target and judge it: exit 0 when no rule "
        "is violated, 1 when one is, 2 on bad input.",
    )
    common.add_run_options(run, target=True)
    run.add_argument("--scenario", default=None, metavar="FILE", help="a scenario file")
    run.add_argument("fault", nargs="?", help="a fault name, or a scenario file (*.toml)")
    run.add_argument("params", nargs="*", help="fault parameters as key=value")
    run.set_defaults(func=run_command)


def _looks_like_file(word: str) -> bool:
    return word.endswith(".toml") or "/" in word


def run_command(args: argparse.Namespace) -> int:
    scenario_file: str | None = args.scenario
    if scenario_file is None and args.fault is not None and _looks_like_file(args.fault):
        scenario_file = args.fault
    elif scenario_file is not None and args.fault is not None:
        raise AftercloseError(
            f"both a scenario file ({scenario_file}) and {args.fault!r} given",
            hint="run either one fault with key=value parameters or one scenario file",
        )
    if scenario_file is not None:
        if args.params:
            raise AftercloseError(
                f"a scenario file takes no key=value parameters (got {' '.join(args.params)})",
                where=scenario_file,
                hint="write the parameters into the file's [[phase]] tables",
            )
        return _run_scenario_file(Path(scenario_file), args)
    if args.fault is None:
        raise AftercloseError(
            "nothing to run: give a fault and its parameters, or a scenario file",
            hint="e.g. afterclose run --target=seed-fixed reset_peer connections=50, "
            "or afterclose run --target=seed-fixed scenarios/NAME.toml",
        )
    return _run_fault(args)


def _run_fault(args: argparse.Namespace) -> int:
    from afterclose import faults
    from afterclose.harness.session import Harness

    params = common.parse_params(args.params)
    # A typo in the name or a parameter fails before the target starts.
    faults.get_any(args.fault, where="afterclose run").from_params(
        params, where=f"afterclose run: fault {args.fault!r}"
    )
    settings = common.settings(args.target, args)
    harness = Harness(settings)
    base = Path(tempfile.mkdtemp(prefix=f"afterclose-run-{harness.manifest.name}-"))
    view = ProgressView(sys.stderr)
    not_applied: FaultNotApplied | None = None
    # The test name gives the run its test seed: a replay with --seed draws the same one.
    with harness.start(base, f"run-{args.fault}") as run:
        try:
            with view.watching():
                report = run.run_fault(args.fault, **params)
        except FaultNotApplied as exc:
            not_applied = exc
            report = run.reports[-1]
        print(report.summary())
        print(f"schedule: fault seed {settings.fault_seed}, {run.schedule_line()}")
        outcome = run.finish()
    for warning in outcome.warnings:
        print(f"WARNING: {warning}")
    again = replay.command(settings, "run", [args.fault, *args.params])
    if outcome.ok and not_applied is not None:
        # Judged first: nothing was violated, but nothing was proved either (a pytest SKIP).
        print(f"not applied, nothing proved: {not_applied.render()}")
        print(f"replay: {again}")
        return 0
    if outcome.ok:
        print(f"no violation ({_artifacts_after_pass(base, args)})")
        print(f"replay: {again}")
        return 0
    print(run.failure_message(outcome, again))
    return 1


def _run_scenario_file(path: Path, args: argparse.Namespace) -> int:
    from afterclose.harness.scenario_file import load_scenario
    from afterclose.harness.session import Harness

    scen = load_scenario(path)  # every mistake is reported before the target starts
    settings = common.settings(args.target, args)
    harness = Harness(settings)
    base = Path(tempfile.mkdtemp(prefix=f"afterclose-run-{harness.manifest.name}-"))
    print(
        f"scenario {scen.name!r} ({path}, {len(scen.phases)} phase(s)) against "
        f"{harness.manifest.name!r}, tracer {harness.tracer_mode}, fault seed {settings.fault_seed}"
    )
    view = ProgressView(sys.stderr)
    # The test name pytest gives the file's test: the same seed, the same schedule.
    with harness.start(base, scen.name) as run:
        run.replay_nodeid = f"{path}::{scen.name}"
        with view.watching():
            result = run.run_scenario(scen)
        outcome = run.finish()
    kept = _artifacts_after_pass(base, args) if outcome.ok else f"artifacts: {run.workdir}"
    _summary(run, outcome, result.summary(), replay.command(settings, "run", [str(path)]), kept)
    return 0 if outcome.ok else 1


def _artifacts_after_pass(base: Path, args: argparse.Namespace) -> str:
    if common.drop_artifacts(base, args):
        return "artifacts deleted; --keep-artifacts keeps them"
    return f"artifacts: {base}"


def _summary(run: TargetRun, outcome: Outcome, phases: str, again: str, kept: str) -> None:
    print("\n== summary")
    if outcome.ok:
        print("verdict: PASS - no rule violated")
    else:
        rules = ", ".join(dict.fromkeys(v.rule for v in outcome.violations))
        print(f"verdict: FAIL - {len(outcome.violations)} rule(s) violated: {rules}")
        for violation in outcome.violations:
            print(violation.render())
    print(phases)
    for warning in outcome.warnings:
        print(f"WARNING: {warning}")
    settings = run.harness.settings
    print(f"seed: fault seed {settings.fault_seed}, scenario seed {run.scenarios[-1].seed}")
    print(kept)
    print(f"replay: {again}")
    print(f"   or: {run.harness.replay_command(run.test_name, run.replay_nodeid)}")
