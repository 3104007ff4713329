"""Violations: what every rule, black-box or traced, reports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Violation:
    """One finding.  ``summary`` is one line; ``details`` may hold a multi-line timeline."""

    rule: str
    summary: str
    details: str = ""
    count: int = 1
    artifacts: tuple[str, ...] = field(default=())

    def render(self) -> str:
        more = f" (+{self.count - 1} more)" if self.count > 1 else ""
        text = f"[{self.rule}] {self.summary}{more}"
        if self.details:
            text += "\n" + "\n".join("    " + line for line in self.details.splitlines())
        for path in self.artifacts:
            text += f"\n    see: {path}"
        return text
