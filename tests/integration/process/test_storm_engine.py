"""The storm engine (asyncio in worker processes) against a real seed-fixed on loopback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from paths import ROOT_DIR
from procs import alive

from afterclose import faults
from afterclose.faults.base import Endpoint, FaultReport
from afterclose.faults.connection_storm import BEHAVIOURS
from afterclose.harness.client import engine
from afterclose.harness.errors import ScenarioError
from afterclose.harness.session import Harness, Settings, TargetRun

ROOT = ROOT_DIR


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TargetRun]:
    """One untraced seed-fixed for the module; judged at the end (no rule may be violated)."""
    settings = Settings(
        target="seed-fixed", rootdir=ROOT, run_id=uuid.uuid4().hex, tracer="off", fault_seed=1
    )
    harness = Harness(settings)
    with harness.start(tmp_path_factory.mktemp("storm-engine"), "storm-engine") as run:
        yield run
        outcome = run.finish()
    assert outcome.ok, run.failure_message(outcome)


# Every behaviour runs on both engines; the rest on the compiled one, which "auto" picks for
# HTTP (the asyncio engine's own tests: the standard-loop test, and every other protocol).
ENGINES = pytest.mark.parametrize("engine_name", ["native", "asyncio"])
NATIVE = pytest.mark.parametrize("engine_name", ["native"])


def storm(
    run: TargetRun,
    params: Mapping[str, object],
    *,
    seed: int = 1,
    budget_s: float = 10.0,
    endpoint: Endpoint | None = None,
) -> tuple[FaultReport, list[engine.StormProgress]]:
    fault = faults.create("connection_storm", params, where="test_storm_engine.py")
    seen: list[engine.StormProgress] = []
    with engine.watch(seen.append):
        report = fault.run(
            endpoint or run.endpoint(), random.Random(seed), time.monotonic() + budget_s
        )
    if params.get("engine") == "native":
        assert report.counts["native_engine"] == 1 and seen[-1].loop == "native"
    elif params.get("engine") == "asyncio":
        assert report.counts["native_engine"] == 0 and seen[-1].loop != "native"
    return report, seen


@NATIVE
def test_runs_across_processes_and_reports_its_connections(
    fixed: TargetRun, engine_name: str
) -> None:
    params = {
        "rate_per_s": 400,
        "duration_s": 0.5,
        "concurrency": 16,
        "processes": 2,
        "engine": engine_name,
    }
    report, seen = storm(fixed, params)
    last = seen[-1]
    assert last.finished and last.processes == 2 and report.counts["storm_processes"] == 2
    assert len(set(last.pids)) == 2 and os.getpid() not in last.pids
    assert all(n > 0 for n in last.per_process), last
    assert sum(last.per_process) == last.connections == report.counts["connections"]
    assert report.counts["connections"] > 0, report.summary()
    assert report.counts["responses"] > 0 and report.observations == []
    assert not any(alive(pid) for pid in last.pids)  # reaped before run() returned


def test_rate_cap_is_honoured(fixed: TargetRun) -> None:
    # 1 s at 200/s: the plan holds 200 connections, and they take the whole second.  (A busy
    # machine may start fewer: how many it reaches is bench/storm_rate.py's business.)
    params = {"rate_per_s": 200, "duration_s": 1.0, "concurrency": 32, "mix": {"close": 1}}
    report, seen = storm(fixed, params)
    made = report.counts["connections"]
    assert 0 < made <= 200 and report.elapsed_s >= 0.9, report.summary()
    # Half-way through, at most about half had started (a storm ignoring its rate would be done).
    middle = min(seen, key=lambda p: abs(p.elapsed_s - 0.5))
    assert middle.started <= 160, middle
    # 200/s planned for 10 s but cut by a 1 s budget: about 200, never the 2000 planned.
    report, _ = storm(fixed, {**params, "duration_s": 10.0}, budget_s=1.0)
    assert 0 < report.counts["connections"] <= 260, report.summary()
    assert report.counts["not_started"] >= 1700


@NATIVE
def test_malformed_requests_get_a_400(fixed: TargetRun, engine_name: str) -> None:
    params = {
        "rate_per_s": 400,
        "duration_s": 0.25,
        "concurrency": 16,
        "mix": {"malformed": 1},
        "engine": engine_name,
    }
    report, _ = storm(fixed, params)
    sent = report.counts["malformed_sent"]
    assert sent > 0, report.summary()
    # seed-fixed answers every malformed request with a 400 and closes.
    assert report.counts["status:400"] == report.counts["malformed_answered"] == sent
    assert report.counts["closed_by_peer"] == sent and report.observations == []


@NATIVE
def test_slow_senders_are_answered(fixed: TargetRun, engine_name: str) -> None:
    params = {
        "rate_per_s": 300,
        "duration_s": 0.3,
        "concurrency": 64,
        "mix": {"slow_sender": 1},
        "engine": engine_name,
    }
    report, _ = storm(fixed, params)
    slow = report.counts["slow_requests"]
    assert slow > 0 and slow == report.counts["connections"], report.summary()
    assert report.counts["status:200"] == report.counts["responses"] == slow
    assert report.observations == []
    assert any("slow_sender" in line and "pieces" in line for line in report.schedule)


@ENGINES
def test_every_behaviour_runs_without_observations(fixed: TargetRun, engine_name: str) -> None:
    mix = dict.fromkeys(BEHAVIOURS, 1)
    params = {
        "rate_per_s": 1000,
        "duration_s": 0.5,
        "concurrency": 64,
        "mix": mix,
        "engine": engine_name,
    }
    report, seen = storm(fixed, params)
    assert report.counts["connections"] > 0, report.summary()
    for key in ("rst_sent", "fin_sent", "malformed_sent", "slow_requests", "partial_requests"):
        assert report.counts[key] > 0, key
    assert report.observations == [] and seen[-1].errors == 0, report.summary()


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"processes": 0}, ["'processes'", "= 0", "1..32"]),
        ({"processes": "2"}, ["'processes'", "integer"]),
        ({"mix": {"slow_sendr": 1}}, ["unknown key 'slow_sendr'", "did you mean 'slow_sender'"]),
        ({"mix": {"malformed": 1, "rst": 1}}, ["unknown key 'rst'"]),
    ],
)
def test_bad_parameters_get_a_clear_error(params: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ScenarioError) as err:
        faults.create("connection_storm", params, where="scenarios/x.toml: phase[0]")
    text = err.value.render()
    assert text.startswith("scenarios/x.toml: phase[0]: fault 'connection_storm'")
    for word in words:
        assert word in text


def test_same_seed_same_schedule_whatever_the_processes(fixed: TargetRun) -> None:
    params = {"rate_per_s": 500, "duration_s": 0.1, "concurrency": 8}
    one, _ = storm(fixed, {**params, "processes": 1}, seed=7)
    three, seen = storm(fixed, {**params, "processes": 3}, seed=7)
    other, _ = storm(fixed, {**params, "processes": 3}, seed=8)
    assert seen[-1].processes == 3
    assert one.schedule == three.schedule and len(one.schedule) == 50
    assert one.schedule != other.schedule
    fault = faults.create("connection_storm", params, "test")
    assert fault.schedule(random.Random(7)) == one.schedule


@NATIVE
def test_stops_when_the_target_is_gone(fixed: TargetRun, engine_name: str) -> None:
    cut = time.monotonic() + 0.4
    endpoint = replace(fixed.endpoint(), gone=lambda: time.monotonic() > cut)
    params = {"rate_per_s": 200, "duration_s": 5, "engine": engine_name}
    report, _ = storm(fixed, params, endpoint=endpoint)
    # Stopped, not waited out: the flag, and most of the 1,000 planned connections unstarted.
    assert report.counts["stopped_target_gone"] == 1 and report.counts["not_started"] >= 700


def test_the_standard_asyncio_loop_works_too(
    fixed: TargetRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(engine.LOOP_ENV, "asyncio")
    params = {"rate_per_s": 400, "duration_s": 0.25, "concurrency": 16, "engine": "asyncio"}
    report, seen = storm(fixed, params)
    assert seen[-1].loop == "asyncio" and report.counts["native_engine"] == 0
    assert report.counts["connections"] > 0 and report.observations == [], report.summary()


def test_the_compiled_engine_takes_the_default_mix_and_says_why_it_declines(
    fixed: TargetRun,
) -> None:
    report, seen = storm(fixed, {"rate_per_s": 500, "duration_s": 0.2})  # engine "auto"
    assert report.counts["native_engine"] == 1 and seen[-1].loop == "native"
    tls = replace(fixed.endpoint(), tls=True)
    with pytest.raises(ScenarioError) as err:
        storm(fixed, {"rate_per_s": 100, "duration_s": 0.1, "engine": "native"}, endpoint=tls)
    assert "TLS" in err.value.render() and "engine = 'auto'" in err.value.render()


def test_workers_are_killed_when_the_parent_fails(fixed: TargetRun) -> None:
    pids: list[int] = []

    def fail(progress: engine.StormProgress) -> None:
        pids.extend(progress.pids)
        raise RuntimeError("the listener broke")

    fault = faults.create("connection_storm", {"rate_per_s": 100, "duration_s": 30}, "test")
    start = time.monotonic()
    with engine.watch(fail), pytest.raises(RuntimeError, match="the listener broke"):
        fault.run(fixed.endpoint(), random.Random(1), time.monotonic() + 60)
    assert time.monotonic() - start < 30  # the storm's own end: it stopped at the failure
    assert pids and not any(alive(pid) for pid in pids)


CTRL_C_SCRIPT = """\
import random, sys, time
from afterclose import faults
from afterclose.harness.client import engine
from afterclose.faults.base import Endpoint

def show(progress):
    if not getattr(show, "done", False):
        show.done = True
        print(" ".join(map(str, progress.pids)), flush=True)

fault = faults.create("connection_storm", {"rate_per_s": 50, "duration_s": 60}, "test")
with engine.watch(show):
    try:
        fault.run(Endpoint("127.0.0.1", int(sys.argv[1])), random.Random(1), time.monotonic() + 90)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_ctrl_c_kills_the_workers(fixed: TargetRun, tmp_path: Path) -> None:
    script = tmp_path / "storm.py"
    script.write_text(textwrap.dedent(CTRL_C_SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(fixed.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == engine.DEFAULT_PROCESSES and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (to the parent; see _isolate)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert "interrupted" in out
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
