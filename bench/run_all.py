"""Run every benchmark once, one after the other, with defaults sized to fit in 15 minutes.

    python3 bench/run_all.py [--only time_to_detect,storm_rate,...]

Each benchmark appends its row to ``docs/benchmarks.md`` and prints its ratio last; this prints
those last lines again at the end, with each benchmark's wall time.  The machine has two cores:
the benchmarks never run in parallel.  Not part of CI: nothing here passes or fails a build.

Budget (defaults): time_to_detect at most 600 s (its ``--budget``; about 7 minutes when
seed-buggy is found in the first storm round, as usual), storm_rate and storm_scaling about
1 minute each, tracer_overhead about 2 minutes, suite_cost about 2 minutes, trace_scale and
docker_start about a minute each: about 15 minutes in all.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as c

BENCHMARKS = (
    "time_to_detect",
    "storm_rate",
    "storm_scaling",
    "tracer_overhead",
    "suite_cost",
    "trace_scale",
    "docker_start",
)
# Generous per-script timeouts: the scripts bound themselves; this only catches a wedge.
TIMEOUT_S = {
    "time_to_detect": 720.0,
    "storm_rate": 240.0,
    "storm_scaling": 300.0,
    "tracer_overhead": 300.0,
    "suite_cost": 300.0,
    "trace_scale": 300.0,
    "docker_start": 240.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    print(f"machine: {c.machine().describe()}; load {c.load()}", flush=True)
    results: list[tuple[str, float, str]] = []
    start = time.monotonic()
    for name in chosen:
        print(f"\n== {name} (load {c.load()})", flush=True)
        script = c.ROOT / "bench" / f"{name}.py"
        argv = [sys.executable, "-u", str(script)]
        result = c.run_streaming(argv, timeout_s=TIMEOUT_S[name], cwd=c.ROOT)
        lines = result.stdout.strip().splitlines()
        last = lines[-1] if lines else "(no output)"
        if result.timed_out:
            last = f"TIMED OUT after {TIMEOUT_S[name]:.0f} s"
        elif result.returncode != 0:
            last = f"FAILED (exit {result.returncode}): {last}"
        results.append((name, result.wall_s, last))
    total = time.monotonic() - start
    print(f"\n== summary ({total / 60:.1f} min in all)")
    for name, wall, last in results:
        print(f"{name:16} {wall:6.0f} s  {last}")


if __name__ == "__main__":
    main()
