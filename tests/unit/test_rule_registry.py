"""The registry: every rule once, in the README's order, each in its own module."""

from __future__ import annotations

import importlib
from pathlib import Path

from afterclose.harness.oracle import registry

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_rule_table_is_generated_from_the_registry() -> None:
    assert registry.markdown_table() in README.read_text(encoding="utf-8")


def test_every_rule_is_one_module_named_after_it() -> None:
    for rule in registry.RULES:
        module = importlib.import_module(
            f"afterclose.harness.oracle.rules.{rule.name.replace('-', '_')}"
        )
        assert module.RULE is rule and rule.name == module.NAME


def test_names_are_unique_and_every_rule_can_decide() -> None:
    assert len(set(registry.NAMES)) == len(registry.RULES)
    for rule in registry.RULES:
        assert rule.traced is not None or rule.decide is not None, rule.name
        assert rule.meaning and "\n" not in rule.meaning and "|" not in rule.meaning


def test_traced_rules_say_why_their_pattern_is_a_bug() -> None:
    no_timeline = {"incomplete-evidence"}  # about the whole trace, not one call
    for rule in registry.RULES:
        if rule.traced is not None and rule.name not in no_timeline:
            assert rule.why, rule.name


def test_describe_lists_every_rule_with_its_meaning() -> None:
    text = registry.describe()
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines] == list(registry.NAMES)
    assert "`" not in text
