"""Verdicts on servers afterclose was not built around: a correct one never fails, a timer bug
is reached, and the harness's own trouble is an ERROR, not a verdict.

The servers are tests/servers/picky.c; the suite and the user tests run in a pytest
subprocess (pytester), as a user runs them."""

from __future__ import annotations

import random
import socket
import time
import uuid
from pathlib import Path

import pytest
from picky import picky_manifest

from afterclose.faults.base import Endpoint
from afterclose.faults.connection_storm import ConnectionStorm
from afterclose.harness.oracle.evidence import UNDER_DELIVERED
from afterclose.harness.session import Harness, Settings

QUIET = ("-p", "no:cacheprovider", "-p", "no:xdist", "-rs")
# The built-in tests a correct server must never fail, packets and netem aside (their own
# folder has the packet faults).
BLACK_BOX = "keepalive_requests or reset_peer or half_close or shutdown_race or connection_storm"


@pytest.mark.parametrize("mode", ["explicit-keepalive", "small"])
def test_the_suite_on_a_correct_server_that_does_not_fit_the_defaults_never_fails(
    pytester: pytest.Pytester, mode: str
) -> None:
    manifest = picky_manifest(pytester.path, mode)
    result = pytester.runpytest_subprocess(f"--target={manifest}", "-k", BLACK_BOX, *QUIET)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes.get("passed", 0) >= 8


# --------------------------------------------------------------------------- idle timers

TIMEOUT_S = 3.0
DECLARED = f"idle_timeout_s = {TIMEOUT_S:g}"


def test_an_idle_timer_that_closes_a_reused_fd_number_is_found_by_the_idle_scenario(
    pytester: pytest.Pytester,
) -> None:
    manifest = picky_manifest(pytester.path, "idle-buggy", DECLARED, idle_timeout_s=TIMEOUT_S)
    result = pytester.runpytest_subprocess(f"--target={manifest}", "-k", "idle_timeout", *QUIET)
    result.assert_outcomes(failed=1)
    # The stale timer closes numbers nobody holds (EBADF) and numbers a newer connection holds.
    result.stdout.re_match_lines([r"\[(use-after-close|wrong-incarnation)\] .*"])


def test_the_idle_scenario_passes_a_correct_idle_timer(pytester: pytest.Pytester) -> None:
    manifest = picky_manifest(pytester.path, "idle-ok", DECLARED, idle_timeout_s=TIMEOUT_S)
    result = pytester.runpytest_subprocess(f"--target={manifest}", "-k", "idle_timeout", *QUIET)
    result.assert_outcomes(passed=1)


def test_without_idle_timeout_s_the_idle_scenario_skips_and_says_which_key(
    pytester: pytest.Pytester,
) -> None:
    manifest = picky_manifest(pytester.path, "idle-buggy", idle_timeout_s=TIMEOUT_S)
    result = pytester.runpytest_subprocess(f"--target={manifest}", "-k", "idle_timeout", *QUIET)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no idle_timeout_s*set idle_timeout_s = <seconds>*"])


def test_storm_duration_stretches_a_short_storm_past_the_idle_timer(
    pytester: pytest.Pytester,
) -> None:
    # test_keepalive_requests storms for 1 s: too short for a 3 s timer.  Stretched to 6 s,
    # its own connections' stale timers fire while the storm still runs.
    manifest = picky_manifest(pytester.path, "idle-buggy", idle_timeout_s=TIMEOUT_S)
    result = pytester.runpytest_subprocess(
        f"--target={manifest}", "-k", "keepalive_requests", "--storm-duration=6", *QUIET
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*replay: pytest*--storm-duration=6.0*"])


# --------------------------------------------------------------------------- harness errors


def test_the_harness_running_out_of_fds_is_an_error_with_a_hint_not_a_failure(
    pytester: pytest.Pytester,
) -> None:
    # The soft open-file limit is lowered inside the run, once the target is up, just above
    # what the process holds: the client's own sockets hit EMFILE (a real one), the target's
    # do not (it is another process, started with the old limit).
    pytester.makepyfile(
        test_low_nofile="""
        import os, resource

        def test_many_connections(target):
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            held = len(os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (held + 8, hard))
            try:
                target.run_fault("reset_peer", phase="after-request", connections=200,
                                 concurrency=64)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        """
    )
    manifest = picky_manifest(pytester.path, "small")
    result = pytester.runpytest_subprocess(
        f"--target={manifest}", "--no-builtin-suite", "--tracer=off", *QUIET
    )
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*ERROR*test_many_connections*",
            "*harness error, not a verdict on the target*",
            "*the harness ran out of file descriptors while opening a client socket*",
            "*Hint: raise the open-file limit*",
        ]
    )
    assert "Traceback" not in out and "FAILED" not in out


# --------------------------------------------------------------------------- under-delivered


def _storm(**params: object) -> ConnectionStorm:
    return ConnectionStorm.from_params(params, "test")


def test_a_storm_the_harness_cannot_deliver_is_incomplete_evidence(tmp_path: Path) -> None:
    # 20,000 connections/s from one asyncio client process: it cannot start them as fast as
    # planned, while slots stay free (the target answers at once).  The compiled engine can
    # start more than half of them on a quiet machine, so this storm is asyncio's.
    manifest = picky_manifest(tmp_path, "small")
    settings = Settings(target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex)
    with Harness(settings).start(tmp_path, "under_delivered") as run:
        report = run.run_fault(
            "connection_storm",
            rate_per_s=20_000,
            concurrency=500,
            processes=1,
            duration_s=0.5,
            max_connections=10_000,
            mix={"keepalive": 1},
            engine="asyncio",
        )
        outcome = run.finish()
    assert report.counts["not_started"] > 1000, report.summary()
    found = [v for v in outcome.violations if v.rule == "incomplete-evidence"]
    assert len(found) == 1, report.summary()
    (v,) = found
    assert "planned connections" in v.summary and "lower rate" in v.summary
    assert [v.rule for v in outcome.violations] == ["incomplete-evidence"]


def test_a_target_that_refuses_is_not_excused_as_incomplete_evidence() -> None:
    # Nothing listens on the port: every connect is refused, which is the target's doing.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The most the storm may plan: even the compiled engine, which meets a refused connect
    # in microseconds, cannot start 100,000 of them in a second from one process.
    storm = _storm(
        rate_per_s=100_000, concurrency=1, processes=1, duration_s=1.0, max_connections=100_000
    )
    report = storm.run(Endpoint("127.0.0.1", port), random.Random(1), time.monotonic() + 30)
    # As short of its plan as the harness-side case above, but for the target's reasons.
    assert report.counts["not_started"] > 10_000, report.summary()
    assert report.counts["errors:connect_econnrefused"] > 0, report.summary()
    assert not [o for o in report.observations if o.kind == UNDER_DELIVERED]
