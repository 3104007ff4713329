"""pytest plugin for the inner pytest in a guest: run only the host's tests, record outcomes.

One JSON line per test in ``--afterclose-guest-report``, written as each test finishes so
that a guest that dies half-way still hands back what it finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("afterclose")
    group.addoption("--afterclose-guest-report", default=None, help=argparse.SUPPRESS)
    group.addoption("--afterclose-guest-select", default=None, help=argparse.SUPPRESS)


def pytest_configure(config: pytest.Config) -> None:
    report = config.getoption("afterclose_guest_report")
    if report:
        select = config.getoption("afterclose_guest_select")
        reporter = GuestReporter(Path(report), Path(select) if select else None)
        config.pluginmanager.register(reporter, "afterclose-guest-reporter")


class GuestReporter:
    def __init__(self, report: Path, select: Path | None) -> None:
        self.report = report
        self.select = select
        self.pending: dict[str, list[pytest.TestReport]] = {}
        self.tmp_paths: dict[str, str] = {}

    def write(self, record: dict[str, Any]) -> None:
        with self.report.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if self.select is None:
            return
        wanted = [line for line in self.select.read_text().splitlines() if line]
        wanted_set = set(wanted)
        keep = [item for item in items if item.nodeid in wanted_set]
        dropped = [item for item in items if item.nodeid not in wanted_set]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        found = {item.nodeid for item in keep}
        for nodeid in wanted:
            if nodeid not in found:
                self.write({"nodeid": nodeid, "outcome": "missing", "when": "collect"})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            # An import the guest cannot satisfy: the tests it hid come back as "missing",
            # and this says why.
            self.write(
                {
                    "nodeid": report.nodeid,
                    "outcome": "collect-error",
                    "longrepr": str(report.longrepr),
                }
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.pending.setdefault(report.nodeid, []).append(report)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Any:
        # Before teardown, while the fixtures' values are still there: the test's own folder,
        # whose traces and timelines its report points at.
        tmp = getattr(item, "funcargs", {}).get("tmp_path")
        if tmp is not None:
            self.tmp_paths[item.nodeid] = str(tmp)
        return (yield)

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        record = summarise(nodeid, self.pending.pop(nodeid, []))
        if nodeid in self.tmp_paths:
            record["tmp_path"] = self.tmp_paths.pop(nodeid)
        self.write(record)


def summarise(nodeid: str, reports: list[pytest.TestReport]) -> dict[str, Any]:
    """One test's outcome from its setup, call and teardown reports."""
    # Each phase's report repeats the sections of the phases before it: the last has them all.
    sections = list(reports[-1].sections) if reports else []
    duration = sum(r.duration for r in reports)
    record: dict[str, Any] = {"nodeid": nodeid, "duration": duration, "sections": sections}
    for r in reports:
        if r.failed:
            return {**record, "outcome": "failed", "when": r.when, "longrepr": r.longreprtext}
    for r in reports:
        if r.skipped:
            if hasattr(r, "wasxfail"):
                return {**record, "outcome": "xfailed", "when": r.when, "reason": r.wasxfail}
            reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            return {**record, "outcome": "skipped", "when": r.when, "reason": reason}
    return {**record, "outcome": "passed", "when": "call"}
