"""crash: the server died during the run, or a sanitizer reported an error."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.runners.base import Server

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "crash"
SANITIZER_REPORT = re.compile(
    r"^.*(ERROR: AddressSanitizer|ERROR: LeakSanitizer|WARNING: ThreadSanitizer"
    r"|runtime error:|ERROR: MemorySanitizer).*$",
    re.MULTILINE,
)
QUOTE_LINES = 25


def sanitizer_report(stderr: str) -> str | None:
    match = SANITIZER_REPORT.search(stderr)
    if match is None:
        return None
    lines = stderr[match.start() :].splitlines()
    quoted = lines[:QUOTE_LINES]
    if len(lines) > QUOTE_LINES:
        quoted.append(f"... ({len(lines) - QUOTE_LINES} more lines in the target's stderr)")
    return "\n".join(quoted)


def check_crash(target: Server) -> Violation | None:
    """Judged once the server is stopped: an exit the harness did not cause, or a sanitizer
    report anywhere in its stderr (some are only written at exit)."""
    report = sanitizer_report(target.stderr_text())
    status = target.exit_status()
    died = status is not None and not status.stopped_by_harness
    if report is None and not died:
        return None
    what = status.describe() if died and status else "a sanitizer reported an error"
    details = report if report is not None else target.log_tail()
    return Violation(
        NAME,
        f"target {target.name!r} {what} during the scenario",
        details=details,
        artifacts=(str(target.plan.stderr_path),),
    )


def decide(ev: Evidence) -> list[Violation]:
    found = check_crash(ev.server)
    return [found] if found is not None else []


RULE = Rule(
    NAME,
    "the target died, or a sanitizer reported an error (quoted)",
    decide=decide,
)
