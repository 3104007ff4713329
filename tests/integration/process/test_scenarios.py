"""Scenarios: the Python API, scenario files under pytest, seeds and replay, exploration."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
import typing
import uuid
from pathlib import Path

import capabilities
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from misbehave import misbehave_manifest
from paths import ROOT_DIR

from afterclose.harness.errors import ScenarioError
from afterclose.harness.explore import param_strategy, scenarios
from afterclose.harness.scenario import Scenario, scenario
from afterclose.harness.scenario_file import load_scenario, parse_scenario
from afterclose.harness.session import Harness, Settings

ROOT = ROOT_DIR
DIGEST = re.compile(r"scenario '([^']+)' seed (\d+): .*schedule (sha256:[0-9a-f]+)")
REPLAY = re.compile(r"^replay: (pytest .*)$", re.MULTILINE)
RULES = re.compile(r"^\[([a-z-]+)\] ", re.MULTILINE)

RST_STORM = (
    scenario("rst-storm", seed=7)
    .phase(
        "warm-up",
        "connection_storm",
        rate_per_s=200,
        duration_s=0.2,
        mix={"keepalive": 1, "reset_peer:after-request": 1},
    )
    .phase("chaos", "shutdown_race", connections=30, close_mode="rst", repeat=2)
    .phase(
        "together",
        parallel=[
            ("reset_peer", {"phase": "after-request", "connections": 10}),
            ("half_close", {"connections": 5}),
        ],
    )
)

OK_TOML = """\
description = "every kind of phase, gently"

[[phase]]
name = "warm-up"
fault = "connection_storm"
rate_per_s = 200
duration_s = 0.2
mix = { keepalive = 2, close = 1 }

[[phase]]
name = "resets"
fault = "reset_peer"
phase = "after-request"
connections = 10
repeat = 2

[[phase]]
name = "together"
parallel = [
    { fault = "half_close", connections = 5 },
    { fault = "reset_peer", connections = 5, phase = "mid-request" },
]
"""

CHAOS_TOML = """\
description = "malformed requests raced with the client's RST: seed-buggy's bug"

[[phase]]
name = "chaos"
fault = "shutdown_race"
connections = 200
concurrency = 10
close_mode = "rst"
"""


def digests(output: str) -> dict[str, tuple[int, str]]:
    """Scenario name -> (seed, schedule digest), from the printed scenario headlines."""
    return {m[1]: (int(m[2]), m[3]) for m in DIGEST.finditer(output)}


# --------------------------------------------------------------------------- the API


def test_phases_run_in_order_with_their_faults() -> None:
    assert [p.name for p in RST_STORM.phases] == ["warm-up", "chaos", "together"]
    assert [p.faults for p in RST_STORM.phases] == [
        ("connection_storm",),
        ("shutdown_race",),
        ("reset_peer", "half_close"),
    ]
    assert [(p.parallel, p.repeat) for p in RST_STORM.phases] == [
        (False, 1),
        (False, 2),
        (True, 1),
    ]
    schedule = RST_STORM.schedule()
    phases = [int(line.split("]")[0].removeprefix("phase[")) for line in schedule]
    assert phases == sorted(phases) and set(phases) == {0, 1, 2}
    # 200/s x 0.2 s, then 2 x 30, then 10 + 5: one line per connection.
    assert len(schedule) == 40 + 60 + 15
    assert sum("chaos rep 1 shutdown_race: conn " in line for line in schedule) == 30
    assert sum("together parallel[1] half_close: conn " in line for line in schedule) == 5


def test_scenarios_are_values() -> None:
    base = scenario("s", seed=1).phase("a", "half_close")
    longer = base.phase("b", "reset_peer")
    assert len(base.phases) == 1 and len(longer.phases) == 2
    assert base == scenario("s", seed=1).phase("a", "half_close")
    assert base.seeded(2).seed == 2 and base.seed == 1


def test_schedule_is_a_function_of_the_scenario_and_its_seed() -> None:
    assert RST_STORM.schedule() == RST_STORM.schedule(7)
    assert RST_STORM.schedule(7) != RST_STORM.schedule(8)
    # Each phase's rng comes from the seed and the phase's index alone: changing one phase
    # leaves the others' schedules as they were.
    changed = (
        scenario("rst-storm", seed=7)
        .phase("warm-up", "connection_storm", rate_per_s=100, duration_s=0.1)
        .phase("chaos", "shutdown_race", connections=30, close_mode="rst", repeat=2)
    )

    def chaos(lines: list[str]) -> list[str]:
        return [line for line in lines if line.startswith("phase[1] ")]

    assert chaos(changed.schedule()) == chaos(RST_STORM.schedule())
    with pytest.raises(ValueError, match="has no seed"):
        scenario("x").phase("a", "half_close").schedule()


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (
            lambda s: s.phase("a", "shutdown_rase"),
            [r"phase\[0\]\.fault: unknown fault 'shutdown_rase'", "did you mean 'shutdown_race'"],
        ),
        (
            lambda s: s.phase("a", "half_close").phase("b", "shutdown_race", conections=3),
            [r"scenario 'api': phase\[1\]\.conections: unknown key", "did you mean 'connections'"],
        ),
        (
            lambda s: s.phase("a", "shutdown_race", close_mode="rts"),
            [r"phase\[0\]\.close_mode: .* not one of: rst, fin, mixed", "did you mean 'rst'"],
        ),
        (lambda s: s.phase("a", "half_close", repeat=0), [r"'repeat' must be an integer \(1\.\."]),
        (lambda s: s.phase("a", "half_close").phase("a", "half_close"), ["used twice"]),
        (lambda s: s.phase("a"), ["needs 'fault'"]),
        (
            lambda s: s.phase("a", parallel=[("half_close", {"requests": 2})]),
            [r"phase\[0\]\.parallel\[0\]\.requests: unknown key 'requests'"],
        ),
    ],
)
def test_api_errors_name_the_phase_and_key(build: object, expected: list[str]) -> None:
    assert callable(build)
    with pytest.raises(ScenarioError) as info:
        build(scenario("api"))
    for pattern in expected:
        assert re.search(pattern, info.value.render()), info.value.render()


def test_toml_round_trip() -> None:
    text = RST_STORM.to_toml("a header")
    assert text.startswith("# a header\n")
    again = parse_scenario(tomllib.loads(text), "mem.toml", "x")
    assert again == RST_STORM
    assert again.schedule() == RST_STORM.schedule()


@settings(max_examples=60, deadline=None, database=None)
@given(scenarios(["half_close", "reset_peer", "shutdown_race", "connection_storm"]))
def test_explored_scenarios_round_trip_through_toml(s: Scenario) -> None:
    again = parse_scenario(tomllib.loads(s.to_toml()), "mem.toml", "x")
    assert again == s and again.schedule() == s.schedule()


@settings(max_examples=50, deadline=None, database=None)
@given(st.data())
def test_explored_parameters_stay_in_bounds(data: st.DataObject) -> None:
    from afterclose.faults.base import Spec

    # A range spanning 0 is explored around 0; others from their lower bound, within LIMITS.
    around_zero = param_strategy("seq_offset", int, Spec(lo=-(2**31), hi=2**31 - 1))
    connections = param_strategy("connections", int, Spec(lo=1, hi=100_000))
    ratio = param_strategy("valid_first_ratio", float, Spec(lo=0, hi=1))
    assert around_zero is not None and connections is not None and ratio is not None
    assert -50 <= typing.cast(int, data.draw(around_zero)) <= 50
    assert 1 <= typing.cast(int, data.draw(connections)) <= 60
    assert 0 <= typing.cast(float, data.draw(ratio)) <= 1


# --------------------------------------------------------------------------- against a target


def test_run_scenario_merges_a_report_per_phase_and_records_the_schedule(
    tmp_path: Path,
) -> None:
    def run_once(fault_seed: int, name: str) -> tuple[list[str], object]:
        settings_ = Settings(
            target="seed-fixed", rootdir=ROOT, run_id=uuid.uuid4().hex, fault_seed=fault_seed
        )
        harness = Harness(settings_)
        seedless = RST_STORM.seeded(None)
        with harness.start(tmp_path / name, "test_api") as run:
            report = run.run_scenario(seedless)
            outcome = run.finish()
        assert outcome.ok, run.failure_message(outcome)
        assert [p.name for p in report.phases] == ["warm-up", "chaos", "together"]
        assert report["chaos"].counts["rst_sent"] > 0
        assert report["together"].fault == "reset_peer+half_close"
        assert len(report.phases[2].reports) == 2 and len(run.reports) == 1 + 2 + 2
        assert report.seed == run.seed
        assert run.schedule == list(report.schedule) == seedless.schedule(run.seed)
        assert (tmp_path / name / "schedule.txt").read_text().count("\n") == 1 + 115
        return run.schedule, report.digest()

    first, digest = run_once(5, "a")
    again, digest_again = run_once(5, "b")
    other, digest_other = run_once(6, "c")
    assert first == again and digest == digest_again
    assert first != other and digest != digest_other


def write_scenarios(pytester: pytest.Pytester, **files: str) -> None:
    folder = pytester.path / "scenarios"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.toml").write_text(textwrap.dedent(text))


def test_scenario_files_pass_on_seed_fixed_and_replay_by_seed(pytester: pytest.Pytester) -> None:
    write_scenarios(pytester, gentle=OK_TOML, pinned="seed = 7\n" + OK_TOML)
    pytester.makepyfile(
        test_api="""
        from afterclose.harness.scenario import scenario

        def test_rst_storm(target):
            s = (scenario("rst-storm")
                 .phase("warm-up", "connection_storm", rate_per_s=100, duration_s=0.2)
                 .phase("chaos", "reset_peer", phase="after-request", connections=20))
            report = target.run_scenario(s)
            assert report["chaos"].counts["rst_sent"] == 20
            print(report.summary())
        """
    )
    args = ("--target=seed-fixed", "--no-builtin-suite", "-rP", "-p", "no:cacheprovider")
    collected = pytester.runpytest_subprocess(*args, "--collect-only", "-q")
    collected.stdout.fnmatch_lines(
        ["scenarios/gentle.toml::gentle", "scenarios/pinned.toml::pinned", "test_api.py::*"],
        consecutive=False,
    )
    first = pytester.runpytest_subprocess(*args, "--fault-seed=11")
    first.assert_outcomes(passed=3)
    again = pytester.runpytest_subprocess(*args, "--fault-seed=11", "scenarios")
    again.assert_outcomes(passed=2)
    other = pytester.runpytest_subprocess(*args, "--fault-seed=12", "scenarios")
    other.assert_outcomes(passed=2)
    seen = [digests(r.stdout.str()) for r in (first, again, other)]
    assert set(seen[0]) == {"gentle", "pinned", "rst-storm"}
    assert seen[0]["gentle"] == seen[1]["gentle"]  # same --fault-seed: same schedule
    assert seen[0]["gentle"][1] != seen[2]["gentle"][1]  # another seed: another schedule
    assert seen[0]["pinned"] == seen[1]["pinned"] == seen[2]["pinned"]
    assert seen[0]["pinned"][0] == 7  # the file's own seed wins over --fault-seed


@pytest.mark.slow
def test_scenario_file_fails_on_seed_buggy_with_rule_seed_and_replay(
    pytester: pytest.Pytester,
) -> None:
    write_scenarios(pytester, chaos=CHAOS_TOML)
    args = ("--target=seed-buggy", "--no-builtin-suite", "-p", "no:cacheprovider")
    for _ in range(3):  # a race: it shows on nearly every run, but allow a miss
        result = pytester.runpytest_subprocess(*args)
        if result.ret == pytest.ExitCode.TESTS_FAILED:
            break
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*afterclose: * rule(s) violated by target 'seed-buggy' (seed *, test seed *)",
            "*scenario 'chaos' seed *: 1 phase(s), 200 connection(s) planned, schedule sha256:*",
            "*replay: pytest --target=seed-buggy --fault-seed=* --no-builtin-suite "
            "scenarios/chaos.toml::chaos",
        ]
    )
    assert RULES.findall(out), out
    replay = REPLAY.search(out)
    assert replay is not None
    command = shlex.split(replay[1])
    assert command[0] == "pytest"
    schedule = digests(out)["chaos"]
    for _ in range(3):
        replayed = pytester.runpytest_subprocess(*command[1:], "-p", "no:cacheprovider")
        if replayed.ret == pytest.ExitCode.TESTS_FAILED:
            break
    replayed.assert_outcomes(failed=1)
    assert digests(replayed.stdout.str())["chaos"] == schedule  # the same client-side schedule


def test_scenario_file_errors_fail_collection(pytester: pytest.Pytester) -> None:
    write_scenarios(
        pytester,
        typo="""\
            [[phase]]
            fault = "half_close"
            [[phase]]
            fault = "reset_peer"
            [[phase]]
            name = "chaos"
            fault = "shutdown_race"
            conections = 50
            """,
        unknown="""\
            [[phase]]
            fault = "shutdown_rase"
            """,
        broken="""\
            [[phase]
            fault = "half_close"
            """,
        toplevel="""\
            phases = []
            """,
    )
    result = pytester.runpytest(
        "--target=seed-fixed", "--no-builtin-suite", "-p", "no:cacheprovider"
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting scenarios/broken.toml*",
            "scenarios/broken.toml: not valid TOML: *(at line 1, column *)",
            "*ERROR collecting scenarios/toplevel.toml*",
            "scenarios/toplevel.toml: phases: unknown key 'phases' (top-level keys: *)",
            "Hint: did you mean 'phase'?",
            "*ERROR collecting scenarios/typo.toml*",
            "scenarios/typo.toml: phase[[]2[]].conections: unknown key 'conections' "
            "for fault 'shutdown_race'",
            "Hint: did you mean 'connections'? (allowed keys with shutdown_race: *connections*)",
            "*ERROR collecting scenarios/unknown.toml*",
            "scenarios/unknown.toml: phase[[]0[]].fault: unknown fault 'shutdown_rase'",
            "Hint: did you mean 'shutdown_race'? (faults: *)",
        ],
        consecutive=False,
    )
    assert "Traceback" not in result.stdout.str()


def test_toml_files_are_not_tests_without_a_target(pytester: pytest.Pytester) -> None:
    write_scenarios(pytester, broken="[[phase]\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "scenarios")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_load_scenario_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('name = "a b"\n[[phase]]\nfault = "half_close"\n')
    with pytest.raises(ScenarioError, match=r"x\.toml: name: scenario name 'a b' is not usable"):
        load_scenario(path)
    path.write_text('[[phase]]\nfault = "half_close"\nconnections = 0\n')
    with pytest.raises(ScenarioError, match=r"phase\[0\]\.connections: .* out of range"):
        load_scenario(path)
    path.write_text('[[phase]]\nparallel = [{fault = "half_close"}]\nconnections = 3\n')
    with pytest.raises(ScenarioError, match="inside each entry of 'parallel'"):
        load_scenario(path)
    path.write_text('name = "x"\n[[phase]]\nfault = "half_close"\n')
    assert load_scenario(path).name == "x"


# --------------------------------------------------------------------------- exploration


@pytest.mark.slow
def test_explore_writes_a_shrunk_scenario_that_reproduces(pytester: pytest.Pytester) -> None:
    # misbehave's crash mode dies at its 5th answer, every time: the search, the shrinking and
    # the verification are checked on a failure that does not depend on a race (a race's
    # shrunk example may rightly fail again in none of 3 runs, and the file then says so).
    manifest = misbehave_manifest(pytester.path, "crash")
    target = f"--target={manifest}"
    explored = pytester.run(
        sys.executable,
        "-m",
        "afterclose.harness.cli",
        "explore",
        target,
        "--seed=3",
        "--faults=half_close,reset_peer",
        "--max-examples=20",
        "--budget-s=45",
        "--out=scenarios/found-{rule}.toml",
        timeout=180,
    )
    assert explored.ret == 1, explored.stdout.str() + explored.stderr.str()
    explored.stdout.fnmatch_lines(["*VIOLATION*", "wrote scenarios/found-*.toml:*"])
    (found,) = (pytester.path / "scenarios").glob("found-*.toml")
    text = found.read_text()
    assert "shrunk (Hypothesis, then simplified)" in text
    assert "failed again in 3 of 3 fresh run(s)" in text, text
    s = load_scenario(found)
    assert s.name == found.stem and s.seed is not None and len(s.phases) == 1, text
    result = pytester.runpytest_subprocess(
        target, "--no-builtin-suite", "-p", "no:cacheprovider", f"scenarios/{found.name}"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*rule(s) violated by target 'misbehave-crash'*", "*[[]crash[]]*"])


def test_explore_without_a_violation_leaves_no_folder(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "afterclose.harness.cli", "explore", "--target=seed-fixed"]
    argv += ["--tracer=off", "--faults=half_close", "--max-examples=2", "--budget-s=60"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^no violation: \d+ example\(s\)", done.stdout, re.MULTILINE), done.stdout
    folder = re.search(r", artifacts (/\S+afterclose-explore-seed-fixed-\S+)$", done.stdout, re.M)
    assert folder is not None, done.stdout
    assert not Path(folder[1]).exists()


@capabilities.requires("root")  # a read-only bind mount in a mount namespace of its own
def test_explore_from_a_read_only_folder_stops_before_the_search(tmp_path: Path) -> None:
    script = (
        f"mount --bind -o ro {tmp_path} {tmp_path} && cd {tmp_path} && "
        f"{sys.executable} -m afterclose.harness.cli explore --target=seed-fixed "
        "--tracer=off --max-examples=1 --budget-s=5"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot write the scenario file into {tmp_path}: Read-only file system" in (done.stderr)
    assert "--out=/tmp/found-{rule}.toml" in done.stderr
    assert "exploring" not in done.stdout  # before the search
    assert "Traceback" not in done.stderr


def test_a_scenario_that_cannot_be_written_is_returned_not_raised(tmp_path: Path) -> None:
    from afterclose.harness.explore import write_scenario

    blocker = tmp_path / "scenarios"
    blocker.write_text("a file where the folder should be")
    why = write_scenario(blocker / "found-x.toml", "name = 'x'\n")
    assert why is not None and "exists" in why.lower()
