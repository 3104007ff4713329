"""New connections per second: afterclose's storm vs siege vs wrk, against seed-fixed.

    python3 bench/storm_rate.py [--seconds 5] [--rounds 2] [--concurrency 100]
                                [--processes N] [--tracer off|preload]

One seed-fixed (untraced by default: this measures the load generators, not the target) runs
for the whole benchmark; every generator hammers the same process, at the same concurrency:

* ``storm close``: ``connection_storm`` with ``mix={"close": 1}`` (one request with
  ``Connection: close`` per connection), rate unthrottled (``rate_per_s=100000``);
* ``storm default``: ``connection_storm`` with its default mix (keep-alive, close, resets,
  half-closes, shutdown races, idle drops, malformed requests, slow senders), unthrottled;
* ``siege``: ``siege -b -c C -t Ns -H 'Connection: close'`` (its rc also says
  ``connection = close``);
* ``wrk``: ``wrk -t2 -cC -dNs -H 'Connection: close'`` (wrk reconnects after every answer).

The storm runs in ``--processes`` worker processes (default: the fault's default, min(2, cores)),
which share the concurrency, on the engine ``--engine`` names (``auto``: the compiled one, C on
epoll, for HTTP; ``asyncio``: asyncio, uvloop when installed).  Rounds interleave the four
(each round starts with a different one).  Each one's rate is what it reports itself
(connections established / elapsed for the storm, transactions / elapsed for siege, requests /
elapsed for wrk); beside it, the kernel's count of accepted connections per second
(``PassiveOpens`` in ``/proc/net/snmp``) from 1 s after the start (the storm's: once its workers
started, after the plan was drawn) to 0.5 s before the nominal end: the steady state, the same
window for every tool, system-wide (other work on the machine adds to it).  The ratios are the
medians over rounds of the per-round ratios of the tools' own rates.

Beside the rates, what each connection cost in CPU (user + system, medians over rounds): the
client's (the storm's forked workers, siege or wrk: this process's reaped children) and the
target's (``/proc/<pid>/stat`` around the run), per connection the tool reports.  On a machine
where both saturate the same cores, the sum of the two is what bounds a tool's rate.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _common as c

from afterclose import faults
from afterclose.faults.base import Endpoint
from afterclose.harness.client import engine, native

TARGET = "seed-fixed"
TOOLS = ("storm close", "storm default", "siege", "wrk")
STORM_RATE = 100_000.0  # the parameter's maximum: never the limit
STORM_MAX_PER_S = 30_000  # sizes max_connections; above what two cores give (resets: 25,000)
SIEGE_ATTEMPTS = 3
SIEGE_GRACE_S = 5.0
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "storm close: conn/s (kernel)",
    "storm default: conn/s (kernel)",
    "siege: conn/s (kernel)",
    "wrk: conn/s (kernel)",
    "storm ≥ 1000/s?",
    "ratios storm close / siege, / wrk; storm default / siege, / wrk",
    "CPU µs per connection, client / target: storm close; storm default; siege; wrk",
)


@dataclass
class Sample:
    tool: str
    rate: float  # what the tool reports
    kernel_rate: float  # PassiveOpens in the middle of the run (system-wide)
    note: str
    client_us: float  # the tool's CPU per connection it reports
    target_us: float  # the target's CPU per connection the tool reports


@dataclass
class Outcome:
    rate: float  # what the tool reports
    connections: int  # how many it reports
    note: str
    window: c.KernelWindow | None  # its own kernel window, if it opened one


Run = Callable[[], Outcome]


def children_cpu_s() -> float:
    """CPU time of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(tool: str, run: Run, seconds: float, target_pids: list[int]) -> Sample:
    window = c.KernelWindow(seconds)
    client0, target0 = children_cpu_s(), c.cpu_seconds(target_pids)
    out = run()
    client, target = children_cpu_s() - client0, c.cpu_seconds(target_pids) - target0
    per = 1e6 / (out.connections or math.nan)  # µs per connection
    kernel = (out.window or window).result()
    return Sample(tool, out.rate, kernel, out.note, client * per, target * per)


def storm(
    endpoint: Endpoint,
    seconds: float,
    concurrency: int,
    processes: int,
    mix: dict[str, float] | None,
    engine_name: str,
) -> Run:
    # The plan (one drawn action per connection) is made before the first connect: keep it
    # to what the run can use, and say so if the storm ran out of it.  Drawing it takes a
    # second or two, so the storm's kernel window opens when its workers start (its first
    # progress report), not when run() is called.
    planned = min(100_000, math.ceil(seconds * STORM_MAX_PER_S))

    def run() -> Outcome:
        params: dict[str, object] = {
            "rate_per_s": STORM_RATE,
            "concurrency": concurrency,
            "duration_s": seconds,
            "max_connections": planned,
            "processes": processes,
            "engine": engine_name,
        }
        if mix is not None:
            params["mix"] = mix
        fault = faults.create("connection_storm", params, where="bench storm_rate")
        windows: list[c.KernelWindow] = []

        def started(progress: engine.StormProgress) -> None:
            if not windows:
                windows.append(c.KernelWindow(max(seconds - progress.elapsed_s, 0.1)))

        with engine.watch(started):
            report = fault.run(endpoint, random.Random(), time.monotonic() + seconds + 30)
        made = report.counts["connections"]
        errors = sum(n for k, n in report.counts.items() if k.startswith("errors:"))
        note = (
            f"{made} connections in {report.elapsed_s:.2f} s, {errors} errors, "
            f"{report.counts['storm_processes']} process(es) on "
            + ("native" if report.counts["native_engine"] else engine.loop_name())
        )
        if report.counts["not_started"] == 0:  # every planned connection was started
            note += f" (RAN OUT OF ITS {planned}-CONNECTION PLAN: raise STORM_MAX_PER_S)"
        return Outcome(made / report.elapsed_s, made, note, windows[0] if windows else None)

    return run


def siege(url: str, seconds: float, concurrency: int, rc: Path) -> Run:
    def run() -> Outcome:
        # siege 4.0.x sometimes never exits after a timed run ("Lifting the server siege...",
        # JoeDog/siege#66) and then prints nothing even on SIGINT: such a run is killed after
        # SIEGE_GRACE_S and retried, and the hangs are counted in the note.
        argv = c.siege_argv(rc, url, concurrency=concurrency, seconds=seconds, close=True)
        hangs = 0
        for _ in range(SIEGE_ATTEMPTS):
            result = c.run_tool(argv, timeout_s=seconds + SIEGE_GRACE_S, env=c.siege_env(rc))
            stats = c.siege_stats(result)
            if stats:
                done, failed = int(stats["transactions"]), int(stats.get("failed_transactions", 0))
                # The killed runs' CPU counts in the client's and target's figures too.
                hung = f", after {hangs} hung run(s) killed (their CPU counted)" if hangs else ""
                note = f"{done} transactions, {failed} failed{hung}"
                return Outcome(stats["transaction_rate"], done, note, None)
            hangs += 1
        return Outcome(math.nan, 0, f"siege hung {hangs} times (no summary)", None)

    return run


def wrk(url: str, seconds: float, concurrency: int) -> Run:
    def run() -> Outcome:
        argv = c.wrk_argv(url, threads=2, connections=concurrency, seconds=seconds, close=True)
        stats = c.wrk_stats(c.run_tool(argv, timeout_s=seconds + 20))
        note = f"{stats.requests} requests, socket errors: {stats.socket_errors}"
        return Outcome(stats.rps, stats.requests, note, None)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per tool per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--processes",
        type=int,
        default=engine.DEFAULT_PROCESSES,
        help="the storm's worker processes",
    )
    parser.add_argument("--tracer", choices=("off", "preload"), default="off")
    parser.add_argument("--engine", choices=native.ENGINES, default="auto", help="the storm's")
    args = parser.parse_args()
    command = c.command_line(
        "storm_rate.py",
        [
            f"--seconds={args.seconds:g}",
            f"--rounds={args.rounds}",
            f"--concurrency={args.concurrency}",
            f"--processes={args.processes}",
            f"--tracer={args.tracer}",
            f"--engine={args.engine}",
        ],
    )
    c.require("siege", "wrk")
    load_before = c.load()
    manifest = c.seed_manifest(TARGET)
    artefact = c.build(manifest)
    samples: list[Sample] = []
    with c.scratch("storm-rate") as scratch:
        rc = c.siege_rc(scratch)
        with c.started(manifest, artefact, args.tracer, scratch / "target") as target:
            endpoint = Endpoint(target.target.host, target.target.port, echo_path=True)
            runs = {
                "storm close": storm(
                    endpoint,
                    args.seconds,
                    args.concurrency,
                    args.processes,
                    {"close": 1},
                    args.engine,
                ),
                "storm default": storm(
                    endpoint, args.seconds, args.concurrency, args.processes, None, args.engine
                ),
                "siege": siege(target.url, args.seconds, args.concurrency, rc),
                "wrk": wrk(target.url, args.seconds, args.concurrency),
            }
            target_pids = target.target.host_pids()
            for r in range(args.rounds):
                for tool in c.rotated(TOOLS, r):
                    sample = measure(tool, runs[tool], args.seconds, target_pids)
                    samples.append(sample)
                    print(
                        f"round {r + 1} {tool:13}: {sample.rate:8.0f} conn/s "
                        f"(kernel {sample.kernel_rate:6.0f}/s), CPU µs/conn client "
                        f"{sample.client_us:.0f} target {sample.target_us:.0f}; {sample.note}; "
                        f"load {c.load()}"
                    )
                    time.sleep(1.0)  # let TIME_WAIT and the run queue settle between tools
            alive = target.alive()
    if not alive:
        print(f"WARNING: {TARGET} died during the benchmark")

    def rate(tool: str) -> float:
        return c.median([s.rate for s in samples if s.tool == tool])

    def kernel(tool: str) -> float:
        return c.median([s.kernel_rate for s in samples if s.tool == tool])

    def cpu(tool: str) -> str:
        client = c.median([s.client_us for s in samples if s.tool == tool])
        target = c.median([s.target_us for s in samples if s.tool == tool])
        return f"{client:.0f} / {target:.0f}"

    def per_round_ratio(a: str, b: str) -> float:
        xs = [s.rate for s in samples if s.tool == a]
        ys = [s.rate for s in samples if s.tool == b]
        return c.median([c.ratio(x, y) for x, y in zip(xs, ys, strict=True)])

    pairs = [(a, b) for a in ("storm close", "storm default") for b in ("siege", "wrk")]
    ratios = {pair: per_round_ratio(*pair) for pair in pairs}
    reaches = "yes" if min(rate("storm close"), rate("storm default")) >= 1000 else "no"
    c.append_row(
        "storm-rate",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            *(f"{rate(t):.0f} ({kernel(t):.0f})" for t in TOOLS),
            f"{reaches} (close {rate('storm close'):.0f}, default {rate('storm default'):.0f})",
            "; ".join(f"{a} / {b} {ratios[a, b]:.2f}" for a, b in pairs)
            + ("" if alive else f" ({TARGET} died)"),
            "; ".join(f"{t} {cpu(t)}" for t in TOOLS),
        ],
        title="Storm rate: new connections per second",
    )
    for tool in TOOLS:
        print(
            f"{tool:13}: median {rate(tool):.0f} conn/s (kernel-counted {kernel(tool):.0f}/s), "
            f"CPU µs/conn client / target {cpu(tool)}"
        )
    print("ratios: " + ", ".join(f"{a}/{b} {ratios[a, b]:.2f}" for a, b in pairs))


if __name__ == "__main__":
    main()
