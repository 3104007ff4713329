"""Live progress of storms and scenario phases on stderr."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from afterclose.harness.client.engine import StormProgress
    from afterclose.harness.scenario import PhaseEvent


class ProgressView:
    """Live progress on ``stream`` (stderr): a bar redrawn in place with ``\\r`` when it is a
    terminal, else one line a second, so that logs stay readable.  Storms in parallel phases
    report from their own threads, hence the lock."""

    BAR_WIDTH = 24

    def __init__(self, stream: TextIO, tty: bool | None = None, every_s: float = 1.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last_line = 0.0
        self._open = 0  # characters of an unfinished \r line on a terminal

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _line(self, text: str) -> None:
        """A whole line, after ending any bar drawn in place."""
        if self._open:
            self._write("\n")
            self._open = 0
        self._write(text + "\n")

    @staticmethod
    def render(p: StormProgress) -> str:
        by_time = p.elapsed_s / p.duration_s if p.duration_s else 0.0
        by_count = p.started / p.planned if p.planned else 1.0
        share = 1.0 if p.finished else min(max(by_time, by_count), 1.0)
        filled = int(share * ProgressView.BAR_WIDTH)
        bar = "#" * filled + "." * (ProgressView.BAR_WIDTH - filled)
        return (
            f"{p.fault} [{bar}] {share * 100:3.0f}% {p.connections}/{p.planned} conn, "
            f"{p.rate_per_s:.0f}/s (target {p.target_rate_per_s:g}/s), {p.errors} errors, "
            f"{p.processes} process(es) on {p.loop}, {p.elapsed_s:.1f}/{p.duration_s:g} s"
            + (" - done" if p.finished else "")
        )

    def storm(self, p: StormProgress) -> None:
        with self._lock:
            text = self.render(p)
            if self.tty:
                self._write("\r" + text.ljust(self._open))
                self._open = len(text)
                if p.finished:
                    self._write("\n")
                    self._open = 0
                return
            now = time.monotonic()
            if p.finished or now - self._last_line >= self.every_s:
                self._last_line = now
                self._write(text + "\n")

    def phase(self, event: PhaseEvent) -> None:
        with self._lock:
            phase = event.phase
            label = f"phase[{event.index}] {phase.name}"
            if event.report is None:
                rep = ""
                if phase.repeat > 1:
                    rep = f" (repetition {event.repetition + 1}/{phase.repeat})"
                self._line(f"{label}{rep}: {' + '.join(phase.faults)} ...")
            else:
                self._line(f"{label} done: {event.report.summary()}")

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        from afterclose.harness import scenario
        from afterclose.harness.client import engine as storm_engine

        with storm_engine.watch(self.storm), scenario.watch_phases(self.phase):
            yield
