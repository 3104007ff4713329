"""Scenario files (``scenarios/*.toml``): loading, validation, and their pytest collection.

Every problem is found when the file is loaded (at collection time under pytest) and names the
file and the key, e.g. ``scenarios/rst.toml: phase[2].conections``.  The format is described in
docs/scenarios.md.  Under pytest each file becomes one test (``pytest.Function`` over a function
taking the ``target`` fixture), so the oracle judges it exactly like the built-in suite.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from afterclose.harness.errors import AftercloseError, ScenarioError
from afterclose.harness.scenario import PHASE_KEYS, Scenario, make_phase
from afterclose.harness.session import TargetRun

TOP_KEYS = ("name", "description", "seed", "phase")
SCENARIO_FOLDER = "scenarios"
EXAMPLE = '[[phase]]\nname = "chaos"\nfault = "shutdown_race"\nconnections = 100'


def _unknown(key: str, options: tuple[str, ...], where: str, what: str) -> ScenarioError:
    from afterclose.faults.base import suggest

    match = suggest(key, options)
    listing = ", ".join(options)
    return ScenarioError(
        f"unknown key {key!r} ({what}: {listing})",
        where=where,
        hint=f"did you mean {match!r}?" if match else None,
    )


def parse_scenario(data: Mapping[str, Any], source: str, default_name: str) -> Scenario:
    """The scenario described by ``data`` (a parsed file); errors name ``source`` and the key."""
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(key, TOP_KEYS, f"{source}: {key}", "top-level keys")
    name = data.get("name", default_name)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(
            f"'description' must be a string, got {description!r}", where=f"{source}: description"
        )
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ScenarioError(
            f"'seed' must be a whole number >= 0, got {seed!r}",
            where=f"{source}: seed",
            hint="leave it out to take the seed from --fault-seed",
        )
    if not isinstance(name, str):
        raise ScenarioError(f"'name' must be a string, got {name!r}", where=f"{source}: name")
    try:
        scen = Scenario(name, seed, description)
    except ScenarioError as exc:
        raise ScenarioError(exc.message, where=f"{source}: name", hint=exc.hint) from None
    phases = data.get("phase")
    if phases is None:
        raise ScenarioError(
            "no [[phase]]: a scenario needs at least one phase", where=source, hint=EXAMPLE
        )
    if not isinstance(phases, list) or not all(isinstance(p, dict) for p in phases):
        raise ScenarioError(
            "'phase' must be an array of tables: write each phase under [[phase]]",
            where=f"{source}: phase",
            hint=EXAMPLE,
        )
    for index, table in enumerate(phases):

        def where(key: str, index: int = index) -> str:
            return f"{source}: phase[{index}]" + (f".{key}" if key else "")

        params = {k: v for k, v in table.items() if k not in PHASE_KEYS}
        phase = make_phase(
            index,
            table.get("name", f"phase-{index}"),
            table.get("fault"),
            params,
            parallel=table.get("parallel"),
            repeat=table.get("repeat", 1),
            budget_s=table.get("budget_s"),
            where=where,
        )
        scen = scen.with_phase(phase, where)
    return scen


def load_scenario(path: Path, source: str | None = None) -> Scenario:
    """Read and validate the scenario file ``path`` (``source``: how errors name it)."""
    source = source or str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        hint = (
            f"no such file: give the path of a scenario file (e.g. {SCENARIO_FOLDER}/NAME.toml)"
            if isinstance(exc, FileNotFoundError)
            else None
        )
        raise ScenarioError(
            f"cannot read the scenario file: {exc.strerror}", where=source, hint=hint
        ) from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"not UTF-8 text: {exc.reason}", where=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(
            f"not valid TOML: {exc}", where=source, hint="see docs/scenarios.md for the format"
        ) from None
    return parse_scenario(data, source, path.stem)


# --------------------------------------------------------------------------- pytest


def is_scenario_file(path: Path, parent: pytest.Collector) -> bool:
    """A ``.toml`` file in a ``scenarios`` folder, or one named on the command line."""
    if path.suffix != ".toml":
        return False
    return path.parent.name == SCENARIO_FOLDER or parent.session.isinitpath(path)


class ScenarioItem(pytest.Function):
    """A scenario file's test: a ``pytest.Function`` (fixtures, markers, the oracle's hook)."""

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"scenario {self.name}"


class ScenarioFile(pytest.File):
    """One scenario file: validated when collected, one test named after the scenario."""

    def collect(self) -> Iterator[pytest.Item]:
        try:
            source = str(self.path.relative_to(self.config.rootpath))
        except ValueError:
            source = str(self.path)
        try:
            scen = load_scenario(self.path, source)
        except AftercloseError as exc:
            raise self.CollectError(exc.render()) from None
        nodeid = f"{self.nodeid}::{scen.name}"

        def test_scenario(target: TargetRun) -> None:
            target.replay_nodeid = nodeid
            # Shown with the test's output (on failure, or with -rP): phases and schedule digest.
            print(target.run_scenario(scen).summary())

        test_scenario.__doc__ = scen.description or f"scenario file {source}"
        yield ScenarioItem.from_parent(self, name=scen.name, callobj=test_scenario)


def collect_file(path: Path, parent: pytest.Collector) -> ScenarioFile | None:
    """The collector for ``path`` if it is a scenario file (see :func:`is_scenario_file`)."""
    if not is_scenario_file(path, parent):
        return None
    collector: ScenarioFile = ScenarioFile.from_parent(parent, path=path)
    return collector
