"""Cost of shared exploration: Redis round trips per example at 1, 2 and 4 local workers.

    python3 bench/campaign_redis.py [--workers 1,2,4] [--examples 100] [--runs 3]
                                    [--soak-rounds 6] [--target seed-fixed]

One private ``redis-server`` on loopback (harness/campaign/local_store.py), emptied between
configurations; N worker processes started together against it.  Two kinds of worker:

*search*: what ``afterclose explore --db`` asks of the store, without targets: ``--runs``
Hypothesis runs in a row (each one replays the shared corpus first, as a worker that restarts
does), ``--examples`` examples each, over the explorer's space (harness/explore.py) with the
shared database, shrinking on; the property is a stand-in for a target's verdict that fails
now and then (a ``shutdown_race`` with 30 connections or more, or two phases with more than
three faults in all), so that saves, shrinks and replays happen as they would.

*soak*: ``afterclose soak --mix=generated --db`` for real on ``--target`` (seed-fixed: no
violation, so no early stop), ``--soak-rounds`` rounds per worker; it prints the round trips.

A round trip is one request sent by the Redis client (harness/campaign/shared_db.py counts
them: a pipeline of several commands is one).  Nothing here is part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import _common as c

STAND_IN_CONNECTIONS = 30


def _fails(s: object) -> bool:
    """The stand-in verdict (see the module's docstring)."""
    phases = getattr(s, "phases", ())
    calls = [call for p in phases for call in p.calls]
    big_race = any(
        call.fault == "shutdown_race"
        and int(call.params.get("connections", 0)) >= STAND_IN_CONNECTIONS
        for call in calls
    )
    return big_race or (len(phases) >= 2 and len(calls) > 3)


def search_worker(url: str, examples: int, runs: int, seed: int) -> dict[str, int]:
    from hypothesis import Phase as HPhase
    from hypothesis import given
    from hypothesis import seed as hypothesis_seed

    from afterclose.harness import explore
    from afterclose.harness.campaign.shared_db import SharedExamples, search_space

    names = explore.default_faults()
    shared = SharedExamples(
        url, search_space("bench", "stand-in", names) + ":3", log=lambda _: None
    )
    start_trips = shared.round_trips  # connecting and PING: once per worker
    ran = failures = 0
    for run in range(runs):

        @explore.search_settings(examples, shared, HPhase.generate, HPhase.shrink)
        @hypothesis_seed(seed * 1000 + run)
        @given(explore.scenarios(names))
        def prop(s: explore.Scenario) -> None:
            nonlocal ran, failures
            ran += 1
            if _fails(s):
                failures += 1
                raise AssertionError("stand-in violation")

        # The stand-in violation (or Flaky): what a campaign would write out.
        with contextlib.suppress(Exception):
            prop()
    trips = shared.round_trips - start_trips
    shared.close()
    return {
        "examples": ran,
        "failures": failures,
        "round_trips": trips,
        "connect_trips": start_trips,
        "replayed": shared.database.fetched,
    }


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def measure_search(url: str, n: int, examples: int, runs: int) -> dict[str, float]:
    _flush(url)
    me = [sys.executable, str(Path(__file__).resolve())]
    procs = [
        _spawn(
            [
                *me,
                "--worker",
                url,
                "--examples",
                str(examples),
                "--runs",
                str(runs),
                "--seed",
                str(i + 1),
            ]
        )
        for i in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    examples_all = sum(r["examples"] for r in results)
    trips = sum(r["round_trips"] for r in results)
    return {
        "workers": n,
        "examples": examples_all,
        "failures": sum(r["failures"] for r in results),
        "round_trips": trips,
        "per_example": trips / max(1, examples_all),
        "replayed": sum(r["replayed"] for r in results),
    }


def measure_soak(url: str, n: int, rounds: int, target: str, scratch: Path) -> dict[str, float]:
    _flush(url)
    procs = [
        _spawn(
            [
                sys.executable,
                "-m",
                "afterclose.harness.cli",
                "soak",
                f"--target={target}",
                "--mix=generated",
                f"--db={url}",
                "--duration=30m",
                f"--max-rounds={rounds}",
                f"--seed={i + 1}",
                f"--campaign-dir={scratch / f'soak-{n}-{i}'}",
            ]
        )
        for i in range(n)
    ]
    trips = ran = 0
    for p in procs:
        out, err = p.communicate(timeout=3600)
        found = re.search(r"shared store: (\d+) round trip\(s\) for (\d+) round\(s\)", out)
        if found is None:
            raise SystemExit(f"soak worker: no round trips reported:\n{out}\n{err[-2000:]}")
        trips += int(found.group(1))
        ran += int(found.group(2))
    return {"workers": n, "examples": ran, "round_trips": trips, "per_example": trips / max(1, ran)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--soak-rounds", type=int, default=6)
    parser.add_argument("--target", default="seed-fixed")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(search_worker(args.worker, args.examples, args.runs, args.seed)))
        return 0
    from afterclose.harness.campaign.local_store import local_redis

    counts = [int(x) for x in args.workers.split(",")]
    m = c.machine()
    print(f"{c.today()}, {m.describe()}, load {c.load()}")
    print(
        "| workers | kind | examples (all workers) | failing | round trips | per example | took |"
    )
    print("|---|---|---|---|---|---|---|")
    with local_redis() as url, c.scratch("afterclose-bench-campaign-") as scratch:
        for n in counts:
            began = time.monotonic()
            r = measure_search(url, n, args.examples, args.runs)
            print(
                f"| {n} | search | {r['examples']:.0f} | {r['failures']:.0f} | "
                f"{r['round_trips']:.0f} | {r['per_example']:.3f} | "
                f"{time.monotonic() - began:.0f} s |"
            )
        for n in counts if args.soak_rounds else ():
            began = time.monotonic()
            r = measure_soak(url, n, args.soak_rounds, args.target, scratch)
            print(
                f"| {n} | soak {args.target} | {r['examples']:.0f} | 0 | "
                f"{r['round_trips']:.0f} | {r['per_example']:.3f} | "
                f"{time.monotonic() - began:.0f} s |"
            )
    print(f"load at the end {c.load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
