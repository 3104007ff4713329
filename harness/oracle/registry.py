"""Every rule, in the order verdicts list them; the README's rule table and ``afterclose
rules`` are generated from here."""

from __future__ import annotations

from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.rules import (
    busy_loop,
    concurrent_oneshot,
    crash,
    cross_talk,
    dropped_request,
    event_after_close,
    event_for_freed_data,
    fd_leak,
    foreign_close,
    freed_while_registered,
    incomplete_evidence,
    liveness,
    stale_batch_event,
    stale_rearm,
    use_after_close,
    wrong_incarnation,
)

RULES: tuple[Rule, ...] = (
    crash.RULE,
    liveness.RULE,
    cross_talk.RULE,
    dropped_request.RULE,
    fd_leak.RULE,
    busy_loop.RULE,
    foreign_close.RULE,
    event_after_close.RULE,
    use_after_close.RULE,
    stale_rearm.RULE,
    wrong_incarnation.RULE,
    freed_while_registered.RULE,
    event_for_freed_data.RULE,
    incomplete_evidence.RULE,
    stale_batch_event.RULE,
    concurrent_oneshot.RULE,
)
BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def describe() -> str:
    """Every rule's name and meaning, as plain text."""
    width = max(len(name) for name in NAMES)
    return "\n".join(f"{r.name:<{width}}  {r.plain_meaning}" for r in RULES)


def markdown_table() -> str:
    """The README's table of rules."""
    rows = ["| rule | what it means |", "| --- | --- |"]
    rows += [f"| `{r.name}` | {r.meaning} |" for r in RULES]
    return "\n".join(rows) + "\n"
