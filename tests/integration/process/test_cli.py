"""``afterclose run``: one fault or a scenario file, with progress, a summary and exit codes."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from paths import ROOT_DIR

from afterclose.harness.cli.progress import ProgressView
from afterclose.harness.client.engine import StormProgress

ROOT = ROOT_DIR
DIGEST = re.compile(r"^scenario 'gentle' seed (\d+): .* schedule (sha256:[0-9a-f]+)$", re.M)
REPLAY = re.compile(r"^replay: (afterclose run .*)$", re.M)
SCHEDULE = re.compile(r"^schedule: fault seed (\d+), (sha256:[0-9a-f]+), (\d+) connection", re.M)
PYTEST_REPLAY = re.compile(r"^   or: (pytest .*)$", re.M)
ARTIFACTS = re.compile(r"(?:artifacts:? )(/\S+?)\)?$", re.M)

GENTLE = """\
name = "gentle"

[[phase]]
name = "storm"
fault = "connection_storm"
rate_per_s = 300
duration_s = 1.2
mix = { keepalive = 2, close = 1, malformed = 1, slow_sender = 1 }

[[phase]]
name = "resets"
fault = "reset_peer"
phase = "after-request"
connections = 10
"""

CHAOS = """\
name = "chaos"

[[phase]]
name = "chaos"
fault = "shutdown_race"
connections = 200
concurrency = 10
close_mode = "rst"
"""


def afterclose(*args: str, cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """The command line in a subprocess (stderr is a pipe, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "afterclose.harness.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def replay(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a printed replay command as printed (``afterclose`` and ``pytest`` from this venv)."""
    argv = shlex.split(command)
    program = {"afterclose": "afterclose.harness.cli", "pytest": "pytest"}[argv[0]]
    return subprocess.run(
        [sys.executable, "-m", program, *argv[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def remove_artifacts(*outputs: str) -> None:
    """``afterclose run`` keeps each run's folder under the system's temp folder."""
    for output in outputs:
        for folder in ARTIFACTS.findall(output):
            if Path(folder).name.startswith("afterclose-run-"):
                shutil.rmtree(folder, ignore_errors=True)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / "scenarios" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def progress(elapsed_s: float, started: int, finished: bool = False) -> StormProgress:
    return StormProgress(
        fault="connection_storm",
        planned=100,
        started=started,
        done=started,
        connections=started,
        errors=0,
        elapsed_s=elapsed_s,
        rate_per_s=100.0,
        target_rate_per_s=100.0,
        duration_s=1.0,
        processes=2,
        pids=(1, 2),
        per_process=(started // 2, started - started // 2),
        loop="uvloop",
        finished=finished,
    )


# --------------------------------------------------------------------------- progress


def test_progress_bar_redraws_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    for n in (10, 50):
        view.storm(progress(n / 100, n))
    view.storm(progress(1.0, 100, finished=True))
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("- done\n") and text.count("\n") == 1
    assert "[############............]  50% 50/100 conn" in text
    assert "2 process(es) on uvloop" in text


def test_progress_is_one_line_a_second_when_not_a_terminal() -> None:
    out = io.StringIO()
    view = ProgressView(out, tty=False, every_s=60)
    for n in (10, 50, 90):
        view.storm(progress(n / 100, n))
    view.storm(progress(1.0, 100, finished=True))
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2
    assert " 10% 10/100 conn" in lines[0] and lines[1].endswith("- done")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["scenarios/nope.toml"],
            [
                "afterclose: error: scenarios/nope.toml: cannot read the scenario file: "
                "No such file or directory",
                "Hint: no such file",
            ],
        ),
        (
            ["--scenario", "scenarios/typo.toml"],
            [
                "afterclose: error: scenarios/typo.toml: phase[1].conections: unknown key "
                "'conections' for fault 'shutdown_race'",
                "Hint: did you mean 'connections'?",
            ],
        ),
        (
            ["scenarios/typo.toml", "connections=5"],
            ["takes no key=value parameters", "Hint: write the parameters into the file"],
        ),
        ([], ["nothing to run", "Hint: e.g. afterclose run"]),
        # The values pytest refuses are refused here too, with the same words.
        (["--seed=-1", "reset_peer"], ["--seed='-1' must be between 0 and 2**64-1"]),
        (["--seed=x", "reset_peer"], ["--seed='x' is not a whole number"]),
        (["--runner=vm", "reset_peer"], ["--runner='vm' is not valid; choose one of: process"]),
        (["--chaos=11", "reset_peer"], ["--chaos='11' is not valid"]),
        (["reset_per"], ["unknown fault 'reset_per'", "did you mean 'reset_peer'?"]),
        (
            ["connection_storm", "processes=0"],
            ["parameter 'processes' = 0 is out of range (allowed: 1..32)"],
        ),
        # Before the target starts (no test name in the message), the fault named once.
        (
            ["reset_peer", "bogus=3"],
            [
                "afterclose: error: afterclose run: fault 'reset_peer': unknown parameter "
                "'bogus' (allowed: connections, concurrency, phase)\n"
            ],
        ),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    write(
        tmp_path,
        "typo.toml",
        """\
        [[phase]]
        fault = "half_close"
        [[phase]]
        fault = "shutdown_race"
        conections = 50
        """,
    )
    result = afterclose("run", "--target=seed-fixed", "--tracer=off", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    for line in expected:
        assert line in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["demo", "run --target=x f", "explore --target=x"])
def test_every_command_that_starts_a_target_takes_runner(command: str) -> None:
    from afterclose.harness.cli import build_parser

    args = build_parser().parse_args(command.split())
    assert (args.runner, args.tracer, args.sanitize, args.chaos) == (
        "process",
        "auto",
        "none",
        "off",
    )
    assert build_parser().parse_args([*command.split(), "--runner=docker"]).runner == "docker"


# --------------------------------------------------------------------------- runs


def test_a_fault_still_runs_as_before(tmp_path: Path) -> None:
    result = afterclose(
        "run",
        "--target=seed-fixed",
        "--tracer=off",
        "connection_storm",
        "rate_per_s=300",
        "duration_s=1.5",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("connection_storm: connections=")
    assert "no violation" in result.stdout
    # Not a terminal: a progress line a second, then the last one.
    bars = [line for line in result.stderr.splitlines() if line.startswith("connection_storm [")]
    assert len(bars) >= 2 and bars[-1].endswith("- done"), result.stderr


def test_a_scenario_file_passes_on_seed_fixed_and_replays(tmp_path: Path) -> None:
    path = write(tmp_path, "gentle.toml", GENTLE)
    first = afterclose(
        "run", "--target=seed-fixed", "--seed=5", "scenarios/gentle.toml", cwd=tmp_path
    )
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "verdict: PASS - no rule violated" in out
    assert "seed: fault seed 5, scenario seed " in out
    replay = REPLAY.search(out)
    assert replay is not None and replay[1] == (
        "afterclose run --target=seed-fixed --seed=5 scenarios/gentle.toml"
    )
    assert (
        "   or: pytest --target=seed-fixed --fault-seed=5 --no-builtin-suite "
        "scenarios/gentle.toml::gentle" in out
    )
    assert "phase[0] storm: connection_storm ..." in first.stderr
    assert "phase[1] resets done: reset_peer: connections=10" in first.stderr
    assert re.search(r"^connection_storm \[#+\] 100% .* - done$", first.stderr, re.M)
    # --scenario FILE is the same thing; the same seed gives the same schedule.
    again = afterclose(
        "run", "--target=seed-fixed", "--seed=5", "--scenario", str(path), cwd=tmp_path
    )
    other = afterclose("run", "--target=seed-fixed", "--seed=6", str(path), cwd=tmp_path)
    assert again.returncode == other.returncode == 0, again.stdout + other.stdout
    digests = [DIGEST.search(r.stdout) for r in (first, again, other)]
    assert all(d is not None for d in digests)
    seeds = [(d[1], d[2]) for d in digests if d is not None]
    assert seeds[0] == seeds[1] and seeds[0] != seeds[2]


@pytest.mark.slow
def test_a_scenario_file_fails_on_seed_buggy(tmp_path: Path) -> None:
    write(tmp_path, "chaos.toml", CHAOS)
    for _ in range(3):  # a race: it shows on nearly every run, but allow a miss
        result = afterclose("run", "--target=seed-buggy", "scenarios/chaos.toml", cwd=tmp_path)
        if result.returncode == 1:
            break
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^verdict: FAIL - \d+ rule\(s\) violated: [a-z-]+", out, re.M), out
    assert re.search(r"^\[[a-z-]+\] ", out, re.M)
    assert re.search(
        r"^replay: afterclose run --target=seed-buggy --seed=\d+ scenarios/", out, re.M
    )
    assert "scenario 'chaos' seed " in out and "schedule sha256:" in out


# --------------------------------------------------------------------------- replays


def test_a_printed_fault_replay_reproduces_the_run(tmp_path: Path) -> None:
    first = afterclose(
        "run",
        "--target=seed-fixed",
        "--tracer=off",
        "reset_peer",
        "connections=6",
        "phase=after-request",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    line = REPLAY.search(first.stdout)
    schedule = SCHEDULE.search(first.stdout)
    assert line is not None and schedule is not None, first.stdout
    seed = schedule[1]
    assert line[1] == (
        f"afterclose run --target=seed-fixed --seed={seed} --tracer=off reset_peer "
        "connections=6 phase=after-request"
    )
    again = replay(line[1], tmp_path)
    remove_artifacts(first.stdout, again.stdout)
    assert again.returncode == 0, again.stdout + again.stderr
    repeated = SCHEDULE.search(again.stdout)
    assert repeated is not None and repeated.groups() == schedule.groups()
    assert schedule[3] == "6" and "reset_peer: connections=6" in again.stdout


def test_a_printed_pytest_replay_reproduces_the_schedule(tmp_path: Path) -> None:
    write(
        tmp_path,
        "small.toml",
        """\
        [[phase]]
        fault = "reset_peer"
        connections = 6
        """,
    )
    first = afterclose(
        "run", "--target=seed-fixed", "--tracer=off", "scenarios/small.toml", cwd=tmp_path
    )
    remove_artifacts(first.stdout)
    assert first.returncode == 0, first.stdout + first.stderr
    line = PYTEST_REPLAY.search(first.stdout)
    digest = re.search(
        r"^scenario 'small' seed (\d+): .* schedule (sha256:[0-9a-f]+)$", first.stdout, re.M
    )
    assert line is not None and digest is not None, first.stdout
    assert line[1].startswith("pytest --target=seed-fixed --fault-seed=")
    # -rP shows a passing test's output: the scenario's seed and schedule digest.
    again = replay(f"{line[1]} -rP -p no:cacheprovider", tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 passed" in again.stdout
    assert digest[0] in again.stdout, again.stdout


def test_one_function_writes_every_replay_command() -> None:
    from afterclose.harness import replay
    from afterclose.harness.session import Settings

    s = Settings(
        target="seed-fixed",
        rootdir=ROOT,
        run_id="r",
        runner="docker",
        tracer="auto",
        chaos="high",
        fault_seed=7,
        kernel="6.1",
    )
    assert replay.command(s, "pytest", ["-k", "test_x"]) == (
        "pytest --target=seed-fixed --fault-seed=7 --runner=docker --chaos=high --kernel=6.1 "
        "-k test_x"
    )
    # The command line has no --kernel; the demo runs its own two targets.
    assert replay.command(s, "run", ["reset_peer", "mix={'a': 1}"]) == (
        "afterclose run --target=seed-fixed --seed=7 --runner=docker --chaos=high reset_peer "
        "'mix={'\"'\"'a'\"'\"': 1}'"
    )
    assert replay.command(s, "demo") == "afterclose demo --seed=7 --runner=docker --chaos=high"
    assert replay.command(s, "pytest", ["--no-builtin-suite", "f.toml"], seed=False) == (
        "pytest --target=seed-fixed --runner=docker --chaos=high --kernel=6.1 "
        "--no-builtin-suite f.toml"
    )


def test_rules_lists_the_registry_and_its_markdown_is_the_readmes_table() -> None:
    from afterclose.harness.oracle import registry

    out = subprocess.run(
        [sys.executable, "-m", "afterclose.harness.cli", "rules"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for rule in registry.RULES:
        assert any(line.startswith(rule.name + " ") for line in out.splitlines()), rule.name
    md = subprocess.run(
        [sys.executable, "-m", "afterclose.harness.cli", "rules", "--markdown"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert md == registry.markdown_table()


def test_manifest_explains_every_key_and_checks_one_manifest() -> None:
    from afterclose.harness.manifest_keys import KEYS

    out = subprocess.run(
        [sys.executable, "-m", "afterclose.harness.cli", "manifest", "--explain"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")] == list(KEYS)
    bad = subprocess.run(
        [sys.executable, "-m", "afterclose.harness.cli", "manifest", "--target", "nosuch"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("afterclose: error:") == 1


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: EPIPE at once
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "afterclose.harness.cli", "rules"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == ""


def test_a_passing_run_leaves_its_artifacts_only_when_asked(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    argv = [sys.executable, "-m", "afterclose.harness.cli", "run", "--target=seed-fixed"]
    fault = ["reset_peer", "connections=3", "phase=after-request"]
    env = {**os.environ, "TMPDIR": str(temp)}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*argv, *extra, *fault], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    first = run()
    assert "artifacts deleted; --keep-artifacts keeps them" in first.stdout
    assert [p.name for p in temp.iterdir() if p.name.startswith("afterclose-run-")] == []
    kept = run("--keep-artifacts")
    folders = [p for p in temp.iterdir() if p.name.startswith("afterclose-run-")]
    assert len(folders) == 1 and f"artifacts: {folders[0]}" in kept.stdout
    assert any(folders[0].rglob("target.stdout"))
