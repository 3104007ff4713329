"""Each traced fd-lifecycle rule on a real small server that commits it, under the real
LD_PRELOAD tracer; and the same servers in their correct mode under every fault: nothing
reported at all.

The servers are ``tests/lifecycle/loop.c`` (one event thread and an access-logger thread that
holds a dup of every connection) and ``tests/lifecycle/pool.c`` (an acceptor thread and an
event thread, EPOLLONESHOT, re-arms applied in batches); the comment at the top of each
describes every mode's bug.  Each test starts one through ``Harness``/``TargetRun`` exactly as
the plugin does (``[compile]`` manifest, default tracer), runs a fault, and judges the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from paths import TESTS_DIR

from afterclose.harness.oracle.evidence import DROPPED_REQUEST
from afterclose.harness.oracle.judge import judge_trace
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.session import Harness, Outcome, Settings
from afterclose.harness.trace import reader
from afterclose.harness.trace.findings import TraceVerdict

LIFECYCLE = TESTS_DIR / "lifecycle"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-pthread")
# The servers' logger closes its dups in batches, and on a loaded machine one census of the
# target's sockets can take a second: the fd-leak oracle must be able to look twice.  (Only a
# target that does leak waits this long.)
FD_GRACE_S = 3.0

Faults = Sequence[tuple[str, Mapping[str, object]]]


def harness_for(
    tmp_path: Path,
    server: str,
    mode: str,
    *,
    env: Mapping[str, str] | None = None,
    fd_grace_s: float = FD_GRACE_S,
) -> Harness:
    manifest = tmp_path / f"{server}-{mode}.toml"
    env_lines = "".join(f'{key} = "{value}"\n' for key, value in (env or {}).items())
    cflags = ", ".join(f'"{flag}"' for flag in CFLAGS)
    manifest.write_text(
        f"""
name = "lifecycle-{server}-{mode}"
command = ["{{build}}", "{{host}}", "{{port}}", "{mode}"]
echo_path = true
fd_grace_s = {fd_grace_s}
[compile]
sources = ["{LIFECYCLE / f"{server}.c"}"]
cflags = [{cflags}]
ldflags = ["-pthread"]
[ready]
log = "READY"
[env]
{env_lines}"""
    )
    # The default tracer ("auto"): the LD_PRELOAD shim.
    return Harness(Settings(target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex))


def judge(
    tmp_path: Path,
    server: str,
    mode: str,
    faults: Faults,
    *,
    env: Mapping[str, str] | None = None,
    fd_grace_s: float = FD_GRACE_S,
) -> Outcome:
    harness = harness_for(tmp_path, server, mode, env=env, fd_grace_s=fd_grace_s)
    assert harness.tracer_mode == "preload"
    with harness.start(tmp_path / "run", f"{server}-{mode}") as run:
        for name, params in faults:
            run.run_fault(name, **params)
        return run.finish()


def rules_of(outcome: Outcome) -> set[str]:
    return {v.rule for v in outcome.violations}


def explain(outcome: Outcome) -> str:
    lines = [v.render() for v in outcome.violations]
    lines += [f"fault {r.summary()}" for r in outcome.reports]
    lines += [f"WARNING: {w}" for w in outcome.warnings]
    lines.append(f"trace: {outcome.trace_dir}")
    return "\n".join(lines)


def violation(outcome: Outcome, rule: str) -> Violation:
    found = [v for v in outcome.violations if v.rule == rule]
    assert found, explain(outcome)
    return found[0]


def retrace(outcome: Outcome) -> TraceVerdict:
    """The trace judged again on its own (``finish()`` keeps only one violation per rule, and
    drops a traced rule the black-box oracle already reported)."""
    assert outcome.trace_dir is not None
    return judge_trace(reader.read_trace_dir(outcome.trace_dir))


def storm(mix: Mapping[str, float], **params: object) -> dict[str, object]:
    return {"rate_per_s": 200, "concurrency": 2, "duration_s": 0.1, "mix": dict(mix), **params}


# -- each rule on the server that commits it ---------------------------------------------------


@pytest.mark.slow
def test_event_after_close_dup_keeps_the_registration(tmp_path: Path) -> None:
    """loop event-after-close: close() without EPOLL_CTL_DEL while the logger's dup holds the
    file.  The clients half-close, so the fd stays readable after the server's close and the
    surviving registration keeps firing for the closed incarnation."""
    outcome = judge(tmp_path, "loop", "event-after-close", [("half_close", {"connections": 5})])
    assert rules_of(outcome) == {"event-after-close"}, explain(outcome)
    v = violation(outcome, "event-after-close")
    assert "still refers to the same open file" in v.summary
    assert "dup(" in v.details, v.details  # the timeline shows the logger's dup
    assert not outcome.warnings, explain(outcome)


@pytest.mark.slow
def test_use_after_close_double_close_on_the_error_path(tmp_path: Path) -> None:
    """loop use-after-close: a RST makes the read or the write fail; the error helper closes
    the fd and its caller closes it again.  Nothing else creates fds meanwhile: EBADF."""
    outcome = judge(
        tmp_path,
        "loop",
        "use-after-close",
        [("reset_peer", {"phase": "after-request", "connections": 10, "concurrency": 2})],
    )
    assert rules_of(outcome) == {"use-after-close"}, explain(outcome)
    v = violation(outcome, "use-after-close")
    assert v.summary.startswith("double close: ")
    assert "the same thread closed it twice" in v.summary
    assert v.count >= 5, explain(outcome)


@pytest.mark.slow
def test_fd_leak_eof_never_closed(tmp_path: Path) -> None:
    """loop fd-leak: read() returns 0, the fd is removed from epoll and never closed.  The
    black-box oracle sees CLOSE_WAIT; the trace alone proves it too (read 0, still open)."""
    outcome = judge(
        tmp_path,
        "loop",
        "fd-leak",
        [("connection_storm", storm({"keepalive": 1}))],
        fd_grace_s=0.3,
    )
    assert rules_of(outcome) == {"fd-leak"}, explain(outcome)
    assert "CLOSE_WAIT" in violation(outcome, "fd-leak").details
    traced = retrace(outcome)
    assert set(traced.occurrences) == {"fd-leak"}, traced.render()
    leaks = traced.occurrences["fd-leak"]
    connections = outcome.reports[0].counts["connections"]
    assert len(leaks) >= connections, traced.render()
    assert all("its peer closed at seq" in f.summary for f in leaks), traced.render()


@pytest.mark.slow
def test_event_for_freed_data_close_deferred(tmp_path: Path) -> None:
    """loop event-for-freed-data: on EOF the client is freed at once and the fd closed later
    by the logger, still registered; the EOF keeps it readable, so epoll hands back the freed
    pointer.  The free of a registered pointer is its cause: freed-while-registered too.
    Until the logger closes it, the loop also spins on that event: a logger that a loaded
    machine keeps waiting long enough for 1,000 such waits makes it a busy-loop as well."""
    outcome = judge(tmp_path, "loop", "event-for-freed-data", [("half_close", {"connections": 5})])
    cause = {"event-for-freed-data", "freed-while-registered"}
    assert cause <= rules_of(outcome) <= cause | {"busy-loop"}, explain(outcome)
    v = violation(outcome, "event-for-freed-data")
    assert "a pointer freed at seq" in v.summary
    assert "not registered again since" in v.summary


@pytest.mark.slow
def test_freed_while_registered_by_another_thread(tmp_path: Path) -> None:
    """loop freed-while-registered: the logger's lingering close (after "Connection: close")
    frees the client before it closes the fd; the event thread sits in epoll_wait on the
    still armed registration.  No event comes in that window -- only the rule can tell."""
    outcome = judge(
        tmp_path,
        "loop",
        "freed-while-registered",
        [("connection_storm", storm({"close": 1}))],
    )
    assert rules_of(outcome) == {"freed-while-registered"}, explain(outcome)
    v = violation(outcome, "freed-while-registered")
    # Freed by the logger (T2) while the event thread (T1) waits.
    assert " in T2 at seq " in v.summary and "epoll_wait in T1 " in v.summary, v.summary
    assert "could return the freed pointer" in v.summary


@pytest.mark.slow
def test_stale_rearm_batched_rearm_after_the_accept_batch(tmp_path: Path) -> None:
    """pool stale-rearm: answering "Connection: close" queues the connection's re-arm, then
    closes it; the queue is applied right after the next accept batch, which was handed the same
    (lowest free) fd number: the MOD succeeds on the stranger's connection with the closed
    client's pointer.

    One connection at a time, so each new connection reuses the number of the last one.  When
    the event thread serves the new connection before the acceptor's notification arrives, the
    pass finds the number closed again and its MOD fails with EBADF: use-after-close, the same
    bug's other face, may be reported too."""
    outcome = judge(
        tmp_path,
        "pool",
        "stale-rearm",
        [("connection_storm", storm({"close": 1}, concurrency=1, duration_s=0.06))],
    )
    assert "stale-rearm" in rules_of(outcome), explain(outcome)
    assert rules_of(outcome) <= {"stale-rearm", "use-after-close"}, explain(outcome)
    v = violation(outcome, "stale-rearm")
    assert "MOD" in v.summary and "a different connection (accepted by T2" in v.summary
    # Nobody outside can tell: every client got its answer.
    report = outcome.reports[0]
    assert report.counts["responses"] == report.counts["requests"], explain(outcome)
    assert not outcome.warnings, explain(outcome)


@pytest.mark.slow
def test_wrong_incarnation_double_close_silently_drops_a_stranger(tmp_path: Path) -> None:
    """pool wrong-incarnation: after a read/write error (the RST clients) the event thread
    closes the fd, reports the error (slowly), and closes the number again -- by then often a
    new connection the acceptor thread registered.  That client's complete request is never
    answered, and that is all anyone outside sees: no crash, no garbled reply, no leak, the
    server stays live.  Only the tracer names the bug.  (When the number was not reused the
    second close fails with EBADF: use-after-close, reported too.)"""
    mix = {"reset_peer:after-request": 1, "keepalive": 1}
    outcome = judge(
        tmp_path,
        "pool",
        "wrong-incarnation",
        [("connection_storm", storm(mix, rate_per_s=500, concurrency=8, duration_s=0.5))],
    )
    report = outcome.reports[0]
    assert report.counts["closed_without_answer"] > 0, explain(outcome)
    assert {o.kind for o in report.observations} <= {DROPPED_REQUEST}, explain(outcome)
    assert "wrong-incarnation" in rules_of(outcome), explain(outcome)
    allowed = {"wrong-incarnation", "use-after-close", "dropped-request"}
    assert rules_of(outcome) <= allowed, explain(outcome)
    v = violation(outcome, "wrong-incarnation")
    assert "closed fd" in v.summary and "twice" in v.summary, v.summary
    assert "a double close that EBADF never revealed" in v.summary
    assert "accepted by T2" in v.summary, v.summary


# -- the correct servers: nothing reported under any fault --------------------------------------

RESET_PHASES: Faults = [
    ("reset_peer", {"phase": phase, "connections": 12, "concurrency": 3})
    for phase in ("before-request", "mid-request", "after-request", "mid-response")
]
TWIN_FAULTS: dict[str, Faults] = {
    "reset_peer": RESET_PHASES,
    "half_close": [("half_close", {"connections": 15, "concurrency": 3})],
    "shutdown_race": [("shutdown_race", {"connections": 20, "concurrency": 4})],
    "connection_storm": [
        ("connection_storm", {"rate_per_s": 500, "concurrency": 16, "duration_s": 0.3})
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(TWIN_FAULTS))
@pytest.mark.parametrize("server", ["loop", "pool"])
def test_correct_server_has_no_report(tmp_path: Path, server: str, fault: str) -> None:
    outcome = judge(tmp_path, server, "none", TWIN_FAULTS[fault])
    assert outcome.violations == [], explain(outcome)
    assert outcome.warnings == [], explain(outcome)
    for report in outcome.reports:
        assert report.counts["connections"] > 0, explain(outcome)
        assert not report.observations, explain(outcome)


# -- a trace that lost records says so ---------------------------------------------------------


@pytest.mark.slow
def test_lost_records_are_reported_loudly(tmp_path: Path) -> None:
    """A 1 MiB trace file in 64-record chunks holds about 16 000 records; 150 connections
    that each pipeline 100 requests make the server write far more.  The shim then counts
    what it could not write, and the outcome must say the trace is incomplete.

    The variables go in the manifest's ``env``: the tracer adds its own variables after the
    manifest's, but it sets neither of these two, so the manifest's values reach the shim."""
    env = {"AFTERCLOSE_TRACE_MB": "1", "AFTERCLOSE_TRACE_CHUNK": "64"}
    outcome = judge(
        tmp_path,
        "loop",
        "none",
        [
            (
                "half_close",
                {"connections": 150, "concurrency": 4, "requests_per_connection": 100},
            )
        ],
        env=env,
    )
    assert outcome.reports[0].counts["responses"] > 10_000, explain(outcome)
    text = "\n".join(outcome.warnings)
    assert "trace incomplete" in text and "records were lost" in text, explain(outcome)
    assert "records lost" in text, explain(outcome)  # the per-process line
    traced = retrace(outcome)
    assert not traced.complete and traced.stats.lost_records > 0
    # The header really came from those variables.
    trace = reader.read_trace_dir(outcome.trace_dir or Path())
    headers = [p.header for p in trace.processes]
    assert headers and all(h.chunk_records == 64 for h in headers), headers
    assert all(h.n_chunks * 65 * 64 + 4096 <= 1 << 20 for h in headers), headers
