"""Does schedule perturbation (--chaos) find seed-buggy's bug sooner?

    python3 bench/chaos_effect.py [--runs 10] [--chaos high] [--cap 60] [--keep]

Each run is what ``afterclose demo`` does to seed-buggy (the demo's storm from
``harness/cli/demo.py``, on a fresh traced target per round, judged after each round) until a rule
is violated, once without chaos and once with ``--chaos`` at the given level.  The two runs of
a pair share the fault seed (same client-side schedule, same shim streams) and alternate which
goes first; pairs are interleaved, so both sides see the same machine load.

Three clocks, all from the start of the run (time.monotonic, i.e. CLOCK_MONOTONIC):

* *first report*: when the round that found a violation had been judged (the demo's "FOUND
  after").  The demo judges after a whole 3 s storm round, so this moves in round-sized steps.
* *target died*: when a watcher (10 ms polls) saw the target exit: seed-buggy's bug ends in a
  double free or a segfault, so this is when the bug struck, inside the round.
* *first traced violation*: the ``t_ns`` (CLOCK_MONOTONIC, the shim's clock) of the earliest
  record that a traced rule blames in the trace of the round that found the bug.  When the
  target died before the trace proved anything, the run has none: its median is over the
  runs that have one, and the others are counted apart.

A run that finds nothing within ``--cap`` counts as the cap.  The ratio is no-chaos / chaos of
the medians: above 1 means chaos finds the bug sooner.
"""

from __future__ import annotations

import argparse
import random
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

from afterclose.harness.cli import demo
from afterclose.harness.oracle import judge
from afterclose.harness.runners.base import Server
from afterclose.harness.session import Harness, Settings, TargetRun
from afterclose.harness.trace import reader

TARGET = "seed-buggy"
MAX_RUNS = 30
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "runs per side, chaos level",
    "first report: median / worst, off → chaos",
    "target died: median / worst, off → chaos",
    "first traced violation: median / worst, off → chaos",
    "rounds (mean), off → chaos",
    "ratio off / chaos (medians: report, died, violation)",
)


@dataclass
class Hunt:
    report_s: float | None = None  # the demo's "FOUND after"
    died_s: float | None = None
    violation_s: float | None = None
    rounds: int = 0
    rules: list[str] = field(default_factory=list)


class DeathWatch:
    """When the target exits, on the run's clock (polled every 10 ms on a thread)."""

    def __init__(self, target: Server, clock0: float) -> None:
        self.died_s: float | None = None
        self._target, self._clock0 = target, clock0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            if self._target.exit_status() is not None:
                self.died_s = time.monotonic() - self._clock0
                return

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.died_s


def first_violation_ns(trace_dir: Path) -> int | None:
    """CLOCK_MONOTONIC time of the earliest record a traced rule blames."""
    trace = reader.read_trace_dir(trace_dir)
    result = judge.judge_trace(trace, cutoff_seq=None, trace_path=str(trace_dir))
    times = [result.records[f.index].t_ns for found in result.occurrences.values() for f in found]
    return min(times, default=None)


def hunt(chaos: str, seed: int, cap_s: float, workdir: Path) -> Hunt:
    settings = Settings(
        target=TARGET,
        rootdir=c.ROOT,
        run_id=uuid.uuid4().hex,
        tracer="preload",
        fault_seed=seed,
        chaos=chaos,
    )
    harness = Harness(settings)
    harness.artefact  # noqa: B018 - build (cached) before the clock starts
    result = Hunt()
    start = time.monotonic()
    while time.monotonic() - start < cap_s:
        result.rounds += 1
        name = f"bench-round-{result.rounds}"
        run: TargetRun
        with harness.start(workdir / name, name) as run:
            watch = DeathWatch(run.server, start)
            try:
                demo.storm(run)
            finally:
                died = watch.stop()
            outcome = run.finish()
        elapsed = time.monotonic() - start
        if outcome.violations:
            result.report_s, result.died_s = elapsed, died
            result.rules = [v.rule for v in outcome.violations]
            if outcome.trace_dir is not None:
                ns = first_violation_ns(outcome.trace_dir)
                if ns is not None:
                    result.violation_s = ns / 1e9 - start
            shutil.rmtree(workdir / name, ignore_errors=True)
            break
        shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("report_s", "died_s", "violation_s"):
        value = getattr(result, name)
        if value is not None and value > cap_s:
            setattr(result, name, None)
    return result


def summarise(values: list[float | None], cap_s: float) -> tuple[float, float, int]:
    capped = sum(v is None for v in values)
    filled = [cap_s if v is None else v for v in values]
    return c.median(filled), max(filled, default=float("nan")), capped


def seen(values: list[float | None]) -> tuple[float, float, int]:
    """Median and worst over the runs that have a value, and how many have none."""
    got = [v for v in values if v is not None]
    return c.median(got), max(got, default=float("nan")), len(values) - len(got)


def cell(
    off: tuple[float, float, int],
    on: tuple[float, float, int],
    digits: int = 1,
    missing: str = "capped",
) -> str:
    def one(s: tuple[float, float, int]) -> str:
        capped = f", {s[2]} {missing}" if s[2] else ""
        return f"{s[0]:.{digits}f} / {s[1]:.{digits}f} s{capped}"

    return f"{one(off)} → {one(on)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help=f"runs per side (at most {MAX_RUNS})")
    parser.add_argument("--chaos", default="high", help="chaos level (default high)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    runs = max(1, min(args.runs, MAX_RUNS))
    if runs != args.runs:
        print(f"--runs capped to {runs}")
    from afterclose.harness import syscall_faults

    level = syscall_faults.chaos_level(args.chaos)  # a bad level fails here, not mid-run
    command = c.command_line(
        "chaos_effect.py", [f"--runs={runs}", f"--chaos={args.chaos}", f"--cap={args.cap:g}"]
    )
    load_before = c.load()
    c.build(c.seed_manifest(TARGET))
    c.warm_shim()
    sides = {"off": "off", "chaos": str(level)}
    hunts: dict[str, list[Hunt]] = {"off": [], "chaos": []}
    with c.scratch("chaos", args.keep) as scratch:
        for i in range(runs):
            seed = random.randrange(2**32)
            for side in c.rotated(list(sides), i):
                h = hunt(sides[side], seed, args.cap, scratch / f"{side}-{i}")
                hunts[side].append(h)

                def fmt(x: float | None) -> str:
                    return "none" if x is None else f"{x:.2f} s"

                print(
                    f"[{i + 1}/{runs}] {side:5} seed {seed}: report {fmt(h.report_s)}, "
                    f"died {fmt(h.died_s)}, first violation {fmt(h.violation_s)}, "
                    f"{h.rounds} round(s), {'+'.join(h.rules) or 'nothing'}; load {c.load()}"
                )
    # A violation time is missing when the target died before the trace proved anything:
    # that is not a capped run, so those runs are left out of its median and counted apart.
    stats = {
        side: [
            summarise([h.report_s for h in hunts[side]], args.cap),
            summarise([h.died_s for h in hunts[side]], args.cap),
            seen([h.violation_s for h in hunts[side]]),
        ]
        for side in sides
    }
    ratios = [c.ratio(stats["off"][k][0], stats["chaos"][k][0]) for k in range(3)]
    rounds = {side: sum(h.rounds for h in hunts[side]) / len(hunts[side]) for side in sides}
    ratio_cell = " / ".join(f"{r:.2f}" for r in ratios)
    c.append_row(
        "chaos-effect",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            f"{runs}, chaos {args.chaos} (level {level})",
            cell(stats["off"][0], stats["chaos"][0]),
            cell(stats["off"][1], stats["chaos"][1], 2),
            cell(stats["off"][2], stats["chaos"][2], 2, "without one (crash first)"),
            f"{rounds['off']:.1f} → {rounds['chaos']:.1f}",
            ratio_cell,
        ],
        title="Chaos: time to find seed-buggy's bug with and without schedule perturbation",
    )
    for k, what in enumerate(("first report", "target died", "first traced violation")):
        off, on = stats["off"][k], stats["chaos"][k]
        print(
            f"{what}: off median {off[0]:.2f} s worst {off[1]:.2f} s ({off[2]} capped/none); "
            f"chaos median {on[0]:.2f} s worst {on[1]:.2f} s ({on[2]} capped/none)"
        )
    print(f"ratio off/chaos of the medians (report, died, first violation): {ratio_cell}")


if __name__ == "__main__":
    main()
