"""A process that escapes the preload tracer makes the evidence incomplete.

The built-in servers started through ``env -u LD_PRELOAD``: only the wrapper's image is traced
(``env`` execs the server under the same PID, without the shim), so the trace holds nothing the
server did.  Whatever the rules find or miss in it, the run must not pass:
``incomplete-evidence`` names the process that holds the port and says how to trace it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from paths import ROOT_DIR

from afterclose.harness.session import Harness, Settings

TARGETS = ROOT_DIR / "targets"
SEED_BUGGY = TARGETS / "seed-buggy" / "seed_buggy.c"
SEED_FIXED = TARGETS / "seed-fixed" / "seed_fixed.c"


def run_wrapped(
    tmp_path: Path, wrapper: list[str], source: Path = SEED_BUGGY
) -> list[tuple[str, str, str]]:
    manifest = tmp_path / "wrapped.toml"
    command = ", ".join(f'"{part}"' for part in [*wrapper, "{build}", "{host}", "{port}"])
    manifest.write_text(
        f"""
name = "{source.stem}-wrapped"
command = [{command}]
echo_path = true
[compile]
sources = ["{source}"]
cflags = ["-O2", "-Wall", "-pthread"]
ldflags = ["-pthread"]
[ready]
log = "READY"
"""
    )
    settings = Settings(
        target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex, tracer="preload"
    )
    with Harness(settings).start(tmp_path / "run", "test-wrapped") as run:
        run.run_fault("shutdown_race", connections=20, concurrency=4)
        outcome = run.finish()
    return [(v.rule, v.summary, v.details) for v in outcome.violations]


def test_a_wrapper_that_drops_ld_preload_cannot_pass(tmp_path: Path) -> None:
    found = run_wrapped(tmp_path, ["env", "-u", "LD_PRELOAD"])
    # seed-buggy may also really crash (a double free) before the end: never a PASS either way,
    # and the escape was seen when the tracer attached.
    incomplete = [v for v in found if v[0] == "incomplete-evidence"]
    assert incomplete, found
    _, summary, details = incomplete[0]
    assert "seed_buggy" in summary or "seed-buggy" in summary
    assert "was not traced" in summary and "--tracer=ebpf" in summary
    assert "the shim not loaded" in details


def test_a_correct_server_that_escapes_is_incomplete_not_passed(tmp_path: Path) -> None:
    found = run_wrapped(tmp_path, ["env", "-u", "LD_PRELOAD"], SEED_FIXED)
    assert [rule for rule, _, _ in found] == ["incomplete-evidence"], found


def test_a_wrapper_that_keeps_ld_preload_is_traced(tmp_path: Path) -> None:
    found = run_wrapped(tmp_path, ["env"], SEED_FIXED)
    assert found == []
