"""How the storm scales: new connections/s at 1, 2 and 4 worker processes and at concurrency
100, 1,000 and 10,000, against seed-fixed, with wrk at each concurrency beside it.

    python3 bench/storm_scaling.py [--seconds 3] [--processes 1,2,4]
                                   [--concurrency 100,1000,10000] [--engine auto]

One untraced seed-fixed serves every run.  Each cell is ``connection_storm`` with its default
mix (keep-alive, close, resets, half-closes, shutdown races, idle drops, malformed requests,
slow senders), unthrottled (``rate_per_s=100000``), ``processes`` workers sharing
``concurrency`` slots, on the engine ``--engine`` names (``auto``: the compiled one for HTTP).
Its rate is what it reports (connections established / elapsed).  At each concurrency wrk
(``wrk -t2 -cC -H 'Connection: close'``, a reconnect after every answer) runs too, just after
the storm cells of that concurrency: the ratio storm / wrk is the best storm cell's rate over
wrk's.  10,000 connections at once need 10,000 fds in the client and as many in the target:
the script raises its RLIMIT_NOFILE to the hard limit before it starts the target (which
inherits it) and leaves out a concurrency that the limit cannot hold.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import _common as c

from afterclose import faults
from afterclose.faults.base import Endpoint
from afterclose.harness.client import native

TARGET = "seed-fixed"
STORM_RATE = 100_000.0  # the parameter's maximum: never the limit
STORM_MAX_PER_S = 20_000  # sizes max_connections: above what two cores give
FD_SLACK = 64  # the client's and wrk's own fds beside its connections


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def storm(endpoint: Endpoint, seconds: float, processes: int, concurrency: int, engine: str) -> str:
    params: dict[str, object] = {
        "rate_per_s": STORM_RATE,
        "concurrency": concurrency,
        "duration_s": seconds,
        "max_connections": min(100_000, int(seconds * STORM_MAX_PER_S)),
        "processes": processes,
        "engine": engine,
    }
    fault = faults.create("connection_storm", params, where="bench storm_scaling")
    report = fault.run(endpoint, random.Random(), time.monotonic() + seconds + 30)
    made = report.counts["connections"]
    errors = sum(n for k, n in report.counts.items() if k.startswith("errors:"))
    rate = made / report.elapsed_s
    on = "native" if report.counts["native_engine"] else "asyncio"
    print(
        f"storm {processes} process(es), concurrency {concurrency}: {rate:8.0f} conn/s "
        f"({made} connections, {errors} errors, on {on}); load {c.load()}",
        flush=True,
    )
    return f"{rate:.0f}"


def wrk(url: str, seconds: float, concurrency: int) -> float:
    argv = c.wrk_argv(url, threads=2, connections=concurrency, seconds=seconds, close=True)
    stats = c.wrk_stats(c.run_tool(argv, timeout_s=seconds + 30))
    print(
        f"wrk concurrency {concurrency}: {stats.rps:8.0f} conn/s "
        f"(socket errors: {stats.socket_errors}); load {c.load()}",
        flush=True,
    )
    return stats.rps


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per run")
    parser.add_argument("--processes", default="1,2,4", help="worker processes, comma-separated")
    parser.add_argument("--concurrency", default="100,1000,10000", help="comma-separated")
    parser.add_argument("--engine", choices=native.ENGINES, default="auto")
    args = parser.parse_args()
    processes, concurrencies = ints(args.processes), ints(args.concurrency)
    command = c.command_line(
        "storm_scaling.py",
        [
            f"--seconds={args.seconds:g}",
            f"--processes={args.processes}",
            f"--concurrency={args.concurrency}",
            f"--engine={args.engine}",
        ],
    )
    c.require("wrk")
    nofile = raise_nofile()
    held = [n for n in concurrencies if n + FD_SLACK <= nofile]
    for n in sorted(set(concurrencies) - set(held)):
        print(f"concurrency {n} left out: RLIMIT_NOFILE is {nofile}")
    load_before = c.load()
    manifest = c.seed_manifest(TARGET)
    artefact = c.build(manifest)
    cells: dict[tuple[int, int], str] = {}
    wrk_rates: dict[int, float] = {}
    with (
        c.scratch("storm-scaling") as scratch,
        c.started(manifest, artefact, "off", scratch / "target") as target,
    ):
        endpoint = Endpoint(target.target.host, target.target.port, echo_path=True)
        for k, concurrency in enumerate(held):
            for p in c.rotated([str(p) for p in processes], k):
                cells[int(p), concurrency] = storm(
                    endpoint, args.seconds, int(p), concurrency, args.engine
                )
                time.sleep(1.0)  # let TIME_WAIT and the run queue settle
            wrk_rates[concurrency] = wrk(target.url, args.seconds, concurrency)
            time.sleep(1.0)
        alive = target.alive()
    if not alive:
        print(f"WARNING: {TARGET} died during the benchmark")

    def best(concurrency: int) -> float:
        return max(float(cells[p, concurrency]) for p in processes)

    columns = [*c.CONTEXT_COLUMNS]
    row = c.context_cells(command, load_before)
    for concurrency in held:
        columns.append(
            f"concurrency {concurrency}: storm at {'/'.join(map(str, processes))} processes; wrk"
        )
        rates = " / ".join(cells[p, concurrency] for p in processes)
        row.append(f"{rates}; wrk {wrk_rates[concurrency]:.0f}")
    ratios = "; ".join(
        f"{n}: {c.ratio(best(n), wrk_rates[n]):.2f}" for n in held if wrk_rates[n] > 0
    )
    columns.append("best storm / wrk, per concurrency")
    row.append(ratios + ("" if alive else f" ({TARGET} died)"))
    c.append_row("storm-scaling", columns, row, title="Storm scaling: processes and concurrency")
    print(f"best storm / wrk: {ratios}")


if __name__ == "__main__":
    main()
