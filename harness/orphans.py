"""Keeping the harness's children from outliving it when it dies without its teardown.

SIGKILL, or a SIGTERM that pytest does not handle, ends the harness without running a
``finally``; its targets, guests and tracers would run on, holding ports and CPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

PR_SET_PDEATHSIG = 1
SUBREAPER = Path(__file__).with_name("subreaper.py")


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


def spawn_tied(
    cmd: Sequence[str], stdout: IO[bytes], stderr: IO[bytes], **popen: Any
) -> subprocess.Popen[bytes]:
    """Start a helper (qemu, the eBPF loader) with no input, in a session of its own (a Ctrl-C
    of the harness must not stop it early), killed with the harness (:func:`die_with_parent`);
    ``popen``: more of Popen's keywords (``env``, ``cwd``)."""
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=die_with_parent,
        **popen,
    )


def supervised(argv: list[str], fd: int, env: Mapping[str, str]) -> list[str]:
    """The command line that runs ``argv`` under the subreaper supervisor
    (``harness/subreaper.py``), which reports on the socket ``fd`` and kills everything
    ``argv`` starts once the harness lets go of it or dies.

    ``env`` reaches the target alone: a preload library in the supervisor's own environment
    would trace the supervisor.
    """
    settings = [f"{key}={value}" for key, value in env.items()]
    return [
        sys.executable,
        "-I",
        "-S",
        str(SUBREAPER),
        str(fd),
        str(os.getpid()),
        *settings,
        "--",
        *argv,
    ]
