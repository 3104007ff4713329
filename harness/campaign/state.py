"""A campaign's folder: what a later invocation needs to continue where the last one stopped.

``state.json`` holds the campaign (target, seed, time spent, findings), rewritten whole after
every round (written to a temporary file, then renamed over the old one: an interrupted write
leaves the previous state).  ``rounds.jsonl`` holds one line per finished round, appended; the
round counter is its number of lines, so a round counts once it is recorded.  Findings (the
scenario files of violations) go to ``findings/``, run artifacts to ``runs/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from afterclose.harness.errors import CampaignError

STATE_FILE = "state.json"
ROUNDS_FILE = "rounds.jsonl"
FORMAT = 1


@dataclass
class RoundRecord:
    """One round: one scenario on one freshly started target."""

    number: int
    name: str  # a built-in suite test (test_x[param]) or a generated scenario's label
    kind: str  # "suite", "generated" or "shared" (replayed from the shared store)
    seed: int  # the round's test seed
    elapsed_s: float
    connections: int = 0
    rules: list[str] = field(default_factory=list)  # violated rules, first first
    message: str = ""  # the failure message when a rule was violated
    error: str = ""  # the harness could not run the round (not the target's fault)
    scenario: str = ""  # what ran: the scenario's description
    workdir: str = ""  # artifacts, kept when the round failed

    @property
    def ok(self) -> bool:
        return not self.rules and not self.error


@dataclass
class CampaignState:
    target: str
    seed: int
    duration_s: float = 0.0  # the campaign's length (--duration), over every invocation
    spent_s: float = 0.0  # time spent by every invocation so far
    invocations: int = 0
    findings: list[dict[str, object]] = field(default_factory=list)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    format: int = FORMAT


def load_state(folder: Path) -> CampaignState | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(CampaignState)}
        state = CampaignState(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError) as exc:
        raise CampaignError(
            f"unreadable campaign state: {exc}",
            where=path,
            hint="pass another --campaign-dir, or remove this folder to start afresh",
        ) from None
    if state.format != FORMAT:
        raise CampaignError(
            f"campaign state of format {state.format}, this version reads {FORMAT}",
            where=path,
            hint="pass another --campaign-dir",
        )
    return state


def save_state(folder: Path, state: CampaignState) -> None:
    path = folder / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_rounds(folder: Path) -> list[RoundRecord]:
    path = folder / ROUNDS_FILE
    if not path.exists():
        return []
    known = {f.name for f in dataclasses.fields(RoundRecord)}
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            break  # a line cut by a crash mid-write: the rounds before it stand
        records.append(RoundRecord(**{k: v for k, v in data.items() if k in known}))
    return records


def append_round(folder: Path, record: RoundRecord) -> None:
    with (folder / ROUNDS_FILE).open("a", encoding="utf-8") as out:
        out.write(json.dumps(dataclasses.asdict(record)) + "\n")
        out.flush()
        os.fsync(out.fileno())
