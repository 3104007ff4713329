"""Errors a user can act on: each names where the problem is and how to fix it."""

from __future__ import annotations

from pathlib import Path


class AftercloseError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    ``where`` is the file (and key) the problem is in, ``hint`` says how to fix it and
    ``details`` carries extra lines such as a target's log tail.
    """

    def __init__(
        self,
        message: str,
        *,
        where: str | Path | None = None,
        hint: str | None = None,
        details: str | None = None,
    ) -> None:
        self.message = message
        self.where = str(where) if where is not None else None
        self.hint = hint
        self.details = details
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        parts = [head]
        if self.details:
            parts.append(self.details.rstrip())
        if self.hint:
            parts.append(f"Hint: {self.hint}")
        return "\n".join(parts)


class ManifestError(AftercloseError):
    """A target manifest is missing, unreadable or invalid."""


class BuildError(AftercloseError):
    """A target or the tracer shim failed to build."""


class TargetStartError(AftercloseError):
    """A target did not start or did not become ready."""


class ScenarioError(AftercloseError):
    """A scenario or a fault was given bad parameters."""


class TraceError(AftercloseError):
    """A trace file is missing, truncated or not a trace."""


class OptionError(AftercloseError):
    """A command-line or ini option has a value it does not accept."""


class HarnessResourceError(AftercloseError):
    """The harness itself ran out of something (file descriptors, memory, ports): not the
    target's fault."""


class CampaignError(AftercloseError):
    """A campaign's options, folder or shared store are unusable."""


class FaultNotApplied(AftercloseError):
    """A fault ran but could not do what it exists for (no connection stayed open to reset,
    no answer was large enough to interrupt): the run proves nothing either way.  Raised by
    ``TargetRun.run_fault`` after the fault finished; the plugin judges the run first (a
    violation still fails it) and then skips the test with this message and hint."""
