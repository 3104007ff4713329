"""What the campaign tests share about ``afterclose soak`` workers they start as processes."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

SOAK = [sys.executable, "-m", "afterclose.harness.cli", "soak"]


def interruptible() -> None:
    """``preexec_fn`` of a worker that a test interrupts with SIGINT.

    A job started in the background by a non-interactive shell ignores SIGINT, and a child
    keeps an ignored signal ignored: the worker must take SIGINT as a user's Ctrl-C would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finished_rounds(folder: Path) -> list[dict[str, object]]:
    """The campaign's finished rounds, as ``rounds.jsonl`` has them (none yet: empty)."""
    path = folder / "rounds.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines]
