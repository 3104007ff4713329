"""Violations: what every oracle rule, black-box or traced, reports."""

from __future__ import annotations

from dataclasses import dataclass, field

# Rule names are stable strings: users grep CI logs for them and select them in options.
CRASH = "crash"
LIVENESS = "liveness"
CROSS_TALK = "cross-talk"
FD_LEAK = "fd-leak"
BUSY_LOOP = "busy-loop"
EVENT_AFTER_CLOSE = "event-after-close"
USE_AFTER_CLOSE = "use-after-close"
STALE_REARM = "stale-rearm"
WRONG_INCARNATION = "wrong-incarnation"
FREED_WHILE_REGISTERED = "freed-while-registered"
EVENT_FOR_FREED_DATA = "event-for-freed-data"
TRACE_INCOMPLETE = "trace-incomplete"

RULES: dict[str, str] = {
    CRASH: "the target exited or was killed by a signal, or a sanitizer reported an error",
    LIVENESS: "after the scenario, a fresh request did not get a correct answer",
    CROSS_TALK: "a client received bytes it never asked for",
    FD_LEAK: "a connection whose peer is gone was never closed by the target",
    BUSY_LOOP: "the target burnt CPU while its clients were idle (e.g. spinning on EMFILE)",
    EVENT_AFTER_CLOSE: "epoll returned an event for an fd incarnation closed before the wait began",
    USE_AFTER_CLOSE: "an operation on an fd number whose incarnation was already closed (EBADF)",
    STALE_REARM: "epoll_ctl re-armed a reused fd number with the data of a closed incarnation",
    WRONG_INCARNATION: "a thread acted on a reused fd number for an older incarnation of it",
    FREED_WHILE_REGISTERED: "free() of the data of a registration that could still fire",
    EVENT_FOR_FREED_DATA: "epoll returned an event whose data pointer was already freed",
}


# Judged from outside only: the trace checker has no say on these.
BLACKBOX_ONLY = frozenset((CRASH, LIVENESS, CROSS_TALK, BUSY_LOOP))


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
