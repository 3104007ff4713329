"""The soak's live status line on stderr: redrawn in place every second on a terminal, one
line per round otherwise (so that a log file stays readable)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TextIO


class StatusLine:
    def __init__(
        self,
        stream: TextIO,
        render: Callable[[], str],
        tty: bool | None = None,
        every_s: float = 1.0,
    ) -> None:
        self.stream = stream
        self.render = render
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._lock = threading.Lock()
        self._open = 0  # characters of the line drawn in place
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _draw(self) -> None:
        text = self.render()
        self.stream.write("\r" + text.ljust(self._open))
        self.stream.flush()
        self._open = len(text)

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                self._draw()

    def start(self) -> None:
        if self.tty and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="soak-status", daemon=True)
            self._ticker.start()

    def update(self) -> None:
        """After a round: redraw in place, or print one line."""
        with self._lock:
            if self.tty:
                self._draw()
            else:
                self.stream.write(self.render() + "\n")
                self.stream.flush()

    def message(self, text: str) -> None:
        """A whole line above the status line."""
        with self._lock:
            if self.tty and self._open:
                self.stream.write("\r" + " " * self._open + "\r")
            self.stream.write(text + "\n")
            if self.tty and self._open:
                self._draw()
            self.stream.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self.tty and self._open:
                self.stream.write("\n")
                self.stream.flush()
                self._open = 0
