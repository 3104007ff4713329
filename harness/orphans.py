"""Keeping the harness's children from outliving it when it dies without its teardown.

SIGKILL, or a SIGTERM that pytest does not handle, ends the harness without running a
``finally``; its targets, guests and tracers would run on, holding ports and CPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a freshly forked child (``preexec_fn``): have the kernel SIGKILL it when the parent
    dies.

    PDEATHSIG fires when the *thread* that forked the child exits, not the process: children
    that must outlive a helper thread are started from the main thread.  A parent that died
    before the prctl took effect is not noticed; callers that care compare ``os.getppid()``
    before and after.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
