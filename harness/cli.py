"""``afterclose``: the command line for work outside pytest.

afterclose demo                      find the bug in seed-buggy, pass seed-fixed
afterclose targets                   list the targets it can find
afterclose faults                    list the faults and their parameters
afterclose run --target X FAULT k=v  run one fault against a target and judge it
afterclose explore --target X        search fault sequences for a violation, shrink it
afterclose trace show DIR|FILE       print a saved trace's verdict and timelines
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from afterclose.harness.errors import AftercloseError

if TYPE_CHECKING:
    from afterclose.harness.session import TargetRun

DEMO_BUDGET_S = 60.0


def _settings(target: str, args: argparse.Namespace) -> object:
    from afterclose.harness.session import Settings

    return Settings(
        target=target,
        rootdir=Path.cwd(),
        run_id=uuid.uuid4().hex,
        tracer=args.tracer,
        sanitize=args.sanitize,
        fault_seed=args.seed if args.seed is not None else random.randrange(2**32),
        chaos=getattr(args, "chaos", "off"),
    )


def _storm(run: TargetRun) -> None:
    run.run_fault(
        "connection_storm",
        rate_per_s=800,
        concurrency=100,
        duration_s=3.0,
        max_connections=3000,
        mix={"keepalive": 3, "close": 1, "reset_peer": 2, "half_close": 2, "shutdown_race": 4},
    )


def _hunt(target: str, args: argparse.Namespace, budget_s: float) -> tuple[bool, float, int]:
    """Storm ``target`` in rounds until a rule is violated or the budget is spent."""
    from afterclose.harness.session import Harness, Settings

    settings = _settings(target, args)
    assert isinstance(settings, Settings)
    harness = Harness(settings)
    start = time.monotonic()
    rounds = 0
    base = Path(tempfile.mkdtemp(prefix=f"afterclose-demo-{target}-"))
    print(f"\n== {target}: {harness.manifest.description}")
    print(f"   tracer {harness.tracer_mode}, fault seed {settings.fault_seed}, artifacts {base}")
    while time.monotonic() - start < budget_s:
        rounds += 1
        with harness.start(base / f"round-{rounds}", f"demo-round-{rounds}") as run:
            _storm(run)
            outcome = run.finish()
        elapsed = time.monotonic() - start
        for report in outcome.reports:
            print(f"   round {rounds} ({elapsed:.1f} s): {report.summary()}")
        for warning in outcome.warnings:
            print(f"   WARNING: {warning}")
        if not outcome.ok:
            print(
                f"   FOUND after {elapsed:.1f} s: " + ", ".join(v.rule for v in outcome.violations)
            )
            replay = f"afterclose demo --seed {settings.fault_seed}"
            print(run.failure_message(outcome, replay=replay))
            return True, elapsed, rounds
        if args.rounds and rounds >= args.rounds:
            break
    return False, time.monotonic() - start, rounds


def cmd_demo(args: argparse.Namespace) -> int:
    found, took, rounds = _hunt("seed-buggy", args, DEMO_BUDGET_S)
    if not found:
        print(f"\nseed-buggy: no violation in {took:.1f} s ({rounds} rounds) - unexpected")
        return 1
    args.rounds = max(rounds, 2)
    clean, _, fixed_rounds = _hunt("seed-fixed", args, DEMO_BUDGET_S)
    print("\n== summary")
    print(f"   seed-buggy: violation found in {took:.1f} s ({rounds} storm round(s))")
    if clean:
        print("   seed-fixed: a violation was reported - see above")
        return 1
    print(f"   seed-fixed: no violation in {fixed_rounds} round(s) of the same storm")
    print("\nNext: pytest --target=seed-buggy   (the built-in scenario suite, fails)")
    print("      pytest --target=seed-fixed   (passes)")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from afterclose.harness.manifest import available_targets, load_manifest, resolve_target

    for name in available_targets(Path.cwd()):
        path = resolve_target(name, Path.cwd())
        try:
            description = load_manifest(path).description
        except AftercloseError as exc:
            description = f"(broken manifest: {exc.message})"
        print(f"{name:16} {description}  [{path}]")
    return 0


def cmd_faults(args: argparse.Namespace) -> int:
    from afterclose import faults

    for name in faults.available("all"):
        cls = faults.get_any(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        side = " (target-side)" if faults.kind(name) == "target" else ""
        print(f"{name}{side}: {doc[0] if doc else ''}")
        for line in cls.describe_params():
            print(f"    {line}")
    return 0


def _parse_params(items: list[str]) -> dict[str, object]:
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise AftercloseError(
                f"parameter {item!r} is not key=value", hint="e.g. connections=50"
            )
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def cmd_run(args: argparse.Namespace) -> int:
    from afterclose.harness.session import Harness, Settings

    settings = _settings(args.target, args)
    assert isinstance(settings, Settings)
    harness = Harness(settings)
    base = Path(tempfile.mkdtemp(prefix=f"afterclose-run-{harness.manifest.name}-"))
    with harness.start(base, f"run-{args.fault}") as run:
        report = run.run_fault(args.fault, **_parse_params(args.params))
        print(report.summary())
        outcome = run.finish()
    for warning in outcome.warnings:
        print(f"WARNING: {warning}")
    if outcome.ok:
        print(f"no violation (artifacts: {base})")
        return 0
    print(run.failure_message(outcome))
    return 1


def cmd_explore(args: argparse.Namespace) -> int:
    try:
        from afterclose.harness import explore
    except ImportError as exc:
        raise AftercloseError(
            f"afterclose explore needs Hypothesis ({exc})", hint="pip install hypothesis"
        ) from None
    from afterclose.harness.session import Settings

    settings = _settings(args.target, args)
    assert isinstance(settings, Settings)
    return explore.command(args, settings)


def cmd_trace_show(args: argparse.Namespace) -> int:
    from afterclose.harness.errors import TraceError
    from afterclose.harness.trace import reader, rules, svg
    from afterclose.harness.trace.format import TRACE_GLOB

    path = Path(args.path)
    hint = "pass the trace folder of a run (its workdir's trace/) or one trace file"
    try:
        if path.is_dir():
            if not any(path.glob(TRACE_GLOB)):
                raise TraceError(f"no {TRACE_GLOB} files in this folder", where=path, hint=hint)
            trace = reader.read_trace_dir(path)
        elif path.exists():
            trace = reader.read_trace_files([path])
        else:
            raise TraceError("no such trace folder or file", where=path, hint=hint)
    except OSError as exc:
        raise TraceError(f"cannot read: {exc.strerror or exc}", where=path, hint=hint) from exc
    result = rules.check_trace(trace, cutoff_seq=args.cutoff, trace_path=str(path))
    print(
        f"{path}: {len(trace.processes)} process(es), {len(trace.records)} records, "
        f"{trace.lost_records} lost" + ("" if trace.complete else " (incomplete)")
    )
    for proc in trace.processes:
        state = " crashed" if proc.crashed else ""
        print(
            f"  pid {proc.pid} ({proc.header.exe or '?'}): {len(proc.records)} records, "
            f"{proc.lost_records} lost{state}  [{proc.path.name}]"
        )
    if args.cutoff is not None:
        print(f"  judged up to seq {args.cutoff}")
    # check_trace puts the reader's warnings first in its own.
    for warning in dict.fromkeys((*trace.warnings, *result.warnings)):
        print(f"WARNING: {warning}")
    for violation in result.violations:
        print(violation.render())
        if args.all:
            occ = result.occurrences.get(violation.rule, [])
            for n, finding in enumerate(occ[1:], 2):
                print(f"\n  -- {violation.rule}: occurrence {n} of {len(occ)}")
                print("\n".join("    " + line for line in finding.timeline().splitlines()))
    if not result.violations:
        print("no violation")
    if args.svg is not None:
        out_dir = Path(args.svg)
        try:
            written = svg.write_report(result, out_dir, every=args.all, trace_path=str(path))
        except OSError as exc:
            raise AftercloseError(
                f"cannot write the timeline pictures: {exc.strerror or exc}", where=out_dir
            ) from exc
        for picture in written:
            print(f"wrote {picture}")
    return 1 if result.violations else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afterclose", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tracer", default="auto", choices=("auto", "preload", "ebpf", "off"))
        p.add_argument("--sanitize", default="none", choices=("none", "address", "undefined"))
        p.add_argument("--seed", type=int, default=None, help="fault seed (default: random)")
        p.add_argument(
            "--chaos",
            default="off",
            choices=("off", "on", "low", "medium", "high", *map(str, range(11))),
            metavar="LEVEL",
            help="schedule perturbation in the target: off, on, low, medium, high or 0-10",
        )

    demo = sub.add_parser("demo", help="find the bug in seed-buggy, then pass seed-fixed")
    common(demo)
    demo.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("targets", help="list targets").set_defaults(func=cmd_targets)
    sub.add_parser("faults", help="list faults").set_defaults(func=cmd_faults)
    run = sub.add_parser("run", help="run one fault against a target")
    common(run)
    run.add_argument("--target", required=True)
    run.add_argument("fault")
    run.add_argument("params", nargs="*", help="fault parameters as key=value")
    run.set_defaults(func=cmd_run)
    explore = sub.add_parser("explore", help="search fault sequences for a violation")
    common(explore)
    explore.add_argument("--target", required=True)
    explore.add_argument("--out", default="scenarios/found-{rule}.toml", help="scenario file")
    explore.add_argument("--max-examples", type=int, default=50)
    explore.add_argument("--budget-s", type=float, default=120.0)
    explore.add_argument("--runs-per-example", type=int, default=2, help="runs before a pass")
    explore.add_argument("--verify-runs", type=int, default=3, help="re-runs of the result")
    explore.add_argument("--faults", default="", help="comma-separated (default: all)")
    explore.add_argument("--max-phases", type=int, default=3)
    explore.set_defaults(func=cmd_explore)
    trace = sub.add_parser("trace", help="saved traces")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    show = trace_sub.add_parser(
        "show",
        help="print a saved trace's verdict",
        description="Judge a saved trace: exit 1 when a rule is violated, 0 when none is, "
        "2 when the path is not a readable trace.",
    )
    show.add_argument("path", help="a trace folder (trace.*.bin files) or one trace file")
    show.add_argument(
        "--cutoff",
        type=int,
        default=None,
        metavar="SEQ",
        help="ignore calls that began after sequence number SEQ",
    )
    show.add_argument(
        "--all", action="store_true", help="print (and draw) every occurrence, not the first"
    )
    show.add_argument(
        "--svg",
        default=None,
        metavar="OUT_DIR",
        help="write an SVG timeline per violated rule into OUT_DIR",
    )
    show.set_defaults(func=cmd_trace_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AftercloseError as exc:
        print(f"afterclose: error: {exc.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("afterclose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
