"""What a soak round runs: a test of the built-in suite, or a generated scenario.

The built-in suite is a pytest module (harness/suite/scenarios.py); a soak runs its test
functions directly on a freshly started target, one parametrization per entry, and leaves out
those whose ``skipif`` holds here (no scapy, no sch_netem...), as pytest would skip them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from afterclose.harness.session import TargetRun


@dataclass(frozen=True)
class SuiteEntry:
    name: str  # pytest's name for it: test_reset_peer[mid-request]
    call: Callable[[TargetRun], object]
    syscall_faults: Any = None  # its @pytest.mark.syscall_faults, if any

    def target_env(self, seed: int) -> dict[str, str]:
        """The target's environment for this test, as the plugin's ``target`` fixture sets it
        (``seed``: the run's test seed)."""
        if self.syscall_faults is None:
            return {}
        from afterclose.harness import syscall_faults

        mark = self.syscall_faults
        specs = syscall_faults.from_marker(mark.args, mark.kwargs, where=f"{self.name}: mark")
        return syscall_faults.to_env(specs, seed)


def _combinations(marks: Iterable[Any]) -> list[dict[str, object]]:
    combos: list[dict[str, object]] = [{}]
    for mark in marks:
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        argnames = [a.strip() for a in names.split(",")] if isinstance(names, str) else list(names)
        rows = []
        for value in mark.args[1]:
            value = getattr(value, "values", value)  # pytest.param(...)
            row = value if len(argnames) > 1 else (value,)
            rows.append(dict(zip(argnames, row, strict=True)))
        combos = [{**c, **r} for c in combos for r in rows]
    return combos


def suite_entries() -> tuple[list[SuiteEntry], list[tuple[str, str]]]:
    """The built-in suite's tests, in file order, and those skipped here (name, reason)."""
    from afterclose.harness.suite import scenarios as suite

    entries: list[SuiteEntry] = []
    skipped: list[tuple[str, str]] = []
    for name, fn in vars(suite).items():
        if not name.startswith("test_") or not callable(fn):
            continue
        marks: Sequence[Any] = getattr(fn, "pytestmark", [])
        skip = next((m for m in marks if m.name == "skipif" and m.args and m.args[0]), None)
        if skip is not None:
            skipped.append((name, str(skip.kwargs.get("reason", ""))))
            continue
        syscalls = next((m for m in marks if m.name == "syscall_faults"), None)
        for params in _combinations(marks):
            label = name + (f"[{'-'.join(map(str, params.values()))}]" if params else "")
            entries.append(SuiteEntry(label, functools.partial(fn, **params), syscalls))
    return entries, skipped
