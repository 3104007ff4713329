"""How reading, checking and drawing a trace grow with its size: real shim traces, N and 2N.

    python3 bench/trace_scale.py [--records 500000] [--connections 2000] [--rounds 3]

Three measurements, each on traces the LD_PRELOAD shim wrote:

* ``read``: ``read_trace_dir`` of a ``readloop`` trace (one ``read(2)`` of /dev/zero per call,
  ``tests/shim_programs/readloop.c``) of ``--records`` and twice as many calls;
* ``check``: the trace rules (``check_trace``) over a trace of seed-fixed answering
  ``--connections`` and twice as many ``Connection: close`` requests (one storm each, one
  connection per request: the per-connection state the rules keep);
* ``svg``: ``render_svg`` of seed-buggy's first finding, found by storming it traced.

A ratio time(2N) / time(N) near 2 means linear growth; near 4, quadratic.  Each figure is the
median over ``--rounds``.  The tests check what these functions return; this measures how fast.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import _common as c

from afterclose import faults
from afterclose.faults.base import Endpoint
from afterclose.harness import compile as cbuild
from afterclose.harness.oracle.judge import judge_trace as check_trace
from afterclose.harness.trace import shim
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.reader import read_trace_dir
from afterclose.harness.trace.svg import render_svg

COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "read N / 2N records",
    "check N / 2N connections",
    "svg of a finding",
    "ratios 2N / N: read, check",
)
SVG_ROUNDS = 5  # storms of seed-buggy before giving up on a finding


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def readloop_trace(calls: int, folder: Path) -> Path:
    program = cbuild.build(
        cbuild.CBuild(
            name="shimtest-readloop",
            sources=(c.ROOT / "tests" / "shim_programs" / "readloop.c",),
            cflags=("-O2", "-Wall", "-Wextra", "-pthread"),
            ldflags=("-pthread",),
        )
    )
    folder.mkdir(parents=True)
    env = shim.shim_env(folder)
    subprocess.run([str(program), str(calls)], env=env, check=True, capture_output=True)
    return folder


def storm_trace(target: str, connections: int, folder: Path, seed: int) -> Path:
    manifest = c.seed_manifest(target)
    with c.started(manifest, c.build(manifest), "preload", folder) as server:
        params = {
            "rate_per_s": 2000,
            "concurrency": 32,
            "duration_s": 60.0,
            "max_connections": connections,
            "mix": {"close": 1} if target == "seed-fixed" else None,
        }
        params = {k: v for k, v in params.items() if v is not None}
        endpoint = Endpoint(server.target.host, server.target.port, echo_path=True)
        fault = faults.create("connection_storm", params, where="bench trace_scale")
        fault.run(endpoint, random.Random(seed), time.monotonic() + 90)
    assert server.trace_dir is not None
    return server.trace_dir


def first_finding(scratch: Path) -> Finding | None:
    for attempt in range(SVG_ROUNDS):
        trace = read_trace_dir(
            storm_trace("seed-buggy", 3000, scratch / f"buggy{attempt}", attempt)
        )
        for findings in check_trace(trace).occurrences.values():
            if findings:
                return findings[0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    command = c.command_line(
        "trace_scale.py",
        [
            f"--records={args.records}",
            f"--connections={args.connections}",
            f"--rounds={args.rounds}",
        ],
    )
    load_before = c.load()
    c.warm_shim()
    read_s: dict[int, list[float]] = {1: [], 2: []}
    check_s: dict[int, list[float]] = {1: [], 2: []}
    records: dict[int, int] = {}
    svg_s: list[float] = []
    with c.scratch("trace-scale") as scratch:
        for k in (1, 2):
            folder = readloop_trace(k * args.records, scratch / f"readloop{k}")
            for _ in range(args.rounds):
                read_s[k].append(timed(lambda f=folder: read_trace_dir(f)))
            trace = read_trace_dir(
                storm_trace("seed-fixed", k * args.connections, scratch / f"fixed{k}", k)
            )
            records[k] = len(trace.records)
            for _ in range(args.rounds):
                check_s[k].append(timed(lambda t=trace: check_trace(t)))
            print(
                f"x{k}: read {k * args.records} calls {c.median(read_s[k]):.2f} s; "
                f"check {k * args.connections} connections ({records[k]} records) "
                f"{c.median(check_s[k]):.2f} s; "
                f"load {c.load()}"
            )
        finding = first_finding(scratch)
        if finding is not None:
            for _ in range(args.rounds):
                svg_s.append(timed(lambda: render_svg(finding)))
    read_ratio = c.ratio(c.median(read_s[2]), c.median(read_s[1]))
    check_ratio = c.ratio(c.median(check_s[2]), c.median(check_s[1]))
    svg = f"{c.median(svg_s):.3f} s ({finding.rule})" if finding else "no finding"
    c.append_row(
        "trace-scale",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            f"{c.median(read_s[1]):.2f} s / {c.median(read_s[2]):.2f} s",
            f"{c.median(check_s[1]):.2f} s / {c.median(check_s[2]):.2f} s "
            f"({records[1]} / {records[2]} records)",
            svg,
            f"{read_ratio:.2f}, {check_ratio:.2f}",
        ],
        title="How trace reading, checking and drawing grow with the trace",
    )
    print(f"svg of seed-buggy's first finding: {svg}")
    print(f"ratios time(2N) / time(N) (2 = linear): read {read_ratio:.2f}, check {check_ratio:.2f}")


if __name__ == "__main__":
    main()
