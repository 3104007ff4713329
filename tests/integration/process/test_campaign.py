"""Campaigns: soak rounds, resuming a campaign folder, exploration shared through Redis.

Every worker is a separate process (``afterclose soak``) and the
shared store is a private ``redis-server`` on a leased loopback port, stopped by its PID.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import capabilities
import pytest
from soak_workers import SOAK, finished_rounds, interruptible

from afterclose.harness.campaign import soak
from afterclose.harness.campaign.duration import format_duration, parse_duration
from afterclose.harness.campaign.shared_db import SharedExamples, parse_db_url
from afterclose.harness.errors import CampaignError
from afterclose.harness.interrupts import Interrupts
from afterclose.harness.ports import lease_port

pytestmark = capabilities.requires("redis-server")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    from afterclose.harness.campaign.local_store import local_redis

    with local_redis() as url:
        yield url


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("10m", 600), ("8h", 28800), ("1h30m", 5400), ("2d", 172800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "8", "h", "8hours", "-1m", "0s", "1m 30s", "ten"])
def test_bad_durations_name_the_option_and_an_example(text: str) -> None:
    with pytest.raises(CampaignError) as info:
        parse_duration(text)
    message = info.value.render()
    assert f"--duration={text!r}" in message and "e.g. --duration=" in message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:6379/0", "scheme is http"),
        ("127.0.0.1:6379", "not redis://"),
        ("redis://127.0.0.1/0", "names no port"),
        ("redis://127.0.0.1:6379", "database number"),
        ("redis://127.0.0.1:6379/zero", "database number"),
        ("redis://127.0.0.1:99999/0", "not a Redis address"),
        ("redis://:6379/0", "names no host"),
    ],
)
def test_bad_db_addresses_are_clear_errors(url: str, why: str) -> None:
    with pytest.raises(CampaignError, match=re.escape(why)) as info:
        parse_db_url(url)
    assert "e.g. --db=redis://" in info.value.render()


def test_good_db_address() -> None:
    assert parse_db_url("redis://10.0.0.7:6380/3") == "redis://10.0.0.7:6380/3"


def test_soak_command_line_errors(tmp_path: Path) -> None:
    """Exit status 2 and a message naming the option, before any target starts."""
    cases = [
        (["--duration=8hours"], "--duration='8hours' is not a duration"),
        (["--duration=1m", "--db=redis://localhost/0"], "names no port"),
        ([], "a new campaign needs a --duration"),
    ]
    with lease_port() as unused:  # leased and not listened on: nobody answers there
        cases.append(
            (
                ["--duration=1m", f"--db=redis://127.0.0.1:{unused.port}/0"],
                "cannot reach the shared store",
            )
        )
        for n, (extra, message) in enumerate(cases):
            folder = tmp_path / f"c{n}"
            got = subprocess.run(
                [*SOAK, "--target=seed-fixed", f"--campaign-dir={folder}", *extra],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert got.returncode == 2, got.stdout + got.stderr
            assert message in got.stderr, got.stderr
            assert "rounds.jsonl" not in {p.name for p in folder.glob("*")}


def test_write_once_claims(redis_url: str) -> None:
    """Two workers (two connections) claim one scenario: the first writes, the second is told
    who did; another scenario is another claim."""
    a, b = SharedExamples(redis_url, "claims"), SharedExamples(redis_url, "claims")
    try:
        assert a.claim("seed 1: half_close(connections=3)", "/a/found.toml") is None
        owner = b.claim("seed 1: half_close(connections=3)", "/b/found.toml")
        assert owner is not None and owner.endswith(" /a/found.toml")
        assert b.claim("seed 2: half_close(connections=3)", "/b/other.toml") is None
        assert a.round_trips > 0
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- campaigns


@pytest.mark.slow
def test_two_workers_share_a_failure_through_redis(tmp_path: Path, redis_url: str) -> None:
    """Worker A searches seed-buggy until a violation (saved to the shared store and written
    out); worker B, another process started after it, replays A's failing example before
    anything else, and writes it out only if A has not."""
    common = ["--target=seed-buggy", "--mix=generated", f"--db={redis_url}", "--duration=90s"]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = subprocess.run(
        [*SOAK, *common, "--seed=1", f"--campaign-dir={a_dir}"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert a.returncode == 1, a.stdout + a.stderr
    (found,) = [r for r in finished_rounds(a_dir) if r["rules"]]
    (written,) = (a_dir / "findings").glob("*.toml")
    b = subprocess.run(
        [*SOAK, *common, "--seed=2", f"--campaign-dir={b_dir}", "--max-rounds=1"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert b.returncode in (0, 1), b.stdout + b.stderr
    assert re.search(r"replaying \d+ shared example\(s\)", b.stderr), b.stderr
    (first,) = finished_rounds(b_dir)
    assert first["kind"] == "shared"
    assert first["scenario"] == found["scenario"]
    assert f"round 1: replaying a shared example - {found['scenario']}" in b.stderr
    if first["rules"]:  # the race showed again: A wrote it, B says so and does not
        assert b.returncode == 1
        assert "another worker wrote it (" in b.stderr and str(written) in b.stderr
        assert not (b_dir / "findings").exists()
    else:
        assert b.returncode == 0


@pytest.mark.slow
def test_soak_interrupted_resumes_from_its_folder(tmp_path: Path) -> None:
    folder, report = tmp_path / "campaign", tmp_path / "soak.xml"
    argv = [
        *SOAK,
        "--target=seed-fixed",
        "--duration=10m",
        "--seed=5",
        f"--campaign-dir={folder}",
        f"--junitxml={report}",
    ]
    first = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + 90
        while not (folder / "rounds.jsonl").exists() or len(finished_rounds(folder)) < 2:
            assert first.poll() is None and time.monotonic() < deadline, "no 2 rounds"
            time.sleep(0.2)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, out + err
    done = len(finished_rounds(folder))
    assert f"interrupted after round {done}:" in out
    state = json.loads((folder / "state.json").read_text())
    assert state["seed"] == 5 and state["spent_s"] > 0 and state["invocations"] == 1

    second = subprocess.run(
        [*argv[:-3], "--seed=77", *argv[-2:], f"--max-rounds={done + 2}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming the campaign in {folder} at round {done + 1} (seed 5," in second.stdout
    assert "--seed=77 ignored: the campaign's seed is 5" in second.stderr
    assert "--max-rounds reached" in second.stdout
    rounds = finished_rounds(folder)
    assert [r["number"] for r in rounds] == list(range(1, done + 3))
    kinds = [r["kind"] for r in rounds]
    # Generated and suite rounds alternate, across the interruption too.
    assert kinds[0] == "generated" and all(x != y for x, y in itertools.pairwise(kinds)), kinds
    assert json.loads((folder / "state.json").read_text())["invocations"] == 2
    # The seed sequence goes on: the resumed campaign generates scenarios it had not run.
    before = {r["scenario"] for r in rounds[:done] if r["kind"] == "generated"}
    after = {r["scenario"] for r in rounds[done:] if r["kind"] == "generated"}
    assert after and not before & after, (before, after)

    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert suite.get("tests") == str(done + 2) and suite.get("failures") == "0"
    assert [c.get("name", "").split()[0] for c in cases] == [
        f"round-{n:05d}" for n in range(1, done + 3)
    ]
    assert all(c.find("failure") is None and c.find("error") is None for c in cases)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_explore_interrupted_exits_130_without_a_traceback(tmp_path: Path) -> None:
    log = tmp_path / "explore.log"
    argv = [
        sys.executable,
        "-m",
        "afterclose.harness.cli",
        "explore",
        "--target=seed-fixed",
        "--budget-s=300",
        f"--out={tmp_path / 'found.toml'}",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, preexec_fn=interruptible
        )
    try:
        deadline = time.monotonic() + 60
        while "exploring 'seed-fixed'" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "explore did not start in 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "afterclose: interrupted" in text and "Traceback" not in text, text


def test_an_interrupt_lost_in_a_gc_callback_still_stops_the_campaign() -> None:
    # Python prints and drops an exception raised in a gc callback; a SIGINT whose handler
    # runs there (Hypothesis keeps one installed) raises KeyboardInterrupt into the void.
    interrupts, before = Interrupts(), signal.getsignal(signal.SIGINT)

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # bytecodes: Python runs the handler here, in the callback

    with interrupts.installed():
        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        assert interrupts.noted
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupt_in_hypothesis_own_set_up_stops_the_campaign_cleanly() -> None:
    # A SIGINT raised while Hypothesis digests the test's source, before its runner exists,
    # surfaced as Hypothesis' `assert state._runner is not None` and exit status 1 (a CI run
    # of test_namespace_workers).  Held there, it lands in the round's body instead.
    from hypothesis import given, settings
    from hypothesis import strategies as st

    interrupts, sent, bodies = Interrupts(), list[str](), list[int]()

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name == "function_digest" and not sent:
            sent.append(event)
            os.kill(os.getpid(), signal.SIGINT)

    @settings(database=None, max_examples=5)
    @given(st.integers())
    def one_round(n: int) -> None:
        with interrupts.open():
            bodies.append(n)

    with interrupts.installed():
        sys.setprofile(profile)
        try:
            with pytest.raises(KeyboardInterrupt), interrupts.held():
                one_round()
        finally:
            sys.setprofile(None)
    assert sent, "Hypothesis no longer calls function_digest in its set-up: move the SIGINT"
    assert bodies == []


def test_junit_failure_type_is_the_rule(tmp_path: Path) -> None:
    from afterclose.harness.campaign.junit import write_junit
    from afterclose.harness.campaign.state import RoundRecord

    rounds = [
        RoundRecord(1, "test_half_close", "suite", 7, 1.5, connections=60),
        RoundRecord(2, "generated-00002", "generated", 9, 2.0, rules=["use-after-close", "crash"]),
    ]
    rounds[1].message = "afterclose: 2 rule(s) violated"
    write_junit(tmp_path / "r.xml", "afterclose.soak.x", rounds)
    root = ET.parse(tmp_path / "r.xml").getroot()
    ok, bad = root.iter("testcase")
    assert ok.find("failure") is None
    failure = bad.find("failure")
    assert failure is not None and failure.get("type") == "use-after-close"
    assert failure.text == "afterclose: 2 rule(s) violated"
    assert root.get("failures") == "1" and root.get("tests") == "2"


def test_campaign_folder_of_another_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"target": "seed-buggy", "seed": 1}))
    got = subprocess.run(
        [*SOAK, "--target=seed-fixed", "--duration=1m", f"--campaign-dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 2
    assert "holds a campaign against 'seed-buggy', not 'seed-fixed'" in got.stderr
    assert soak.default_folder("seed-fixed").name == "afterclose-campaign-seed-fixed"


@pytest.mark.slow
def test_xdist_gateways_each_write_their_artifacts(tmp_path: Path) -> None:
    """Two explicit xdist gateways in folders of their own, as two hosts would be (popen here;
    ssh gateways to hosts in namespaces: tests/integration/hosts/test_ssh_gateways.py): both
    run the suite's test against their own started target on ports they leased, each writes
    its artifacts under its own folder, and the controller's JUnit XML has both results."""
    specs = []
    for name in ("hostA", "hostB"):
        (tmp_path / name).mkdir()
        specs += ["--tx", f"popen//chdir={tmp_path / name}//python={sys.executable}"]
    base, report = tmp_path / "base", tmp_path / "suite.xml"
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--target=seed-fixed",
            *specs,
            "--dist=each",
            "-k",
            "test_keepalive_requests",
            f"--basetemp={base}",
            f"--junitxml={report}",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=tmp_path,
    )
    assert got.returncode == 0, got.stdout + got.stderr
    cases = ET.parse(report).getroot().findall(".//testcase")
    assert len(cases) == 2 and all(c.find("failure") is None for c in cases)
    traces = []
    for worker in ("popen-gw0", "popen-gw1"):
        traces += list((base / worker / "test_keepalive_requests0" / "trace").glob("trace.*.bin"))
    assert len({t.name for t in traces}) == 2, traces  # one target each, one trace each


@pytest.mark.slow
def test_explore_replays_what_another_explorer_saved(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``explore`` with a shared store (``ExploreOptions.shared``, what ``--db`` sets): the
    second explorer's first example is one the first explorer saw fail."""
    import tempfile
    import uuid

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the explorers' artifacts

    from afterclose.harness import explore
    from afterclose.harness.session import Harness, Settings

    def explorer(seed: int, log: list[str], budget_s: float) -> explore.ExploreResult:
        settings = Settings(
            target="seed-buggy", rootdir=tmp_path, run_id=uuid.uuid4().hex, fault_seed=seed
        )
        shared = SharedExamples(redis_url, "explore-test", log=log.append)
        options = explore.ExploreOptions(
            out=str(tmp_path / "found-{rule}.toml"),
            max_examples=12,
            budget_s=budget_s,
            verify_runs=1,
            faults=("shutdown_race",),
            shared=shared,
        )
        try:
            return explore.explore(Harness(settings), options, log.append)
        finally:
            shared.close()

    first: list[str] = []
    a = explorer(3, first, 40)
    assert a.found is not None, "\n".join(first)
    failed = {line.split(" - ", 1)[1] for line in first if ": VIOLATION " in line}
    second: list[str] = []
    explorer(4, second, 8)
    replaying = next(i for i, line in enumerate(second) if "shared example(s)" in line)
    (example1,) = [line for line in second if "] example 1: " in line]
    assert second.index(example1) > replaying
    assert example1.split(" - ", 1)[1] in failed, (example1, failed)


def test_status_line_in_place_on_a_terminal_and_by_line_in_a_log() -> None:
    import io

    from afterclose.harness.campaign.status import StatusLine

    texts = iter(["round 1, 10 connections", "round 2", "round 2"])
    tty = io.StringIO()
    line = StatusLine(tty, lambda: next(texts), tty=True)
    line.update()
    line.update()  # shorter: padded over the longer one, on the same line
    line.message("a finding")  # above it; the status line is drawn again under it
    line.stop()
    assert tty.getvalue() == (
        "\rround 1, 10 connections"
        "\rround 2" + " " * 16 + "\r" + " " * 7 + "\ra finding\n\rround 2\n"
    )
    log = io.StringIO()
    line = StatusLine(log, lambda: "round 3", tty=False)
    line.update()
    line.message("done")
    line.stop()
    assert log.getvalue() == "round 3\ndone\n"
