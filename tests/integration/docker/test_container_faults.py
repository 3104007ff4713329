"""Target-side faults (fd_limit, pause, kill, pids_limit, memory_limit) on real targets under
both runners, parallel xdist workers that never see each other's traffic, and the built-in
suite giving the same verdicts under --runner=process and --runner=docker.

The servers: ``seed-fixed`` (must survive everything), ``tests/servers/emfile.c`` (spins or
leaks on EMFILE, by mode) and a small Python server that keeps, or loses, a state token across
a restart.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import sys
import textwrap
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import capabilities
import pytest
from paths import ROOT_DIR

from afterclose import faults
from afterclose.faults.base import FaultReport
from afterclose.harness import procfs
from afterclose.harness.errors import ScenarioError
from afterclose.harness.protocols import http
from afterclose.harness.runners.docker import ContainerServer
from afterclose.harness.session import Harness, Outcome, Settings, TargetRun

ROOT = ROOT_DIR
EMFILE = ROOT / "tests" / "servers" / "emfile.c"
DOCKER_ECHO = ROOT / "tests" / "docker_programs" / "target.toml"
RUNNERS = ["process", pytest.param("docker", marks=pytest.mark.docker)]
# seed-buggy's one bug is a race.  A malformed request hands its connection to the error thread
# while the worker re-arms it; if the hang-up (the client's close or RST, or the error thread's
# own shutdown) then reaches a worker, the worker frees the client and closes the fd while the
# error thread still uses both.  Whether a run's traffic lands in that window is scheduling.
# These tests are made to land in it (nearly every run does); any test whose traffic holds a
# malformed request may land in it by chance.  What landing in it produces:
RACE_TESTS = ("test_shutdown_race", "test_connection_storm")
RACE_RULES = {
    "freed-while-registered",  # the worker frees what the error thread re-arms
    "concurrent-oneshot",  # the error thread and a worker act on one connection at once
    "event-for-freed-data",
    "use-after-close",  # the error thread writes to / shuts down / re-arms a closed fd
    "wrong-incarnation",  # ... or the number the kernel gave a new connection meanwhile
    "foreign-close",  # the error thread closes a connection it was never handed
    "dropped-request",  # its shutdown ends a connection whose complete request awaits an answer
    "stale-rearm",
    "event-after-close",
    "cross-talk",  # its 400 reaches that new connection's client
    "crash",  # double free, segfault
    "liveness",  # after the crash
}
RACE_WAIT_RUNS = 3  # further runs of a race test whose run missed the window
# Quick settings: EMFILE is reached within a fraction of a second of holding.
FD_QUICK: dict[str, object] = {
    "storm_s": 0.5,
    "rate_per_s": 200,
    "concurrency": 24,
    "window_s": 0.5,
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def docker_ok() -> None:
    capabilities.need("docker")


@pytest.fixture(params=RUNNERS)
def runner(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if name == "docker":
        request.getfixturevalue("docker_ok")
    return name


def harness(target: str | Path, runner: str = "process", tracer: str = "off") -> Harness:
    return Harness(
        Settings(
            target=str(target),
            rootdir=ROOT,
            run_id=uuid.uuid4().hex,
            runner=runner,
            tracer=tracer,
        )
    )


def emfile_manifest(folder: Path, mode: str) -> Path:
    path = folder / f"emfile-{mode}.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "emfile-{mode}"
            command = ["{{build}}", "{{host}}", "{{port}}", "{mode}"]
            echo_path = true
            fd_grace_s = 0.5
            [compile]
            sources = ["{EMFILE}"]
            cflags = ["-O2", "-Wall"]
            [ready]
            log = "READY"
            """
        )
    )
    return path


STATEFUL = """\
import http.server, pathlib, sys, uuid
host, port, mode, workdir = sys.argv[1:5]
state = pathlib.Path(workdir) / "state"
if mode == "persist" and state.exists():
    token = state.read_text()
else:
    token = uuid.uuid4().hex
    if mode == "persist":
        state.write_text(token)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ((token if self.path == "/state" else self.path) + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
print("READY", flush=True)
server.serve_forever()
"""


def stateful_manifest(folder: Path, mode: str) -> Path:
    script = folder / "stateful.py"
    script.write_text(STATEFUL)
    path = folder / f"stateful-{mode}.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "stateful-{mode}"
            command = ["{sys.executable}", "{script}", "{{host}}", "{{port}}", "{mode}",
                       "{{workdir}}"]
            echo_path = true
            restart_keeps = ["/state"]
            [ready]
            log = "READY"
            """
        )
    )
    return path


def rules(outcome: Outcome) -> set[str]:
    return {v.rule for v in outcome.violations}


def rendered(outcome: Outcome) -> str:
    return "\n".join(v.render() for v in outcome.violations)


def nofile_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


Show = Callable[[FaultReport], None]


@pytest.fixture
def show_cpu(request: pytest.FixtureRequest) -> Show:
    """Put an fd_limit report's numbers (limit, CPU at idle, held at the limit, after) in the
    test's report: ``pytest -rA`` prints them."""

    def show(report: FaultReport) -> None:
        keys = ("nofile", "idle_cpu_pct", "hold_cpu_pct", "hold_cpu_used_pct", "after_cpu_pct")
        found = {k: report.counts.get(k, 0) for k in keys}
        request.node.add_report_section("call", "numbers", json.dumps(found))

    return show


# --------------------------------------------------------------------------- the registry


def test_registry_lists_both_kinds_and_keeps_them_apart() -> None:
    target_side = {"fd_limit", "kill", "memory_limit", "netem", "pause", "pids_limit"}
    assert target_side <= set(faults.available("all"))
    assert set(faults.available("target")) == target_side
    # Plain "faults" stay the client-side ones: what scenario phases and the explorer run.
    assert not target_side & set(faults.available())
    assert "connection_storm" in faults.available("client")
    for name in target_side:
        cls = faults.get_target(name)
        assert cls.name == name and cls.describe_params()
        assert faults.kind(name) == "target" and faults.get_any(name) is cls
    with pytest.raises(ScenarioError) as err:
        faults.get("pause", where="scenarios/x.toml")  # what a scenario phase asks for
    assert "target-side" in err.value.message and "run_fault('pause'" in str(err.value.hint)
    with pytest.raises(ScenarioError) as err:
        faults.create_target("fd_limit", {"spare_fd": 3}, where="w")
    assert "did you mean 'spare_fds'" in str(err.value.hint)
    with pytest.raises(ScenarioError):
        faults.create_target("kill", {"signal": "SIGHUP"}, where="w")
    with pytest.raises(ScenarioError):
        faults.get_target("reset_peer")
    # The schedule is a function of the seed, as for client faults.
    import random

    pause = faults.create_target("pause", {"storm_s": 0.5}, where="w")
    assert pause.plan(random.Random(7)) == pause.plan(random.Random(7))


def test_cgroup_faults_need_the_docker_runner(tmp_path: Path) -> None:
    with harness("seed-fixed").start(tmp_path / "run", "cgroup") as run:
        for name in ("pids_limit", "memory_limit"):
            with pytest.raises(ScenarioError) as err:
                run.run_fault(name)
            assert "needs --runner=docker" in err.value.message
            assert "--runner=docker" in str(err.value.hint)
        assert run.finish().ok


# --------------------------------------------------------------------------- fd_limit


def test_fd_limit_seed_fixed_survives_emfile(tmp_path: Path, runner: str, show_cpu: Show) -> None:
    with harness("seed-fixed", runner).start(tmp_path / "run", "fd") as run:
        pid = run.server.host_pids()[0]
        before = nofile_of(pid)
        report = run.run_fault("fd_limit", **FD_QUICK)
        # The limit reached the live process (a container's too) and stays for the test.
        assert nofile_of(pid) == report.counts["nofile"] < before
        outcome = run.finish()
    show_cpu(report)
    assert outcome.ok, rendered(outcome)
    assert report.counts["reached_limit"] == 1, report.summary()
    assert report.counts["hold_cpu_pct"] < 20, report.summary()
    assert report.counts["responses"] > 0


def test_fd_limit_finds_a_server_spinning_on_emfile(tmp_path: Path, show_cpu: Show) -> None:
    manifest = emfile_manifest(tmp_path, "spin")
    with harness(manifest).start(tmp_path / "run", "spin") as run:
        report = run.run_fault("fd_limit", **FD_QUICK)
        outcome = run.finish()
    show_cpu(report)
    assert rules(outcome) == {"busy-loop"}, rendered(outcome)
    busy = next(v for v in outcome.violations if v.rule == "busy-loop")
    assert "at its fd limit" in busy.summary and "EMFILE" in busy.summary
    assert report.counts["hold_cpu_pct"] > 50, report.summary()
    # It recovers once an fd is free: no leak, and it answers.


def test_fd_limit_finds_a_server_leaking_on_emfile(tmp_path: Path, show_cpu: Show) -> None:
    manifest = emfile_manifest(tmp_path, "leak")
    with harness(manifest).start(tmp_path / "run", "leak") as run:
        # One fd left to the storm: the first request finds none for its file and leaks.
        report = run.run_fault("fd_limit", **{**FD_QUICK, "slots": 1})
        outcome = run.finish()
    show_cpu(report)
    # Each request that found no fd left cost one for good: CLOSE_WAIT (and, if every fd the
    # idle clients gave back afterwards leaked too, it stops answering: liveness).
    assert "fd-leak" in rules(outcome), rendered(outcome)
    assert rules(outcome) <= {"fd-leak", "liveness"}, rendered(outcome)
    leak = next(v for v in outcome.violations if v.rule == "fd-leak")
    assert "CLOSE_WAIT" in leak.summary
    assert report.counts["close_wait_after"] > 0


# --------------------------------------------------------------------------- pause


def test_pause_mid_storm_and_resume(tmp_path: Path, runner: str) -> None:
    with harness("seed-fixed", runner, tracer="auto").start(tmp_path / "run", "pause") as run:
        report = run.run_fault("pause", pause_s=0.8, storm_s=1.5)
        assert run.server.exit_status() is None
        assert http.get(run.host, run.port, "/after-pause", timeout_s=3).status == 200
        outcome = run.finish()
    assert outcome.ok, rendered(outcome)
    counts = report.counts
    assert counts["frozen"] == 1, report.summary()
    assert counts["answered_while_paused"] == 0, report.summary()
    assert counts["cpu_ms_while_paused"] == 0, report.summary()
    assert counts["paused_ms"] >= 800
    assert counts["responses"] > 0 and not report.observations


# --------------------------------------------------------------------------- kill


def test_kill_restarts_and_answers(tmp_path: Path, runner: str) -> None:
    with harness("seed-fixed", runner, tracer="auto").start(tmp_path / "run", "kill") as run:
        old = run.server
        old_pid = old.host_pids()[0]
        report = run.run_fault("kill", storm_s=0.8)
        assert run.server is not old and old.exit_status() is not None
        assert run.server.host_pids()[0] != old_pid
        assert run.server.port == old.port
        body = http.get(run.host, run.port, "/after-kill", timeout_s=3).body
        assert b"/after-kill" in body
        outcome = run.finish()
    assert outcome.ok, rendered(outcome)
    if runner == "docker" and outcome.trace_dir is not None:
        # Both containers' targets were PID 1: the dead one's trace now carries its host PID.
        assert (outcome.trace_dir / f"trace.{old_pid}.0.bin").is_file(), list(
            outcome.trace_dir.iterdir()
        )
    assert report.counts["exit:killed_by_SIGKILL"] == 1, report.summary()
    assert report.counts["restart_ms"] > 0
    assert (tmp_path / "run" / "target.stdout.killed-1").read_text().startswith("READY")
    if runner == "docker":
        assert run.server.container_id != old.container_id  # type: ignore[attr-defined]


@pytest.mark.parametrize(("mode", "keeps"), [("persist", True), ("memory", False)])
def test_kill_checks_the_state_the_manifest_promises(
    tmp_path: Path, mode: str, keeps: bool
) -> None:
    manifest = stateful_manifest(tmp_path, mode)
    with harness(manifest).start(tmp_path / "run", f"state-{mode}") as run:
        run.run_fault("kill", storm_s=0)
        outcome = run.finish()
    if keeps:
        assert outcome.ok, rendered(outcome)
        return
    assert rules(outcome) == {"liveness"}, rendered(outcome)
    assert "lost state across SIGKILL" in outcome.violations[0].summary
    assert "GET /state" in outcome.violations[0].summary


# --------------------------------------------------------------------------- cgroup limits


def _cgroup(run: TargetRun, controller: str, v1: str, v2: str) -> str | None:
    return procfs.cgroup_value(run.server.host_pids()[0], controller, v1, v2)


@pytest.mark.docker
def test_pids_limit_takes_effect_and_seed_fixed_survives(docker_ok: None, tmp_path: Path) -> None:
    with harness("seed-fixed", "docker").start(tmp_path / "run", "pids") as run:
        report = run.run_fault("pids_limit", spare_pids=2, storm_s=0.8)
        assert _cgroup(run, "pids", "pids.max", "pids.max") == str(report.counts["pids_max"])
        container = run.server
        assert isinstance(container, ContainerServer)
        attrs = container.api.inspect_container(container.container_id)
        assert attrs["HostConfig"]["PidsLimit"] == report.counts["pids_max"]
        outcome = run.finish()
    assert outcome.ok, rendered(outcome)
    assert report.counts["responses"] > 0


@pytest.mark.docker
def test_pids_limit_refuses_a_fork(docker_ok: None, tmp_path: Path) -> None:
    # The docker-echo server forks a sleeper on GET /fork: at pids.max the fork fails.
    with harness(DOCKER_ECHO, "docker").start(tmp_path / "run", "fork") as run:
        report = run.run_fault("pids_limit", spare_pids=0, storm_s=0)
        refused = procfs.cgroup_key(
            run.server.host_pids()[0], "pids", "pids.events", "pids.events", "max"
        )
        response = http.get(run.host, run.port, "/fork", timeout_s=3)
        assert response.status == 200
        after = procfs.cgroup_key(
            run.server.host_pids()[0], "pids", "pids.events", "pids.events", "max"
        )
        assert refused is not None and after is not None and after > refused
        assert len(run.server.host_pids()) == 1  # no sleeper
        outcome = run.finish()
    assert outcome.ok, rendered(outcome)
    assert report.counts["pids_max"] == report.counts["tasks_before"]


@pytest.mark.docker
def test_memory_limit_takes_effect_and_seed_fixed_survives(docker_ok: None, tmp_path: Path) -> None:
    with harness("seed-fixed", "docker").start(tmp_path / "run", "memory") as run:
        report = run.run_fault("memory_limit", spare_mb=16, storm_s=0.8)
        limit = _cgroup(run, "memory", "memory.limit_in_bytes", "memory.max")
        assert limit == str(report.counts["memory_max_kib"] * 1024)
        container = run.server
        assert isinstance(container, ContainerServer)
        attrs = container.api.inspect_container(container.container_id)
        assert attrs["HostConfig"]["Memory"] == int(limit)
        assert attrs["HostConfig"]["MemorySwap"] == int(limit)  # no swap
        outcome = run.finish()
    assert outcome.ok, rendered(outcome)
    assert report.counts["memory_peak_kib"] <= report.counts["memory_max_kib"]
    assert report.counts["responses"] > 0


# --------------------------------------------------------------------------- netem

# Run in a network namespace of its own: the loopback there starts with the kernel's default
# qdisc, and nothing this does reaches the host's.
NETEM_OWNERSHIP = """
import subprocess
from afterclose.faults import netem
from afterclose.harness.errors import ScenarioError

def root():
    out = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
    return out.stdout.split("\\n")[0]

subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "handle", "9:", "pfifo"], check=True)
try:
    with netem._netem_on_port(8080, ["delay", "5ms"]):
        print("ran")
except ScenarioError as exc:
    print("refused:", exc.message)
print("root:", root())
"""


def test_netem_leaves_a_root_qdisc_it_did_not_add() -> None:
    import os
    import shutil

    if os.geteuid() != 0 or not shutil.which("tc") or not shutil.which("unshare"):
        pytest.skip("needs root, tc and unshare (a network namespace of its own)")
    probe = subprocess.run(
        ["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "handle", "9:", "pfifo"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot add a pfifo qdisc: {probe.stderr.decode().strip()}")
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", NETEM_OWNERSHIP],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused: the loopback already has a root queueing discipline")
    assert "qdisc pfifo 9: root" in lines[0]
    assert lines[1].startswith("root: qdisc pfifo 9: root"), lines


# --------------------------------------------------------------------------- xdist


WORKER_TEST = '''\
import json, os, socket, time
from pathlib import Path

import pytest
from afterclose.harness.protocols import base as proto
from afterclose.harness.protocols import http

SHARED = Path(os.environ["AC_SHARED"])


def rendezvous(name):
    """Both workers start their storms together, so their traffic overlaps."""
    worker = os.environ["PYTEST_XDIST_WORKER"]
    (SHARED / f"{name}.{worker}").touch()
    deadline = time.monotonic() + 60
    while len(list(SHARED.glob(f"{name}.*"))) < 2:
        assert time.monotonic() < deadline, "the other worker never arrived"
        time.sleep(0.01)
    return worker


def own_requests(target, worker, n):
    """Keep-alive requests naming this worker; every body must name the request."""
    bad = []
    with socket.create_connection((target.host, target.port), timeout=5) as sock:
        parser = http.ResponseParser()
        for k in range(n):
            path = f"/own/{worker}/{k}"
            sock.sendall(http.build_get(path, target.host, target.port))
            response = proto.read_reply(sock, parser, time.monotonic() + 5)
            if response.body.strip() != path.encode():
                bad.append((path, response.body[:80]))
    return bad


@pytest.mark.parametrize("round_", [0, 1])
def test_storm(target, round_):
    worker = rendezvous(f"round{round_}")
    started = time.time()
    report = target.run_fault(
        "connection_storm", rate_per_s=400, concurrency=16, duration_s=0.5,
        mix={"keepalive": 3, "close": 1, "idle_drop": 1},
    )
    bad = own_requests(target, worker, 30)
    ended = time.time()
    record = {
        "worker": worker,
        "round": round_,
        "port": target.port,
        "pids": target.server.host_pids(),
        "workdir": str(target.workdir),
        "trace_dir": str(target.tracer.trace_dir),
        "started": started,
        "ended": ended,
        "responses": report.counts["responses"],
        "observations": [o.detail for o in report.observations],
        "bad": [repr(b) for b in bad],
    }
    (SHARED / f"{worker}-{round_}.json").write_text(json.dumps(record))
    assert not report.observations and not bad
'''


def test_parallel_workers_never_see_each_others_traffic(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = pytester.path / "shared"
    shared.mkdir()
    pytester.makepyfile(test_workers=WORKER_TEST)
    monkeypatch.setenv("AC_SHARED", str(shared))  # the workers inherit it
    result = pytester.runpytest_subprocess(
        "--target=seed-fixed",
        "--no-builtin-suite",
        "-n",
        "2",
        "--dist",
        "each",
        "-p",
        "no:cacheprovider",
        timeout=240,
    )
    result.assert_outcomes(passed=4)
    records = [json.loads(p.read_text()) for p in sorted(shared.glob("gw*-*.json"))]
    assert {r["worker"] for r in records} == {"gw0", "gw1"} and len(records) == 4
    for round_ in (0, 1):
        a, b = (r for r in records if r["round"] == round_)
        # The two storms overlapped in time, on two targets of their own.
        assert a["started"] < b["ended"] and b["started"] < a["ended"]
        assert a["port"] != b["port"]
        assert not set(a["pids"]) & set(b["pids"])
        assert a["responses"] > 0 and b["responses"] > 0
        assert a["observations"] == b["observations"] == [] and a["bad"] == b["bad"] == []
    # Every test had its own workdir and trace folder.
    assert len({r["workdir"] for r in records}) == 4
    assert len({r["trace_dir"] for r in records}) == 4
    for r in records:
        assert r["trace_dir"].startswith(r["workdir"])


# --------------------------------------------------------------------------- same verdicts


RULE_LINE = re.compile(r"^\[([a-z-]+)\] ", re.MULTILINE)


def _suite_verdicts(
    folder: Path, target: str, runner: str, select: str | None = None
) -> dict[str, tuple[str, list[str]]]:
    """Per-test verdicts (``passed``/``failed``/...) and the rules a failure names, of the
    built-in suite run by a fresh pytest in ``folder`` with two workers (or just ``select``)."""
    xml = folder / f"{target}-{runner}-{uuid.uuid4().hex[:8]}.xml"
    args = [f"--target={target}", f"--runner={runner}", "-p", "no:cacheprovider", "-q"]
    args += [f"--junitxml={xml}"]
    args += ["-k", select] if select else ["-n", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert xml.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    verdicts: dict[str, tuple[str, list[str]]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        found = {child.tag: child for child in case}
        kind = next((k for k in ("failure", "error", "skipped") if k in found), "passed")
        state = {"failure": "failed", "error": "error"}.get(kind, kind)
        text = (
            (found[kind].text or "") + (found[kind].get("message") or "") if kind in found else ""
        )
        verdicts[str(case.get("name"))] = (state, sorted(set(RULE_LINE.findall(text))))
    return verdicts


def _race_or_state(state: str, rules: list[str]) -> str:
    """``race`` for a failure that names only what seed-buggy's race produces."""
    return "race" if state == "failed" and rules and set(rules) <= RACE_RULES else state


@pytest.mark.slow
@pytest.mark.docker
def test_builtin_suite_gives_the_same_verdicts_under_both_runners(
    docker_ok: None, tmp_path: Path
) -> None:
    runners = ("process", "docker")
    table: dict[str, dict[str, dict[str, tuple[str, list[str]]]]] = {}
    for target in ("seed-fixed", "seed-buggy"):
        # Both runners at once: the same machine load for both.
        with concurrent.futures.ThreadPoolExecutor(len(runners)) as pool:
            futures = {r: pool.submit(_suite_verdicts, tmp_path, target, r) for r in runners}
            table[target] = {r: future.result() for r, future in futures.items()}
    print(json.dumps(table, indent=1))
    for by_runner in table.values():
        names = set().union(*by_runner.values())
        assert all(set(v) == names for v in by_runner.values()), by_runner

    # seed-fixed has no race: one run per runner, compared as it comes.
    fixed = table["seed-fixed"]
    for name in sorted(fixed["process"]):
        states = {r: fixed[r][name][0] for r in runners}
        assert len(set(states.values())) == 1, f"seed-fixed {name}: {fixed}"
        # Skipped only where the host lacks what a scenario needs (netem), alike.
        assert states["process"] in ("passed", "skipped"), f"seed-fixed {name}: {states}"

    # seed-buggy: a failure naming only the race's rules is the race (RACE_RULES).
    buggy = table["seed-buggy"]
    for name in sorted(buggy["process"]):
        states = {r: _race_or_state(*buggy[r][name]) for r in runners}
        if name in RACE_TESTS:
            for runner in runners:
                # A pass is a run that missed the window: wait for the race by running the test
                # again while it passes; a failure is never run again.
                for _ in range(RACE_WAIT_RUNS):
                    if states[runner] != "passed":
                        break
                    state, rules = _suite_verdicts(tmp_path, "seed-buggy", runner, select=name).get(
                        name, ("missing", [])
                    )
                    states[runner] = _race_or_state(state, rules)
            assert set(states.values()) == {"race"}, f"seed-buggy {name}: {states} {buggy}"
        elif states["process"] != states["docker"]:
            # Apart only if one side landed in the race window by chance.
            assert set(states.values()) == {"passed", "race"}, f"seed-buggy {name}: {buggy}"
