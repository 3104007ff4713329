"""SIGINT as a note: for long searches (``afterclose soak``, ``afterclose explore``) that must
stop cleanly, at a point of their choosing, whatever Python is running when Ctrl-C comes."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupts:
    """SIGINT noted, then raised as KeyboardInterrupt, except inside :meth:`held` (while a
    campaign's files are written, or Hypothesis' engine runs): there it lands after it.

    A handler that takes note, not a blocked signal: the kernel delivers a process-wide
    signal to any thread that does not block it, and Python runs the handler in the main
    thread whichever thread received it.  The note is what counts: Python runs a handler
    between bytecodes, and a KeyboardInterrupt raised while a gc callback runs (Hypothesis
    installs one) is printed as "Exception ignored" and lost.  The round goes on, and the note
    stops the search at its next check (:meth:`check`).  Around a Hypothesis run the search
    holds it, and opens it in each example's body (:meth:`open`)."""

    def __init__(self) -> None:
        self.noted = False
        self._holding = 0

    def _handle(self, signum: int, frame: object) -> None:
        self.noted = True
        if not self._holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handler for the block, the previous one back after it.  Outside the main thread
        it is not installed: Python runs signal handlers only there, so no KeyboardInterrupt can
        land in this thread's frames anyway."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)

    @contextlib.contextmanager
    def held(self, *, then_raise: bool = True) -> Iterator[None]:
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if then_raise:
            self.check()

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """Inside :meth:`held`, a stretch where SIGINT raises at once again (a round's body,
        while Hypothesis' engine around it is held): Hypothesis handles a KeyboardInterrupt
        from the test function, but one raised in its own set-up (it digests the test's
        source before its runner exists) surfaces as its ``assert state._runner``."""
        saved, self._holding = self._holding, 0
        try:
            self.check()
            yield
        finally:
            self._holding = saved

    def check(self) -> None:
        if self.noted:
            raise KeyboardInterrupt
