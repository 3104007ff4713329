"""Plans: what each connection of a run will do, drawn before any I/O.

A fault's ``plan()`` draws one :class:`Action` per connection from its seeded ``rng``; the plan
alone makes the report's ``schedule`` (:func:`schedule_of`), so the same parameters and seed
always give the same schedule however the run goes.  The engine (:mod:`.engine`) then performs
action ``i`` on a fresh :class:`~afterclose.harness.client.conn.Conn` numbered ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from afterclose.harness.client.conn import Conn


class Planned(Protocol):
    """One connection's share of a plan, as the schedule shows it."""

    def describe(self) -> str:
        """A compact, timing-free description for the schedule."""
        ...


class Action(Planned, Protocol):
    """What one connection does; drawn from the rng before the run, performed on a loop."""

    async def perform(self, conn: Conn) -> None: ...


def schedule_of(actions: Sequence[Planned]) -> list[str]:
    """The report's ``schedule``: one line per connection."""
    return [f"conn {i}: {a.describe()}" for i, a in enumerate(actions)]
