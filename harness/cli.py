"""``afterclose``: the command line for work outside pytest.

afterclose demo                      find the bug in seed-buggy, pass seed-fixed
afterclose targets                   list the targets it can find
afterclose faults                    list the faults and their parameters
afterclose run --target X FAULT k=v  run one fault against a target and judge it
afterclose run --target X FILE.toml  run a scenario file against a target and judge it
afterclose explore --target X        search fault sequences for a violation, shrink it
afterclose trace show DIR|FILE       print a saved trace's verdict and timelines
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from afterclose.harness.errors import AftercloseError

if TYPE_CHECKING:
    from afterclose.harness.client.engine import StormProgress
    from afterclose.harness.scenario import PhaseEvent
    from afterclose.harness.session import Harness, Outcome, TargetRun

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


def cmd_kernels(args: argparse.Namespace) -> int:
    from afterclose.harness.kernel import fetch

    for line in fetch.listing():
        print(line)
    print("use: pytest --target=NAME --kernel=6.1,6.12   (see docs/kernels.md)")
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


class ProgressView:
    """Live progress on ``stream`` (stderr): a bar redrawn in place with ``\\r`` when it is a
    terminal, else one line a second, so that logs stay readable.  Storms in parallel phases
    report from their own threads, hence the lock."""

    BAR_WIDTH = 24

    def __init__(self, stream: TextIO, tty: bool | None = None, every_s: float = 1.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last_line = 0.0
        self._open = 0  # characters of an unfinished \r line on a terminal

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _line(self, text: str) -> None:
        """A whole line, after ending any bar drawn in place."""
        if self._open:
            self._write("\n")
            self._open = 0
        self._write(text + "\n")

    @staticmethod
    def render(p: StormProgress) -> str:
        by_time = p.elapsed_s / p.duration_s if p.duration_s else 0.0
        by_count = p.started / p.planned if p.planned else 1.0
        share = 1.0 if p.finished else min(max(by_time, by_count), 1.0)
        filled = int(share * ProgressView.BAR_WIDTH)
        bar = "#" * filled + "." * (ProgressView.BAR_WIDTH - filled)
        return (
            f"{p.fault} [{bar}] {share * 100:3.0f}% {p.connections}/{p.planned} conn, "
            f"{p.rate_per_s:.0f}/s (target {p.target_rate_per_s:g}/s), {p.errors} errors, "
            f"{p.processes} process(es) on {p.loop}, {p.elapsed_s:.1f}/{p.duration_s:g} s"
            + (" - done" if p.finished else "")
        )

    def storm(self, p: StormProgress) -> None:
        with self._lock:
            text = self.render(p)
            if self.tty:
                self._write("\r" + text.ljust(self._open))
                self._open = len(text)
                if p.finished:
                    self._write("\n")
                    self._open = 0
                return
            now = time.monotonic()
            if p.finished or now - self._last_line >= self.every_s:
                self._last_line = now
                self._write(text + "\n")

    def phase(self, event: PhaseEvent) -> None:
        with self._lock:
            phase = event.phase
            label = f"phase[{event.index}] {phase.name}"
            if event.report is None:
                rep = ""
                if phase.repeat > 1:
                    rep = f" (repetition {event.repetition + 1}/{phase.repeat})"
                self._line(f"{label}{rep}: {' + '.join(phase.faults)} ...")
            else:
                self._line(f"{label} done: {event.report.summary()}")

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        from afterclose.harness import scenario
        from afterclose.harness.client import engine as storm_engine

        with storm_engine.watch(self.storm), scenario.watch_phases(self.phase):
            yield


def _looks_like_file(word: str) -> bool:
    return word.endswith(".toml") or "/" in word


def cmd_run(args: argparse.Namespace) -> int:
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
    from afterclose.harness.session import Harness, Settings

    params = _parse_params(args.params)
    faults.get_any(args.fault, where="afterclose run")  # a typo fails before the target starts
    settings = _settings(args.target, args)
    assert isinstance(settings, Settings)
    harness = Harness(settings)
    base = Path(tempfile.mkdtemp(prefix=f"afterclose-run-{harness.manifest.name}-"))
    view = ProgressView(sys.stderr)
    with harness.start(base, f"run-{args.fault}") as run:
        with view.watching():
            report = run.run_fault(args.fault, **params)
        print(report.summary())
        outcome = run.finish()
    for warning in outcome.warnings:
        print(f"WARNING: {warning}")
    if outcome.ok:
        print(f"no violation (artifacts: {base})")
        return 0
    print(run.failure_message(outcome))
    return 1


def _replay_run(harness: Harness, path: Path) -> str:
    """The ``afterclose run`` command that replays this run's client-side schedule."""
    settings = harness.settings
    argv = ["afterclose", "run", f"--target={settings.target}", f"--seed={settings.fault_seed}"]
    if settings.tracer != "auto":
        argv.append(f"--tracer={settings.tracer}")
    if settings.sanitize != "none":
        argv.append(f"--sanitize={settings.sanitize}")
    if settings.chaos != "off":
        argv.append(f"--chaos={settings.chaos}")
    return shlex.join([*argv, str(path)])


def _run_scenario_file(path: Path, args: argparse.Namespace) -> int:
    from afterclose.harness.scenario_file import load_scenario
    from afterclose.harness.session import Harness, Settings

    scen = load_scenario(path)  # every mistake is reported before the target starts
    settings = _settings(args.target, args)
    assert isinstance(settings, Settings)
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
    _summary(run, outcome, result.summary(), _replay_run(harness, path))
    return 0 if outcome.ok else 1


def _summary(run: TargetRun, outcome: Outcome, phases: str, replay: str) -> None:
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
    print(f"artifacts: {run.workdir}")
    print(f"replay: {replay}")
    print(f"   or: {run.harness.replay_command(run.test_name, run.replay_nodeid)}")


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
    sub.add_parser(
        "kernels", help="kernels --kernel can boot: versions apt offers, and cached ones"
    ).set_defaults(func=cmd_kernels)
    run = sub.add_parser(
        "run",
        help="run one fault, or a scenario file, against a target",
        description="Run one fault (FAULT key=value ...) or a scenario file (FILE.toml, or "
        "--scenario FILE) against a freshly started target and judge it: exit 0 when no rule "
        "is violated, 1 when one is, 2 on bad input.",
    )
    common(run)
    run.add_argument("--target", required=True)
    run.add_argument("--scenario", default=None, metavar="FILE", help="a scenario file")
    run.add_argument("fault", nargs="?", help="a fault name, or a scenario file (*.toml)")
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
