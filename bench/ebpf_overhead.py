"""What the eBPF tracer costs a server: wrk requests/s of seed-fixed untraced, traced by the
shim, traced by eBPF, and under strace -f, in one run.

    python3 bench/ebpf_overhead.py [--seconds 10] [--cycles 2] [--warmup 1]
                                   [--threads 2] [--connections 50]

Needs root, the eBPF tracer's build tools (clang, libbpf-dev), wrk and strace.  Four seed-fixed
servers are started together (idle, they cost nothing): ``off`` (untraced), ``preload`` (the
afterclose shim through ``LD_PRELOAD``), ``ebpf`` (untraced until its burst: the eBPF loader
attaches to its PID right before and detaches right after, so its probes never run during the
other modes' bursts) and ``strace`` (``strace -f -qq -o /dev/null``).  Each cycle measures every
server with one keep-alive wrk burst (``wrk -tT -cC -dNs``), in an order rotated by one per
cycle; each server first gets an uncounted ``--warmup`` burst.  A ratio is the median over
cycles of that cycle's traced / untraced requests/s.

The eBPF figure counts the events the tracer lost and the records it printed per request; the
shim's trace headers give the records it lost.  A lossy trace was cheaper to take than a
complete one, so a tracer that lost anything never counts as meeting its goal (eBPF ≥ 0.85,
the shim ≥ 0.95), whatever its ratio.  The CPU columns are the
server's own CPU time per request (user + system, from ``/proc``: in-kernel BPF time is the
server's system time) and, for eBPF, the tracer process's own CPU time per request on top
(bpftrace 0.17 in the rows before 2026-12-02 23:00 UTC, the loader of
harness/trace/ebpf/c/ since).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path

import _common as c

from afterclose.harness.trace import ebpf

MODES = ("off", "preload", "ebpf", "strace")
GOALS = {"preload": 0.95, "ebpf": 0.85}  # traced / untraced requests/s, with nothing lost
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "seed-fixed req/s: off / preload / ebpf / strace",
    "ratio preload / off",
    "ratio ebpf / off",
    "ratio strace / off",
    "CPU µs/request: off / preload / ebpf (+ tracer process) / strace",
    "eBPF: records/request, events lost",
)


def verdict(mode: str, ratio: float, lost: int) -> str:
    """Whether a tracer's ratio meets its goal: only with nothing lost."""
    if lost:
        return f"NO: {lost} lost, trace incomplete"
    return f"≥ {GOALS[mode]}: " + ("yes" if ratio >= GOALS[mode] else "no")


@dataclass
class Sample:
    mode: str
    cycle: int
    rps: float
    cpu_us: float  # the server's CPU time per request
    tracer_cpu_us: float  # the eBPF loader's CPU time per request (eBPF only)
    records: int
    lost: int
    requests: int


def burst(server: c.Started, args: argparse.Namespace, seconds: float) -> c.WrkStats:
    argv = c.wrk_argv(
        server.url, threads=args.threads, connections=args.connections, seconds=seconds
    )
    return c.wrk_stats(c.run_tool(argv, timeout_s=seconds + 20).check("wrk"))


def measure(
    server: c.Started, mode: str, cycle: int, args: argparse.Namespace, folder: Path
) -> Sample:
    pids = server.target.host_pids()
    run: ebpf.EbpfRun | None = None
    if mode == "ebpf":
        run = ebpf.EbpfRun(folder / f"ebpf-{cycle}", pids)
    try:
        cpu0 = c.cpu_seconds(pids)
        tracer0 = c.cpu_seconds([run.pid]) if run else 0.0
        stats = burst(server, args, args.seconds)
        cpu = c.cpu_seconds(pids) - cpu0
        tracer = (c.cpu_seconds([run.pid]) - tracer0) if run else 0.0
    finally:
        if run is not None:
            run.stop()
    records = lost = 0
    if run is not None:
        parsed = ebpf.parse_output(run.output)
        records, lost = len(parsed.records), parsed.lost
        c.remove(run.folder)
    n = max(stats.requests, 1)
    return Sample(
        mode, cycle, stats.rps, cpu / n * 1e6, tracer / n * 1e6, records, lost, stats.requests
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per burst")
    parser.add_argument("--cycles", type=int, default=2, help="bursts per server")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted first burst, s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    command = c.command_line(
        "ebpf_overhead.py",
        [
            f"--seconds={args.seconds:g}",
            f"--cycles={args.cycles}",
            f"--warmup={args.warmup:g}",
            f"--threads={args.threads}",
            f"--connections={args.connections}",
        ],
    )
    c.require("wrk", "strace")
    missing = ebpf.unavailable()
    if missing is not None:
        raise SystemExit(f"bench: {missing[0]}\nHint: {missing[1]}")
    load_before = c.load()
    c.warm_shim()
    seed = c.seed_manifest("seed-fixed")
    artefact = c.build(seed)
    samples: list[Sample] = []
    with c.scratch("ebpf-overhead") as scratch, contextlib.ExitStack() as stack:
        servers: dict[str, c.Started] = {}
        for mode in MODES:
            start_mode = "off" if mode == "ebpf" else mode
            servers[mode] = stack.enter_context(
                c.started(seed, artefact, start_mode, scratch / mode)
            )
        if args.warmup > 0:
            for mode in MODES:
                burst(servers[mode], args, args.warmup)
        for cycle in range(args.cycles):
            for mode in c.rotated(MODES, cycle):
                s = measure(servers[mode], mode, cycle, args, scratch)
                samples.append(s)
                extra = (
                    f", loader {s.tracer_cpu_us:.1f} µs CPU/req, {s.records} records, {s.lost} lost"
                    if mode == "ebpf"
                    else ""
                )
                print(
                    f"cycle {cycle + 1} {mode:7}: {s.rps:9.0f} req/s; {s.requests} requests, "
                    f"{s.cpu_us:.1f} µs CPU/req{extra}; load {c.load()}"
                )
        dead = [mode for mode, server in servers.items() if not server.alive()]
        preload_dir = servers["preload"].trace_dir
        preload_lost = c.trace_fill(preload_dir).lost if preload_dir else 0

    def of(mode: str) -> list[Sample]:
        return [s for s in samples if s.mode == mode]

    def rps(mode: str) -> float:
        return c.median([s.rps for s in of(mode)])

    def cpu(mode: str) -> float:
        return c.median([s.cpu_us for s in of(mode)])

    def ratio(mode: str) -> float:
        by_cycle = {(s.mode, s.cycle): s.rps for s in samples}
        return c.median(
            [c.ratio(by_cycle[mode, k], by_cycle["off", k]) for k in range(args.cycles)]
        )

    traced = of("ebpf")
    lost = sum(s.lost for s in traced)
    per_request = sum(s.records for s in traced) / max(sum(s.requests for s in traced), 1)
    tracer_cpu = c.median([s.tracer_cpu_us for s in traced])
    flag = "" if lost == 0 else " (a lossy trace: eBPF ratio does not count)"
    goal = {"preload": verdict("preload", ratio("preload"), preload_lost)}
    goal["ebpf"] = verdict("ebpf", ratio("ebpf"), lost)
    for mode, n in (("preload", preload_lost), ("ebpf", lost)):
        if n:
            print(f"WARNING: the {mode} trace lost {n} records: its ratio does not count")
    c.append_row(
        "ebpf-overhead",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            " / ".join(f"{rps(m):.0f}" for m in MODES)
            + (f" (died: {', '.join(dead)})" if dead else ""),
            f"{ratio('preload'):.2f} ({goal['preload']}; {preload_lost} lost)",
            f"{ratio('ebpf'):.2f} ({goal['ebpf']})",
            f"{ratio('strace'):.2f}",
            f"{cpu('off'):.1f} / {cpu('preload'):.1f} / {cpu('ebpf'):.1f} "
            f"(+ {tracer_cpu:.1f}) / {cpu('strace'):.1f}",
            f"{per_request:.1f}, {lost} lost{flag}",
        ],
        title="eBPF tracer overhead: requests/s untraced, shim, eBPF, strace",
    )
    if dead:
        print(f"WARNING: died during the benchmark: {', '.join(dead)}")
    print(
        "seed-fixed: "
        + ", ".join(f"{m} {rps(m):.0f} req/s ({cpu(m):.1f} µs CPU/req)" for m in MODES)
        + f"; loader {tracer_cpu:.1f} µs CPU/req, {per_request:.1f} records/req, {lost} lost"
    )
    print(
        f"ratios traced/untraced: preload {ratio('preload'):.2f} ({goal['preload']}), "
        f"ebpf {ratio('ebpf'):.2f} ({goal['ebpf']}), "
        f"strace {ratio('strace'):.2f}"
    )


if __name__ == "__main__":
    main()
