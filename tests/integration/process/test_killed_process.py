"""A process the harness killed has not leaked the fds it held (``fd-leak``, both tracers,
both runners).

``tests/servers/misbehave.c`` in mode ``leak`` never closes a connection whose client left: a
real leak, deterministic.  The ``kill`` fault SIGKILLs it and starts it again; a SIGKILLed
process writes no exit into its trace, so only the harness, which ended it on purpose and saw
it gone at the cut-off, can tell that the kernel released what it held.  The restarted server
is still judged: the connections it leaks itself are reported, and only those.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import capabilities
import pytest
from misbehave import misbehave_manifest

from afterclose.harness import procfs
from afterclose.harness.control import wait_for
from afterclose.harness.session import Harness, Outcome, Settings, TargetRun
from afterclose.harness.trace.format import HeaderFlag, Op
from afterclose.harness.trace.reader import read_trace_dir

TRACERS = [
    "preload",
    pytest.param("ebpf", marks=[capabilities.requires("ebpf"), pytest.mark.root]),
]
RUNNERS = [
    "process",
    pytest.param("docker", marks=[pytest.mark.docker, capabilities.requires("docker")]),
]
KILLED = "the harness ended it (fault 'kill' sent SIGKILL)"


def misbehave(tmp_path: Path, tracer: str, runner: str = "process", mode: str = "leak") -> Harness:
    # Not in tmp_path itself: a container sees the manifest's folder (as root made it, 0700
    # for pytest's) and the workdir below it, which its non-root user could then not reach.
    folder = tmp_path / "target"
    folder.mkdir(mode=0o755)
    manifest = misbehave_manifest(folder, mode)
    settings = Settings(
        target=str(manifest),
        rootdir=tmp_path,
        run_id=uuid.uuid4().hex,
        tracer=tracer,
        runner=runner,
    )
    return Harness(settings)


def leak(run: TargetRun, connections: int) -> int:
    """``connections`` keep-alive clients that leave after their requests; returns how many
    of the server's sockets then wait in CLOSE_WAIT for a close that never comes."""
    run.run_fault(
        "connection_storm",
        rate_per_s=100,
        concurrency=connections,
        duration_s=5,
        max_connections=connections,
        mix={"keepalive": 1},
    )
    assert wait_for(
        lambda: procfs.census(run.server.host_pids(), run.port).close_wait >= connections,
        timeout_s=5.0,
    ), procfs.census(run.server.host_pids(), run.port).describe()
    return procfs.census(run.server.host_pids(), run.port).close_wait


def rendered(outcome: Outcome) -> str:
    return "\n".join([*(v.render() for v in outcome.violations), *outcome.warnings])


def traced_as(run: TargetRun, tracer: str) -> int:
    """The PID by which the trace names the server's main process: the shim sees the one of
    its own PID namespace (a container's), bpftrace the host's."""
    pid = run.server.host_pids()[0]
    if tracer == "preload":
        inner = {host: inner for inner, host in procfs.namespace_pids([pid]).items()}
        return inner.get(pid, pid)
    return pid


def held_at_death(trace_dir: Path, pid: int) -> int:
    """Connections the trace of ``pid`` shows read to EOF and never closed."""
    (proc,) = [p for p in read_trace_dir(trace_dir).processes if p.pid == pid]
    ended = {r.fd for r in proc.records if r.op == Op.READ and r.ret == 0}
    closed = {r.fd for r in proc.records if r.op == Op.CLOSE}
    return len(ended - closed)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("tracer", TRACERS)
def test_a_killed_process_leaked_nothing(tracer: str, runner: str, tmp_path: Path) -> None:
    with misbehave(tmp_path, tracer, runner).start(tmp_path / "run", f"killed-{tracer}") as run:
        killed = run.server.host_pids()[0]
        assert leak(run, 6) == 6
        run.run_fault("kill", storm_s=0)
        assert killed not in run.server.host_pids()
        outcome = run.finish()
    assert outcome.trace_dir is not None
    # The case under test: the killed server's trace shows the connections it still held.
    assert held_at_death(outcome.trace_dir, killed) == 6
    assert outcome.ok, rendered(outcome)
    said = [w for w in outcome.warnings if "the kernel released" in w]
    if tracer == "preload":  # the shim cannot mark a SIGKILL: the harness's word stands
        assert said == [
            f"pid {killed}: {KILLED}; the kernel released the 6 connection(s) it still held, "
            "so fd-leak is not checked for it"
        ], outcome.warnings
    else:  # the kernel's exit tracepoint sees every death: the trace says it itself
        (proc,) = [p for p in read_trace_dir(outcome.trace_dir).processes if p.pid == killed]
        assert proc.header.flags & HeaderFlag.EXITED
        assert said == [], outcome.warnings


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("tracer", TRACERS)
def test_the_restarted_process_is_judged_for_its_own_leaks(
    tracer: str, runner: str, tmp_path: Path
) -> None:
    with misbehave(tmp_path, tracer, runner).start(tmp_path / "run", f"survivor-{tracer}") as run:
        killed = run.server.host_pids()[0]
        assert leak(run, 6) == 6
        run.run_fault("kill", storm_s=0)
        survivor = traced_as(run, tracer)
        assert leak(run, 4) == 4
        outcome = run.finish()
    assert outcome.trace_dir is not None
    assert held_at_death(outcome.trace_dir, killed) == 6
    (violation,) = outcome.violations
    assert violation.rule == "fd-leak", rendered(outcome)
    # Four, the survivor's: not ten, with the six the killed process held.
    assert violation.count == 4, rendered(outcome)
    assert "4 socket(s) still open" in violation.summary
    assert "the trace shows 4 connections whose peer was gone" in violation.details
    assert f"pid {survivor}" in violation.details and f"pid {killed}" not in violation.details


@pytest.mark.parametrize(("mode", "found"), [("leak", {"fd-leak"}), ("none", set())])
def test_the_census_after_a_restart_mid_storm_still_counts_leaks(
    mode: str, found: set[str], tmp_path: Path
) -> None:
    """The kill fault's storm goes on through the restart, so the restarted server settles
    with clients connected; its baseline is its own sockets, not theirs.  Untraced: the
    census from outside is all that judges."""
    with misbehave(tmp_path, "off", mode=mode).start(tmp_path / "run", f"storm-{mode}") as run:
        run.run_fault("kill", storm_s=1.0)
        assert run.baseline.states == {}
        leaked = procfs.census(run.server.host_pids(), run.port).close_wait
        outcome = run.finish()
    assert {v.rule for v in outcome.violations} == found, rendered(outcome)
    if found:
        (violation,) = outcome.violations
        assert violation.count >= leaked > 0, rendered(outcome)
        assert "in CLOSE_WAIT" in violation.summary
