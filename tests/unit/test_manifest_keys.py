"""Every manifest key is declared once (manifest_keys.KEYS): the parser, the README and
`afterclose manifest --explain` all come from that table."""

from __future__ import annotations

from pathlib import Path

import pytest
from paths import ROOT_DIR

from afterclose.harness import manifest as mf
from afterclose.harness.errors import ManifestError
from afterclose.harness.manifest_keys import KEYS, markdown_table

README = ROOT_DIR / "README.md"


def _allowed(data: dict[str, object], tmp_path: Path, table: str | None) -> set[str]:
    """The keys the parser accepts in ``table`` (None: the top level), from its error."""
    data = dict(data)
    if table is None:
        data["zzz_unknown"] = 1
    else:
        inner = data[table]
        assert isinstance(inner, dict)
        data[table] = {**inner, "zzz_unknown": 1}
    with pytest.raises(ManifestError) as err:
        mf.parse_manifest(data, tmp_path / "target.toml")
    listed = err.value.message.split("allowed here: ", 1)[1].rstrip(")")
    prefix = f"{table}." if table else ""
    return {prefix + k.strip() for k in listed.split(",")}


def test_the_parser_reads_exactly_the_declared_keys(tmp_path: Path) -> None:
    (tmp_path / "s.c").write_text("int main(void) { return 0; }\n")
    base: dict[str, object] = {
        "name": "t",
        "command": ["{build}"],
        "compile": {"sources": ["s.c"]},
        "ready": {"port": True},
        "docker": {"image": "x:y"},
    }
    tables = {"compile", "ready", "docker"}
    top = _allowed(base, tmp_path, None)
    assert top == {k for k in KEYS if "." not in k} | tables
    for table in tables:
        inner = _allowed(base, tmp_path, table)
        assert inner == {k for k in KEYS if k.startswith(table + ".")}, table


def test_defaults_come_from_the_table(tmp_path: Path) -> None:
    m = mf.parse_manifest({"name": "t", "command": ["x"]}, tmp_path / "target.toml")
    assert m.fd_grace_s == KEYS["fd_grace_s"].default
    assert m.stop_signal == KEYS["stop_signal"].default
    assert m.ready.timeout_s == KEYS["ready.timeout_s"].default
    assert m.liveness_path == KEYS["liveness_path"].default


def test_a_missing_required_key_names_it_with_its_expected_value(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as err:
        mf.parse_manifest({"name": "t"}, tmp_path / "target.toml")
    assert "missing required key 'command'" in err.value.message
    assert f"<{KEYS['command'].value}>" in (err.value.hint or "")


def test_readme_holds_the_manifest_table() -> None:
    assert markdown_table() in README.read_text()
