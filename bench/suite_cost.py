"""Wall time of the built-in scenario suite against seed-fixed, serial and with ``-n 2``.

    python3 bench/suite_cost.py [--rounds 2] [--target seed-fixed]

Runs ``pytest --target=seed-fixed -p no:cacheprovider`` (and the same with ``-n 2``, xdist)
the way a user of afterclose runs it: from an empty folder, so only the built-in suite is
collected (not afterclose's own tests).  ``--basetemp`` points pytest's temporary folders into
this benchmark's scratch folder, so concurrent pytest runs of other people on the machine
neither see nor clean up ours.  The target is built before any clock starts.  Rounds alternate
the order of the two commands; the ratio is the median serial time over the median ``-n 2``
time (the speed-up).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import _common as c

VARIANTS = ("serial", "-n 2")
TIMEOUT_S = 600.0
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "tests (outcome)",
    "serial: median wall (runs)",
    "-n 2: median wall (runs)",
    "speed-up serial / -n 2",
)
_SUMMARY = re.compile(r"=+ (.*? in [\d.]+s.*?) =+\s*$", re.MULTILINE)


@dataclass
class Sample:
    variant: str
    wall_s: float
    summary: str
    ok: bool


def pytest_argv(target: str, variant: str, basetemp: Path) -> list[str]:
    argv = [sys.executable, "-m", "pytest", f"--target={target}", "-p", "no:cacheprovider"]
    if variant != "serial":
        argv += variant.split()
    return [*argv, f"--basetemp={basetemp}"]


def run_suite(target: str, variant: str, scratch: Path, index: int) -> Sample:
    cwd = scratch / f"cwd-{index}"
    cwd.mkdir()
    argv = pytest_argv(target, variant, scratch / f"basetemp-{index}")
    result = c.run_tool(argv, timeout_s=TIMEOUT_S, cwd=cwd)
    found = _SUMMARY.findall(result.stdout)
    summary = found[-1] if found else f"no summary (exit {result.returncode})"
    if result.timed_out:
        summary = f"timed out after {TIMEOUT_S:.0f} s"
    c.remove(cwd)
    c.remove(scratch / f"basetemp-{index}")
    return Sample(variant, result.wall_s, summary, result.returncode == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--target", default="seed-fixed")
    args = parser.parse_args()
    command = c.command_line(
        "suite_cost.py", [f"--rounds={args.rounds}", f"--target={args.target}"]
    )
    load_before = c.load()
    manifest = c.seed_manifest(args.target)
    c.build(manifest)
    c.warm_shim()
    samples: list[Sample] = []
    with c.scratch("suite-cost") as scratch:
        for r in range(args.rounds):
            for variant in c.rotated(VARIANTS, r):
                sample = run_suite(args.target, variant, scratch, len(samples))
                samples.append(sample)
                print(
                    f"round {r + 1} {variant:6}: {sample.wall_s:6.1f} s wall; {sample.summary}; "
                    f"load {c.load()}"
                )

    def wall(variant: str) -> float:
        return c.median([s.wall_s for s in samples if s.variant == variant])

    outcomes = sorted({s.summary.split(" in ")[0] for s in samples})
    speedup = c.ratio(wall("serial"), wall("-n 2"))
    shown = " ".join(["pytest", *pytest_argv(args.target, "serial", scratch)[3:-1]])
    c.append_row(
        "suite-cost",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            "; ".join(outcomes) + ("" if all(s.ok for s in samples) else " (FAILED runs)"),
            *(f"{c.fmt_s(wall(v))} ({sum(s.variant == v for s in samples)})" for v in VARIANTS),
            f"{speedup:.2f}",
        ],
        title="Cost of the built-in scenario suite",
    )
    print(f"suite: `{shown}` from an empty folder; outcomes: {'; '.join(outcomes)}")
    print(f"serial median {wall('serial'):.1f} s, -n 2 median {wall('-n 2'):.1f} s")
    print(f"ratio serial / -n 2 (speed-up): {speedup:.2f}")


if __name__ == "__main__":
    main()
