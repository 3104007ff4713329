"""The zoo (targets/zoo/): each buggy target is found by the rule that names its mechanism,
each fixed twin passes the same scenarios; and group/name target specs resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from afterclose.harness.errors import AftercloseError
from afterclose.harness.manifest import (
    available_targets,
    builtin_targets_dir,
    load_manifest,
    resolve_target,
)
from afterclose.targets.zoo import ZOO, ZooEntry

# Races: each shows in nearly every run of its scenarios on a quiet machine (docs/zoo.md); two
# misses are allowed before the verdict counts.  A fixed twin gets one run: any report fails
# it.  Entries not `in_ci` (none today) are measured by bench/zoo.py only.
ATTEMPTS = 3
IN_CI = [e for e in ZOO if e.in_ci]
IDS = [e.name for e in ZOO]


def test_every_zoo_target_has_a_fixed_twin_and_a_source_line() -> None:
    folder = builtin_targets_dir() / "zoo"
    names = {p.parent.name for p in folder.glob("*/target.toml")}
    assert names == {e.name for e in ZOO} | {f"{e.name}-fixed" for e in ZOO}
    for name in names:
        manifest = folder / name / "target.toml"
        first = manifest.read_text().splitlines()[0]
        assert re.match(r"# source: https://github\.com/\S+/(issues|pull)/\d+", first), name
        assert load_manifest(manifest).description


def test_group_names_resolve_to_builtin_targets(tmp_path: Path) -> None:
    path = resolve_target("zoo/envoy-20438", None, cwd=tmp_path)
    assert path == (builtin_targets_dir() / "zoo" / "envoy-20438" / "target.toml").resolve()
    assert "zoo/envoy-20438-fixed" in available_targets(None)
    with pytest.raises(AftercloseError) as info:
        resolve_target("zoo/envoy-2043", None, cwd=tmp_path)
    assert "did you mean 'zoo/envoy-20438'" in str(info.value.hint)
    local = tmp_path / "zoo" / "envoy-20438"
    local.mkdir(parents=True)
    (local / "target.toml").write_text('name = "mine"\ncommand = ["true"]\n')
    # A path that exists wins over the built-in target of the same name.
    assert resolve_target("zoo/envoy-20438", None, cwd=tmp_path) == (local / "target.toml")


def _run(pytester: pytest.Pytester, target: str, scenarios: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        f"--target=zoo/{target}", "-k", scenarios, "-p", "no:cacheprovider"
    )


@pytest.mark.slow
@pytest.mark.parametrize("entry", IN_CI, ids=[e.name for e in IN_CI])
def test_buggy_target_is_found_by_its_root_cause_rule(
    pytester: pytest.Pytester, entry: ZooEntry
) -> None:
    for _ in range(ATTEMPTS):
        result = _run(pytester, entry.name, entry.scenarios)
        if re.search(rf"^\[{entry.rule}\] ", result.stdout.str(), re.M):
            break
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    assert re.search(rf"^\[{entry.rule}\] ", result.stdout.str(), re.M), result.stdout.str()


@pytest.mark.slow
@pytest.mark.parametrize("entry", ZOO, ids=IDS)
def test_fixed_twin_passes(pytester: pytest.Pytester, entry: ZooEntry) -> None:
    result = _run(pytester, f"{entry.name}-fixed", entry.scenarios)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert result.parseoutcomes().get("passed", 0) >= 1
