"""A campaign's rounds as a JUnit XML report: one test case per round, a violated rule as the
failure's type, so that CI systems list and count rounds like tests."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from afterclose.harness.campaign.state import RoundRecord


def junit_tree(suite: str, rounds: list[RoundRecord]) -> ET.ElementTree:
    failures = sum(1 for r in rounds if r.rules)
    errors = sum(1 for r in rounds if r.error and not r.rules)
    root = ET.Element(
        "testsuites",
        tests=str(len(rounds)),
        failures=str(failures),
        errors=str(errors),
        time=f"{sum(r.elapsed_s for r in rounds):.3f}",
    )
    node = ET.SubElement(
        root,
        "testsuite",
        name=suite,
        tests=str(len(rounds)),
        failures=str(failures),
        errors=str(errors),
        skipped="0",
        time=f"{sum(r.elapsed_s for r in rounds):.3f}",
    )
    for r in rounds:
        case = ET.SubElement(
            node,
            "testcase",
            classname=f"{suite}.{r.kind}",
            name=f"round-{r.number:05d} {r.name}",
            time=f"{r.elapsed_s:.3f}",
        )
        props = ET.SubElement(case, "properties")
        for key, value in (
            ("seed", r.seed),
            ("connections", r.connections),
            ("scenario", r.scenario),
        ):
            ET.SubElement(props, "property", name=key, value=str(value))
        if r.rules:
            failure = ET.SubElement(
                case, "failure", type=r.rules[0], message=", ".join(r.rules) + " violated"
            )
            failure.text = r.message
        elif r.error:
            error = ET.SubElement(case, "error", type="harness", message=r.error.splitlines()[0])
            error.text = r.error
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(path: Path, suite: str, rounds: list[RoundRecord]) -> None:
    """Write (the whole report, every round so far) atomically: a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    junit_tree(suite, rounds).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)
