"""What one storm connection costs, client and target, behaviour by behaviour, against wrk.

    python3 bench/storm_cost.py [--seconds 3] [--rounds 2] [--concurrency 100] [--processes N]

One untraced seed-fixed serves every run.  Each behaviour of the storm's default mix runs
alone (``mix={behaviour: 1}``), then the default mix itself, then ``wrk -t2 -cC -H 'Connection:
close'``; rounds interleave them (each round starts with a different one).  For each: its rate,
and the CPU time (user + system) per connection of the client (the storm's forked workers or
wrk) and of the target (``/proc/<pid>/stat``), medians over rounds.

Where client and target share saturated cores, a tool's rate is bounded by the sum of the two:
the last cell compares the default mix's sum (measured, and weighted from the behaviours) with
wrk's, which bounds the ratio ``bench/storm_rate.py`` reports for the default mix.
"""

from __future__ import annotations

import argparse
import time

import _common as c
import storm_rate

from afterclose.faults.base import Endpoint
from afterclose.faults.connection_storm import DEFAULT_MIX
from afterclose.harness.client import engine

TARGET = "seed-fixed"
MIX = "default mix"
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "wrk: conn/s, CPU µs/conn client / target",
    "default mix: conn/s, CPU µs/conn client / target",
    "each behaviour alone: conn/s, CPU µs/conn client / target",
    "client + target µs/conn: default mix (weighted from the behaviours) / wrk → bound",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--processes", type=int, default=engine.DEFAULT_PROCESSES)
    args = parser.parse_args()
    command = c.command_line(
        "storm_cost.py",
        [
            f"--seconds={args.seconds:g}",
            f"--rounds={args.rounds}",
            f"--concurrency={args.concurrency}",
            f"--processes={args.processes}",
        ],
    )
    c.require("wrk")
    load_before = c.load()
    manifest = c.seed_manifest(TARGET)
    artefact = c.build(manifest)
    behaviours = [name for name, weight in DEFAULT_MIX.items() if weight > 0]
    tools = (*behaviours, MIX, "wrk")
    samples: list[storm_rate.Sample] = []
    with (
        c.scratch("storm-cost") as scratch,
        c.started(manifest, artefact, "off", scratch / "target") as target,
    ):
        endpoint = Endpoint(target.target.host, target.target.port, echo_path=True)
        storm_args = (endpoint, args.seconds, args.concurrency, args.processes)
        runs = {
            **{b: storm_rate.storm(*storm_args, {b: 1}, "auto") for b in behaviours},
            MIX: storm_rate.storm(*storm_args, None, "auto"),
            "wrk": storm_rate.wrk(target.url, args.seconds, args.concurrency),
        }
        pids = target.target.host_pids()
        for r in range(args.rounds):
            for tool in c.rotated(tools, r):
                s = storm_rate.measure(tool, runs[tool], args.seconds, pids)
                samples.append(s)
                print(
                    f"round {r + 1} {tool:13}: {s.rate:7.0f} conn/s, CPU µs/conn client "
                    f"{s.client_us:4.0f} target {s.target_us:4.0f}; load {c.load()}"
                )
                time.sleep(1.0)  # let TIME_WAIT and the run queue settle between runs
        alive = target.alive()

    def of(tool: str, field: str) -> float:
        return c.median([getattr(s, field) for s in samples if s.tool == tool])

    def cell(tool: str) -> str:
        return f"{of(tool, 'rate'):.0f}/s {of(tool, 'client_us'):.0f} / {of(tool, 'target_us'):.0f}"

    def total(tool: str) -> float:
        return of(tool, "client_us") + of(tool, "target_us")

    weights = sum(DEFAULT_MIX[b] for b in behaviours)
    weighted = sum(DEFAULT_MIX[b] * total(b) for b in behaviours) / weights
    bound = (
        f"{total(MIX):.0f} ({weighted:.0f}) / {total('wrk'):.0f} → "
        f"{c.ratio(total('wrk'), total(MIX)):.2f}" + ("" if alive else f" ({TARGET} died)")
    )
    c.append_row(
        "storm-cost",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            cell("wrk"),
            cell(MIX),
            "; ".join(f"{b} {cell(b)}" for b in behaviours),
            bound,
        ],
        title="Storm cost: CPU per connection, behaviour by behaviour",
    )
    for tool in tools:
        print(f"{tool:13}: {cell(tool)}")
    print(f"client + target µs per connection, default mix (weighted) / wrk → bound: {bound}")


if __name__ == "__main__":
    main()
