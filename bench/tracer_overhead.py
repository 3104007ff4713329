"""What tracing costs a server: wrk requests/s untraced, under afterclose's shim, under strace.

    python3 bench/tracer_overhead.py [--seconds 1] [--cycles 15] [--warmup 1]
                                     [--threads 2] [--connections 50]

Targets: ``seed-fixed`` and nginx with one worker process (a config generated here: no access
log, ``return 200 "$uri\\n"``).  Modes: ``off`` (untraced), ``preload`` (the afterclose shim
through ``LD_PRELOAD``, environment from ``shim_env``, trace files in a scratch folder) and
``strace`` (``strace -f -qq -o /dev/null``).

The machine is shared and its load swings within seconds, so all six servers are started
together (idle, they cost nothing) and measured in short wrk bursts (keep-alive,
``wrk -tT -cC -dNs``), one server after the other, for ``--cycles`` cycles; each cycle starts
with a different server.  Each server first gets a ``--warmup`` burst that is not counted.
A ratio is the median over cycles of that cycle's traced / untraced requests/s (the two
bursts are seconds apart), so drifts of the load cancel out; the interquartile range of the
per-cycle ratios shows how noisy the machine was.  The requests/s shown are the medians over
cycles.  The shim's trace headers are read at the end: a trace that lost records (its file
full) was cheaper to write than a complete one, so a target whose trace lost any record never
counts as meeting the goal, whatever its ratio; the lost records are reported per target.

Throughput on a shared, oversubscribed machine swings by tens of percent from one second to
the next, so a second, steadier figure comes with it: the server's own CPU time per request
(user + system time of every process of the server, strace included, from ``/proc``, over
each burst).  Its ratio untraced / traced is what throughput would be if the server alone
were the bottleneck.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import _common as c

TARGETS = ("seed-fixed", "nginx")
TARGET_GOAL = 0.95  # traced / untraced requests/s the shim must keep, with a complete trace
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "seed-fixed req/s: off / preload / strace",
    "nginx (1 worker) req/s: off / preload / strace",
    "trace records lost (per target)",
    "CPU µs/request: off / preload / strace",
    "ratio preload / off (goal met?)",
    "ratio strace / off",
    "CPU-based ratios (off µs / traced µs): preload; strace",
)


@dataclass
class Sample:
    target: str
    mode: str
    cycle: int
    rps: float
    cpu_us: float  # the server's CPU time per request, microseconds
    note: str


def verdict(ratio: float, lost: int) -> str:
    """Whether a preload ratio meets the goal: only with every record kept."""
    if lost:
        return f"NO: {lost} records lost, trace incomplete"
    return f"≥ {TARGET_GOAL}: " + ("yes" if ratio >= TARGET_GOAL else "no")


def burst(server: c.Started, args: argparse.Namespace, seconds: float) -> c.WrkStats:
    argv = c.wrk_argv(
        server.url, threads=args.threads, connections=args.connections, seconds=seconds
    )
    return c.wrk_stats(c.run_tool(argv, timeout_s=seconds + 20).check("wrk"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per burst")
    parser.add_argument("--cycles", type=int, default=15, help="bursts per server")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted first burst, s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    command = c.command_line(
        "tracer_overhead.py",
        [
            f"--seconds={args.seconds:g}",
            f"--cycles={args.cycles}",
            f"--warmup={args.warmup:g}",
            f"--threads={args.threads}",
            f"--connections={args.connections}",
        ],
    )
    c.require("wrk", "strace", "nginx")
    load_before = c.load()
    c.warm_shim()
    seed = c.seed_manifest("seed-fixed")
    seed_build = c.build(seed)
    samples: list[Sample] = []
    fills: dict[str, c.TraceFill] = {}
    alive: dict[str, bool] = {}
    with c.scratch("tracer-overhead") as scratch, contextlib.ExitStack() as stack:
        manifests = {"seed-fixed": (seed, seed_build), "nginx": (c.nginx_manifest(scratch), None)}
        servers: dict[tuple[str, str], c.Started] = {}
        for target in TARGETS:
            manifest, artefact = manifests[target]
            for mode in c.MODES:
                workdir = scratch / f"{target}-{mode}"
                servers[target, mode] = stack.enter_context(
                    c.started(manifest, artefact, mode, workdir)
                )
        keys = list(servers)
        if args.warmup > 0:
            for key in keys:
                burst(servers[key], args, args.warmup)
        for cycle in range(args.cycles):
            # Rotate by one mode per cycle, keeping each target's three modes together.
            order = [(t, m) for t in c.rotated(TARGETS, cycle) for m in c.rotated(c.MODES, cycle)]
            for target, mode in order:
                server = servers[target, mode]
                pids = server.target.host_pids()
                cpu0 = c.cpu_seconds(pids)
                stats = burst(server, args, args.seconds)
                cpu_us = (c.cpu_seconds(pids) - cpu0) / max(stats.requests, 1) * 1e6
                note = f"{stats.requests} requests, {cpu_us:.1f} µs CPU/request"
                if stats.socket_errors != "none":
                    note += f", socket errors: {stats.socket_errors}"
                if stats.non_2xx:
                    note += f", {stats.non_2xx} non-2xx"
                samples.append(Sample(target, mode, cycle, stats.rps, cpu_us, note))
                print(
                    f"cycle {cycle + 1} {target:10} {mode:7}: {stats.rps:9.0f} req/s; {note}; "
                    f"load {c.load()}"
                )
        for (target, mode), server in servers.items():
            alive[f"{target} {mode}"] = server.alive()
            if server.trace_dir is not None:
                fills[target] = c.trace_fill(server.trace_dir)

    def rps(target: str, mode: str) -> float:
        return c.median([s.rps for s in samples if (s.target, s.mode) == (target, mode)])

    def cpu(target: str, mode: str) -> float:
        return c.median([s.cpu_us for s in samples if (s.target, s.mode) == (target, mode)])

    def per_cycle(target: str, mode: str) -> list[float]:
        by_cycle = {(s.mode, s.cycle): s.rps for s in samples if s.target == target}
        return [c.ratio(by_cycle[mode, k], by_cycle["off", k]) for k in range(args.cycles)]

    def ratio(target: str, mode: str) -> float:
        return c.median(per_cycle(target, mode))

    def spread(target: str, mode: str) -> str:
        low, high = c.quartiles(per_cycle(target, mode))
        return f"IQR {low:.2f}-{high:.2f}"

    def cpu_ratio(target: str, mode: str) -> float:
        return c.ratio(cpu(target, "off"), cpu(target, mode))

    for target, fill in fills.items():
        print(
            f"{target} trace: {fill.processes} process(es), ≤ {fill.records_max} records, "
            f"{fill.lost} lost"
        )
    dead = [name for name, ok in alive.items() if not ok]
    if dead:
        print(f"WARNING: died during the benchmark: {', '.join(dead)}")
    lost = {t: fills[t].lost if t in fills else 0 for t in TARGETS}
    pre = {t: ratio(t, "preload") for t in TARGETS}
    st = {t: ratio(t, "strace") for t in TARGETS}
    goal = {t: verdict(pre[t], lost[t]) for t in TARGETS}
    for t in TARGETS:
        if lost[t]:
            print(
                f"WARNING: the {t} trace lost {lost[t]} records: its preload ratio was measured "
                "with an incomplete trace and does not count"
            )
    c.append_row(
        "tracer-overhead",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            *(" / ".join(f"{rps(t, m):.0f}" for m in c.MODES) for t in TARGETS),
            "; ".join(f"{t} {lost[t]}" for t in TARGETS),
            "; ".join(f"{t} " + " / ".join(f"{cpu(t, m):.1f}" for m in c.MODES) for t in TARGETS),
            "; ".join(f"{t} {pre[t]:.2f} ({goal[t]}; {spread(t, 'preload')})" for t in TARGETS)
            + (f" (died: {', '.join(dead)})" if dead else ""),
            "; ".join(f"{t} {st[t]:.2f} ({spread(t, 'strace')})" for t in TARGETS),
            "; ".join(
                f"{t} {cpu_ratio(t, 'preload'):.2f}; {cpu_ratio(t, 'strace'):.2f}" for t in TARGETS
            ),
        ],
        title="Tracer overhead: requests/s untraced, traced by the shim, under strace",
    )
    for t in TARGETS:
        print(
            f"{t:10}: "
            + ", ".join(f"{m} {rps(t, m):.0f} req/s ({cpu(t, m):.1f} µs CPU/req)" for m in c.MODES)
            + f"; CPU-based ratios preload {cpu_ratio(t, 'preload'):.2f}, "
            f"strace {cpu_ratio(t, 'strace'):.2f}"
        )
    print(
        "ratios traced/untraced: "
        + ", ".join(f"{t} preload {pre[t]:.2f} ({goal[t]}), strace {st[t]:.2f}" for t in TARGETS)
        + f" (goal preload >= {TARGET_GOAL}; per-cycle "
        + ", ".join(f"{t} preload {spread(t, 'preload')}" for t in TARGETS)
        + ")"
    )


if __name__ == "__main__":
    main()
