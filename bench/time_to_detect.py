"""Time to detect seed-buggy's bug: afterclose's demo storm loop vs ``siege -b -c 1000``.

    python3 bench/time_to_detect.py [--afterclose-runs 20] [--siege-runs 5] [--cap 60]
                                    [--siege-concurrency 1000] [--budget 600] [--keep]

afterclose side: exactly what ``afterclose demo`` does to seed-buggy (the demo's storm, from
``harness/cli/demo.py``, on a fresh traced target per round, judged after each round), until a rule
is violated.  Recorded per run: the time to the first violation of any rule (the demo's "FOUND
after"), the rules of that round (first = first in the report: black-box rules come before
traced ones), and the time to the first *traced* rule (one only the tracer can report); the
loop goes on after a black-box finding until a traced rule appears or the cap is reached.

siege side (the seed's own method): ``siege -b -c N -t CAPs`` at the untraced target; the only
detection is the target crashing.  Before the runs the script also checks, in well under a
second, whether siege can send what reaches seed-buggy's error path at all (a header block
larger than its 8 KiB buffer), and records what siege does instead.

Runs are interleaved (the siege runs spread among the afterclose runs).  A run that finds
nothing within ``--cap`` counts as the cap, and the table says how many were capped.  The
target and the tracer shim are built before any clock starts.
"""

from __future__ import annotations

import argparse
import inspect
import random
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

from afterclose.harness.cli import demo
from afterclose.harness.oracle import registry
from afterclose.harness.runners.base import Server
from afterclose.harness.session import Harness, Settings, TargetRun

TARGET = "seed-buggy"
BLACK_BOX = {"crash", "liveness", "cross-talk", "fd-leak"}
# Rules only the tracer can report (fd-leak is also checked black-box, so it is not counted).
TRACED = {r.name for r in registry.RULES if r.traced is not None} - BLACK_BOX
COLUMNS = (
    *c.CONTEXT_COLUMNS,
    "afterclose: runs: median / worst to the first report",
    "first rule reported (runs)",
    "afterclose: median / worst to the first traced rule: which (runs)",
    "afterclose: target died in (runs), median time of death",
    "siege: runs: median / worst to a crash",
    "can siege reach the error path?",
    "afterclose median < 5 s?",
    "ratio siege / afterclose (medians)",
)


@dataclass
class HuntResult:
    first_s: float | None = None
    first_rules: list[str] = field(default_factory=list)
    traced_s: float | None = None
    traced_rule: str | None = None
    died_s: float | None = None  # when the target died, if it did, on the same clock
    rounds: int = 0


class DeathWatch:
    """Notes when a running target dies (polled every 10 ms on a thread), on ``clock0``'s
    clock: the storm goes on for its whole duration after a crash, and this shows how much
    of the time to detect that is."""

    def __init__(self, target: Server, clock0: float) -> None:
        self.died_s: float | None = None
        self._target = target
        self._clock0 = clock0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            if self._target.exit_status() is not None:
                self.died_s = time.monotonic() - self._clock0
                return

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.died_s


def storm(run: TargetRun, rounds: int) -> None:
    """The demo's storm, whatever the signature of ``demo.storm`` is today."""
    fn = demo.storm
    if len(inspect.signature(fn).parameters) == 1:
        fn(run)  # type: ignore[arg-type,call-arg,unused-ignore]
    else:
        fn(run, rounds)  # type: ignore[arg-type,call-arg,unused-ignore]


def hunt(cap_s: float, workdir: Path) -> HuntResult:
    """The demo's loop on seed-buggy, traced, until a traced rule appears or ``cap_s``."""
    settings = Settings(
        target=TARGET,
        rootdir=c.ROOT,
        run_id=uuid.uuid4().hex,
        tracer="preload",
        fault_seed=random.randrange(2**32),
    )
    harness = Harness(settings)
    harness.artefact  # noqa: B018 - build (cached) before the clock starts
    result = HuntResult()
    start = time.monotonic()
    while time.monotonic() - start < cap_s:
        result.rounds += 1
        name = f"bench-round-{result.rounds}"
        with harness.start(workdir / name, name) as run:
            watch = DeathWatch(run.server, start)
            try:
                storm(run, result.rounds)
            finally:
                died = watch.stop()
            outcome = run.finish()
        if died is not None and result.died_s is None:
            result.died_s = died
        elapsed = time.monotonic() - start
        shutil.rmtree(workdir / name, ignore_errors=True)
        rules = [v.rule for v in outcome.violations]
        if rules and result.first_s is None:
            result.first_s, result.first_rules = elapsed, rules
        traced = [r for r in rules if r in TRACED]
        if traced:
            result.traced_s, result.traced_rule = elapsed, traced[0]
            break
    # A finding after the cap counts as capped, like a run that found nothing.
    if result.first_s is not None and result.first_s > cap_s:
        result.first_s, result.first_rules = None, []
    if result.traced_s is not None and result.traced_s > cap_s:
        result.traced_s, result.traced_rule = None, None
    return result


@dataclass
class SiegeResult:
    crash_s: float | None
    note: str


def siege_run(cap_s: float, concurrency: int, workdir: Path, rc: Path) -> SiegeResult:
    manifest = c.seed_manifest(TARGET)
    artefact = c.build(manifest)
    with c.started(manifest, artefact, "off", workdir) as started:
        argv = c.siege_argv(rc, started.url, concurrency=concurrency, seconds=cap_s, close=False)
        accepted = c.tcp_passive_opens()
        result = c.run_tool(
            argv,
            timeout_s=cap_s + 5,
            env=c.siege_env(rc),
            stop_when=lambda: not started.alive(),
        )
        accepted = c.tcp_passive_opens() - accepted
        crashed = not started.alive()
        status = started.target.exit_status()
    stats = c.siege_stats(result)
    if stats:
        done, failed = int(stats.get("transactions", 0)), int(stats.get("failed_transactions", 0))
        note = f"{done} transactions, {failed} failed"
    else:
        # siege 4.0.x often never exits after a timed run with many users (JoeDog/siege#66).
        note = "siege printed no summary" + (" (hung past -t, killed)" if result.timed_out else "")
    note += f"; kernel: {accepted / result.wall_s:.0f} accepted connections/s (system-wide)"
    if crashed:
        assert status is not None
        return SiegeResult(result.wall_s, f"target {status.describe()}; {note}")
    return SiegeResult(None, f"target alive after {result.wall_s:.0f} s; {note}")


def siege_probes(workdir: Path, rc: Path) -> list[str]:
    """Can siege send what reaches seed-buggy's error path (a header block over 8 KiB)?"""
    manifest = c.seed_manifest(TARGET)
    artefact = c.build(manifest)
    siege = c.require("siege")["siege"]
    notes: list[str] = []
    with c.started(manifest, artefact, "off", workdir / "probe") as started:
        urls = workdir / "urls.txt"
        urls.write_text(started.url + "x" * 9000 + "\n")
        tries = {
            "a 9000-byte header (-H)": ["-H", "X-Pad: " + "x" * 9000, started.url],
            "a 9000-byte URL (-f urls.txt)": ["-f", str(urls)],
        }
        for what, args in tries.items():
            argv = [siege, "-R", str(rc), "-b", "-c", "1", "-r", "1", *args]
            result = c.run_tool(argv, timeout_s=10, env=c.siege_env(rc))
            said = [ln.strip() for ln in c.strip_ansi(result.stderr + result.stdout).splitlines()]
            # A fresh $HOME makes siege announce its new config template: skip that chatter.
            errors = [ln for ln in said if re.search(r"fatal|error|smashing|abort", ln, re.I)]
            last = (errors or [ln for ln in said if ln] or [""])[-1]
            if result.returncode is not None and result.returncode < 0:
                last = f"siege died of signal {-result.returncode}" + (f" ({last})" if last else "")
            notes.append(f"{what}: exit {result.returncode}, {last or 'no output'}")
        notes.append(f"target alive after the probes: {started.alive()}")
    return notes


def summarise(values: list[float | None], cap_s: float) -> tuple[float, float, int]:
    """Median, worst and how many were capped; a capped run counts as ``cap_s``."""
    capped = sum(v is None for v in values)
    filled = [cap_s if v is None else v for v in values]
    return c.median(filled), max(filled, default=float("nan")), capped


def tally(names: list[str]) -> str:
    counts = Counter(names)
    return ", ".join(f"{name} ({n})" for name, n in counts.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--afterclose-runs", type=int, default=20)
    parser.add_argument("--siege-runs", type=int, default=5)
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per run")
    parser.add_argument("--siege-concurrency", type=int, default=1000)
    parser.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="seconds for all runs: no run starts that could end after it (fewer runs then)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    command = c.command_line(
        "time_to_detect.py",
        [
            f"--afterclose-runs={args.afterclose_runs}",
            f"--siege-runs={args.siege_runs}",
            f"--cap={args.cap:g}",
            f"--siege-concurrency={args.siege_concurrency}",
            f"--budget={args.budget:g}",
        ],
    )
    c.require("siege")
    load_before = c.load()
    c.build(c.seed_manifest(TARGET))
    c.warm_shim()
    hunts: list[HuntResult] = []
    sieges: list[SiegeResult] = []
    with c.scratch("ttd", args.keep) as scratch:
        rc = c.siege_rc(scratch, limit=max(4096, args.siege_concurrency))
        probes = siege_probes(scratch, rc)
        for note in probes:
            print(f"siege probe: {note}")
        order = c.interleave(args.afterclose_runs, args.siege_runs)
        began = time.monotonic()
        for i, side in enumerate(order, 1):
            if time.monotonic() - began > args.budget - args.cap:
                print(f"budget of {args.budget:g} s spent: {len(order) - i + 1} run(s) not started")
                break
            if side == "a":
                h = hunt(args.cap, scratch / f"afterclose-{i}")
                hunts.append(h)
                first = "none" if h.first_s is None else f"{h.first_s:.1f} s"
                traced = "none" if h.traced_s is None else f"{h.traced_s:.1f} s {h.traced_rule}"
                died = "no" if h.died_s is None else f"{h.died_s:.1f} s"
                print(
                    f"[{i}/{len(order)}] afterclose: first report {first} "
                    f"[{', '.join(h.first_rules)}]; first traced rule {traced}; "
                    f"target died {died}; {h.rounds} round(s); load {c.load()}"
                )
            else:
                r = siege_run(args.cap, args.siege_concurrency, scratch / f"siege-{i}", rc)
                sieges.append(r)
                took = "none" if r.crash_s is None else f"{r.crash_s:.1f} s"
                print(
                    f"[{i}/{len(order)}] siege -c {args.siege_concurrency}: crash {took}; "
                    f"{r.note}; load {c.load()}"
                )
    cap = args.cap
    a_med, a_worst, a_capped = summarise([h.first_s for h in hunts], cap)
    t_med, t_worst, t_capped = summarise([h.traced_s for h in hunts], cap)
    s_med, s_worst, s_capped = summarise([r.crash_s for r in sieges], cap)
    deaths = [h.died_s for h in hunts if h.died_s is not None]
    all_capped = bool(sieges) and s_capped == len(sieges)
    ratio = c.ratio(s_med, a_med)
    ratio_text = f"{'>= ' if all_capped else ''}{ratio:.1f}"
    under = "yes" if a_med < 5.0 else "no"
    c.append_row(
        "time-to-detect",
        COLUMNS,
        [
            *c.context_cells(command, load_before),
            f"{len(hunts)}: {c.fmt_s(a_med)} / {c.fmt_s(a_worst)} ({a_capped} capped)",
            tally([h.first_rules[0] if h.first_rules else "none" for h in hunts]),
            f"{c.fmt_s(t_med)} / {c.fmt_s(t_worst)} ({t_capped} capped): "
            + tally([h.traced_rule or "none" for h in hunts]),
            f"{len(deaths)}/{len(hunts)}, median {c.fmt_s(c.median(deaths))}",
            f"{len(sieges)}: {c.fmt_s(s_med)} / {c.fmt_s(s_worst)} "
            f"({s_capped} capped at {cap:g} s)",
            "; ".join(probes),
            f"{under} ({c.fmt_s(a_med)})",
            ratio_text + (" (every siege run capped: a lower bound)" if all_capped else ""),
        ],
        title="Time to detect seed-buggy's bug",
    )
    print(
        f"afterclose ({len(hunts)} runs): first report median {a_med:.1f} s, worst "
        f"{a_worst:.1f} s ({a_capped} capped); first traced rule median {t_med:.1f} s, worst "
        f"{t_worst:.1f} s ({t_capped} capped); target died in {len(deaths)} runs, median "
        f"{c.median(deaths):.1f} s after the start; median < 5 s: {under}"
    )
    print(
        f"siege -c {args.siege_concurrency} ({len(sieges)} runs): median {s_med:.1f} s, worst "
        f"{s_worst:.1f} s ({s_capped} capped at {cap:g} s)"
    )
    print(f"ratio siege/afterclose (median time to detect): {ratio_text}")


if __name__ == "__main__":
    main()
