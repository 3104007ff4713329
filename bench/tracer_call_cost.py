"""What one traced call costs: CPU nanoseconds per call untraced, under the shim, under eBPF.

    python3 bench/tracer_call_cost.py [--calls 200000] [--rounds 5]

A small C program (compiled here) makes ``--calls`` calls of each of two kinds in a loop and
measures its own thread CPU time per call (``CLOCK_THREAD_CPUTIME_ID``, so the other jobs of a
shared machine change the figures less than they change wall time):

``write``       ``write(2)`` of one byte to ``/dev/null``: a repeated I/O call, which the eBPF
                tracer de-duplicates (it runs its probes but prints nothing)
``epoll_wait``  ``epoll_wait(2)`` with timeout 0 on an empty epoll instance, maxevents 1 and 2
                in turn: a wait, which both tracers record every time (eBPF: one printed line
                each; with one maxevents, each wait would repeat the last printed one, which
                the eBPF tracer counts instead of printing)

Modes: ``off``, ``preload`` (the afterclose shim, trace files in a scratch folder) and
``ebpf`` (the eBPF loader attached to the program's PID before its loops start).  Each round
runs every mode once, in an order rotated by one per round; the figures are medians over rounds.
For eBPF, the loader's own CPU time per printed line comes with it (it runs beside the
target, on the same cores).  The difference to ``off`` is the tracer's cost per call; times
the calls a server makes per request, it is the tracer's CPU per request.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import _common as c

from afterclose.harness.trace import ebpf, shim
from afterclose.harness.trace.format import Op

MODES = ("off", "preload", "ebpf")
KINDS = ("write", "epoll_wait")
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "calls per kind and round, rounds",
    "write ns/call: off / preload / ebpf",
    "epoll_wait ns/call: off / preload / ebpf",
    "added per call, write; epoll_wait: preload / ebpf",
    "eBPF: lines printed per wait, tracer process ns/line, lost; shim records lost",
)

PROGRAM = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

static double cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = atol(argv[1]);
    int fd = open("/dev/null", O_WRONLY);
    int ep = epoll_create1(0);
    struct epoll_event ev[2];
    char ch = 'x';
    printf("%d\n", getpid());
    fflush(stdout);
    if (getchar() == EOF) /* the harness attaches a tracer first, then says go */
        return 1;
    double t0 = cpu_ns();
    for (long i = 0; i < n; i++)
        if (write(fd, &ch, 1) != 1)
            return 1;
    double t1 = cpu_ns();
    for (long i = 0; i < n; i++)
        if (epoll_wait(ep, ev, 1 + (int)(i & 1), 0) != 0) /* see the module's doc */
            return 1;
    double t2 = cpu_ns();
    printf("%.1f %.1f\n", (t1 - t0) / n, (t2 - t1) / n);
    return 0;
}
"""


@dataclass
class Sample:
    mode: str
    write_ns: float
    wait_ns: float
    lines: int = 0
    tracer_ns_per_line: float = 0.0
    lost: int = 0


def compile_program(folder: Path) -> Path:
    source = folder / "callloop.c"
    source.write_text(PROGRAM)
    exe = folder / "callloop"
    c.run_tool(["gcc", "-O2", "-o", str(exe), str(source)], timeout_s=60).check("gcc")
    return exe


def measure(exe: Path, mode: str, calls: int, folder: Path) -> Sample:
    env = None
    trace_dir = folder / "trace"
    if mode == "preload":
        c.remove(trace_dir)
        trace_dir.mkdir(parents=True)
        env = {**os.environ, **shim.shim_env(trace_dir)}
    proc = subprocess.Popen(
        [str(exe), str(calls)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    run: ebpf.EbpfRun | None = None
    try:
        assert proc.stdin is not None and proc.stdout is not None
        pid = int(proc.stdout.readline())
        if mode == "ebpf":
            run = ebpf.EbpfRun(folder / "ebpf", [pid])
        tracer0 = c.cpu_seconds([run.pid]) if run else 0.0
        out, _ = proc.communicate("go\n", timeout=600)
        tracer = c.cpu_seconds([run.pid]) - tracer0 if run else 0.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if run is not None:
            run.stop()
    if proc.returncode != 0:
        raise SystemExit(f"bench: the call loop failed ({mode}, status {proc.returncode})")
    write_ns, wait_ns = map(float, out.split())
    sample = Sample(mode, write_ns, wait_ns)
    if mode == "preload":
        sample.lost = c.trace_fill(trace_dir).lost
        c.remove(trace_dir)
    if run is not None:
        parsed = ebpf.parse_output(run.output)
        waits = sum(1 for r in parsed.records if r[0] == Op.EPOLL_WAIT)
        sample.lines = len(parsed.records) - parsed.repeated  # printed, not counted
        sample.tracer_ns_per_line = tracer * 1e9 / max(len(parsed.records), 1)
        # Every wait is printed: one missing is one lost, whether the loader said so or not.
        sample.lost = max(parsed.lost, calls - waits)
        c.remove(run.folder)
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200000, help="calls of each kind per run")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    command = c.command_line(
        "tracer_call_cost.py", [f"--calls={args.calls}", f"--rounds={args.rounds}"]
    )
    c.require("gcc")
    missing = ebpf.unavailable()
    if missing is not None:
        raise SystemExit(f"bench: {missing[0]}\nHint: {missing[1]}")
    load_before = c.load()
    c.warm_shim()
    samples: list[Sample] = []
    with c.scratch("tracer-call-cost") as scratch:
        exe = compile_program(scratch)
        for k in range(args.rounds):
            for mode in c.rotated(MODES, k):
                s = measure(exe, mode, args.calls, scratch / mode)
                samples.append(s)
                extra = (
                    f"; {s.lines} lines, loader {s.tracer_ns_per_line:.0f} ns/line, {s.lost} lost"
                    if mode == "ebpf"
                    else ""
                )
                print(
                    f"round {k + 1} {mode:7}: write {s.write_ns:.0f} ns/call, epoll_wait "
                    f"{s.wait_ns:.0f} ns/call{extra}; load {c.load()}"
                )

    def med(mode: str, kind: str) -> float:
        of = [s for s in samples if s.mode == mode]
        return c.median([s.write_ns if kind == "write" else s.wait_ns for s in of])

    traced = [s for s in samples if s.mode == "ebpf"]
    lost = sum(s.lost for s in traced)
    shim_lost = sum(s.lost for s in samples if s.mode == "preload")
    per_wait = sum(s.lines for s in traced) / max(len(traced) * args.calls, 1)
    tracer_ns = c.median([s.tracer_ns_per_line for s in traced])
    added = {
        kind: " / ".join(f"{med(m, kind) - med('off', kind):.0f}" for m in MODES[1:])
        for kind in KINDS
    }
    c.append_row(
        "tracer-call-cost",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            f"{args.calls}, {args.rounds}",
            *(" / ".join(f"{med(m, kind):.0f}" for m in MODES) for kind in KINDS),
            f"{added['write']}; {added['epoll_wait']}",
            f"{per_wait:.2f}, {tracer_ns:.0f}, {lost} lost; {shim_lost}",
        ],
        title="What one traced call costs: thread CPU ns per call, shim and eBPF",
    )
    print(
        "added ns per call (write; epoll_wait): "
        + "; ".join(
            f"{m} {med(m, 'write') - med('off', 'write'):.0f}; "
            f"{med(m, 'epoll_wait') - med('off', 'epoll_wait'):.0f}"
            for m in MODES[1:]
        )
        + f"; loader {tracer_ns:.0f} ns per printed line; lost: ebpf {lost}, shim {shim_lost}"
    )


if __name__ == "__main__":
    main()
