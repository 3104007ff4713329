"""What tracing costs a server: wrk requests/s untraced, under afterclose's shim, under strace.

    python3 bench/tracer_overhead.py [--seconds 5] [--rounds 3] [--warmup 1]
                                     [--threads 2] [--connections 50]

Targets: ``seed-fixed`` and nginx with one worker process (a config generated here: no access
log, ``return 200 "$uri\\n"``).  Modes: ``off`` (untraced), ``preload`` (the afterclose shim
through ``LD_PRELOAD``, environment from ``shim_env``, trace files in a scratch folder) and
``strace`` (``strace -f -qq -o /dev/null``).  Every measurement starts the target afresh,
warms it up with a short wrk run, then measures ``wrk -tT -cC -dNs`` (keep-alive).  Rounds
interleave everything (each round starts with a different mode), and each ratio is the median
over rounds of that round's traced / untraced requests/s, so slow drifts of the machine's
load cancel out.  The shim's trace headers are read after each traced run: a run whose trace
lost records (buffer full) would flatter the shim, and is flagged.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import _common as c
from afterclose.harness.manifest import Manifest

TARGETS = ("seed-fixed", "nginx")
TARGET_GOAL = 0.85  # traced / untraced requests/s the shim must keep
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "seed-fixed req/s: off / preload / strace",
    "nginx (1 worker) req/s: off / preload / strace",
    "trace records lost",
    "ratio preload / off (≥ 0.85?)",
    "ratio strace / off",
)


@dataclass
class Sample:
    target: str
    mode: str
    round: int
    rps: float
    lost: int
    note: str


def manifests(scratch: Path) -> dict[str, tuple[Manifest, Path | None]]:
    seed = c.seed_manifest("seed-fixed")
    return {"seed-fixed": (seed, c.build(seed)), "nginx": (c.nginx_manifest(scratch), None)}


def measure(
    target: str,
    manifest: Manifest,
    artefact: Path | None,
    mode: str,
    round_: int,
    args: argparse.Namespace,
    workdir: Path,
) -> Sample:
    with c.started(manifest, artefact, mode, workdir) as started:
        if args.warmup > 0:
            warm = c.wrk_argv(
                started.url, threads=args.threads, connections=args.connections, seconds=args.warmup
            )
            c.run_tool(warm, timeout_s=args.warmup + 20).check("wrk warm-up")
        argv = c.wrk_argv(
            started.url, threads=args.threads, connections=args.connections, seconds=args.seconds
        )
        stats = c.wrk_stats(c.run_tool(argv, timeout_s=args.seconds + 20).check("wrk"))
        alive = started.alive()
        fill = c.trace_fill(started.trace_dir) if started.trace_dir else None
    c.remove(workdir)  # the shim's trace files are sparse but large: do not let them pile up
    note = f"{stats.requests} requests, socket errors: {stats.socket_errors}"
    if stats.non_2xx:
        note += f", {stats.non_2xx} non-2xx"
    if fill is not None:
        note += (
            f", trace: {fill.processes} process(es), ≤ {fill.records_max} records, {fill.lost} lost"
        )
    if not alive:
        note += ", TARGET DIED"
    return Sample(target, mode, round_, stats.rps, fill.lost if fill else 0, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of wrk before each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    command = c.command_line(
        "tracer_overhead.py",
        [
            f"--seconds={args.seconds:g}",
            f"--rounds={args.rounds}",
            f"--warmup={args.warmup:g}",
            f"--threads={args.threads}",
            f"--connections={args.connections}",
        ],
    )
    c.require("wrk", "strace", "nginx")
    load_before = c.load()
    c.warm_shim()
    samples: list[Sample] = []
    with c.scratch("tracer-overhead") as scratch:
        targets = manifests(scratch)
        for r in range(args.rounds):
            for target in TARGETS:
                manifest, artefact = targets[target]
                for mode in c.rotated(c.MODES, r):
                    workdir = scratch / f"{target}-{mode}-{r}"
                    sample = measure(target, manifest, artefact, mode, r, args, workdir)
                    samples.append(sample)
                    print(
                        f"round {r + 1} {target:10} {mode:7}: {sample.rps:9.0f} req/s; "
                        f"{sample.note}; load {c.load()}"
                    )

    def rps(target: str, mode: str) -> float:
        return c.median([s.rps for s in samples if s.target == target and s.mode == mode])

    def ratio(target: str, mode: str) -> float:
        per_round = []
        for r in range(args.rounds):
            traced = [s.rps for s in samples if (s.target, s.mode, s.round) == (target, mode, r)]
            base = [s.rps for s in samples if (s.target, s.mode, s.round) == (target, "off", r)]
            per_round.append(c.ratio(traced[0], base[0]))
        return c.median(per_round)

    lost = sum(s.lost for s in samples)
    pre = {t: ratio(t, "preload") for t in TARGETS}
    st = {t: ratio(t, "strace") for t in TARGETS}
    goal = {t: "yes" if pre[t] >= TARGET_GOAL else "no" for t in TARGETS}
    c.append_row(
        "tracer-overhead",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            *(" / ".join(f"{rps(t, m):.0f}" for m in c.MODES) for t in TARGETS),
            str(lost) + ("" if lost == 0 else " (preload ratios flattered)"),
            "; ".join(f"{t} {pre[t]:.2f} ({goal[t]})" for t in TARGETS),
            "; ".join(f"{t} {st[t]:.2f}" for t in TARGETS),
        ],
        title="Tracer overhead: requests/s untraced, traced by the shim, under strace",
    )
    for t in TARGETS:
        print(f"{t:10}: " + ", ".join(f"{m} {rps(t, m):.0f} req/s" for m in c.MODES))
    print(
        "ratios traced/untraced: "
        + ", ".join(f"{t} preload {pre[t]:.2f} ({goal[t]}), strace {st[t]:.2f}" for t in TARGETS)
        + f" (goal preload >= {TARGET_GOAL})"
    )


if __name__ == "__main__":
    main()
