"""Violations: what every rule, black-box or traced, reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# How many occurrences a violation of several lists in its details after the first.
MORE_SHOWN = 9


@dataclass(frozen=True)
class Violation:
    """One finding.  ``summary`` is one line; ``details`` may hold a multi-line timeline."""

    rule: str
    summary: str
    details: str = ""
    count: int = 1
    artifacts: tuple[str, ...] = field(default=())

    @classmethod
    def of_many(cls, rule: str, lines: Sequence[str]) -> Violation:
        """One violation for several occurrences, one line each: the first is the summary,
        the next ``MORE_SHOWN`` the details."""
        more = "\n".join(lines[1 : 1 + MORE_SHOWN])
        return cls(rule, lines[0], details=more, count=len(lines))

    def render(self) -> str:
        more = f" (+{self.count - 1} more)" if self.count > 1 else ""
        text = f"[{self.rule}] {self.summary}{more}"
        if self.details:
            text += "\n" + "\n".join("    " + line for line in self.details.splitlines())
        for path in self.artifacts:
            text += f"\n    see: {path}"
        return text
