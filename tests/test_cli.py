"""``afterclose run``: one fault or a scenario file, with progress, a summary and exit codes."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from afterclose.harness.cli import ProgressView
from afterclose.harness.client.engine import StormProgress

ROOT = Path(__file__).resolve().parent.parent
DIGEST = re.compile(r"^scenario 'gentle' seed (\d+): .* schedule (sha256:[0-9a-f]+)$", re.M)
REPLAY = re.compile(r"^replay: (afterclose run .*)$", re.M)

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
        (["reset_per"], ["unknown fault 'reset_per'", "did you mean 'reset_peer'?"]),
        (
            ["connection_storm", "processes=0"],
            ["parameter 'processes' = 0 is out of range (allowed: 1..32)"],
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
