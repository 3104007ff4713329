"""Black-box rules: what can be judged from outside the target, with no tracer."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable

from afterclose.harness import procfs
from afterclose.harness.oracle import verdict
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.runners.base import RunningTarget

SANITIZER_REPORT = re.compile(
    r"^.*(ERROR: AddressSanitizer|ERROR: LeakSanitizer|WARNING: ThreadSanitizer"
    r"|runtime error:|ERROR: MemorySanitizer).*$",
    re.MULTILINE,
)
QUOTE_LINES = 25


def sanitizer_report(stderr: str) -> str | None:
    match = SANITIZER_REPORT.search(stderr)
    if match is None:
        return None
    lines = stderr[match.start() :].splitlines()
    quoted = lines[:QUOTE_LINES]
    if len(lines) > QUOTE_LINES:
        quoted.append(f"... ({len(lines) - QUOTE_LINES} more lines in the target's stderr)")
    return "\n".join(quoted)


def check_crash(target: RunningTarget) -> Violation | None:
    report = sanitizer_report(target.stderr_text())
    status = target.exit_status()
    died = status is not None and not status.stopped_by_harness
    if report is None and not died:
        return None
    what = status.describe() if died and status else "a sanitizer reported an error"
    details = report if report is not None else target.log_tail()
    return Violation(
        verdict.CRASH,
        f"target {target.name!r} {what} during the scenario",
        details=details,
        artifacts=(str(target.plan.stderr_path),),
    )


def check_liveness(target: RunningTarget, timeout_s: float = 5.0) -> Violation | None:
    from afterclose.harness.protocols import http

    if target.exit_status() is not None:
        return None  # the crash rule already speaks for a dead target
    manifest = target.plan.manifest
    path = manifest.liveness_path
    if manifest.echo_path:
        path = f"{path.rstrip('/')}/afterclose-liveness-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    problem = "no attempt"
    while time.monotonic() < deadline:
        try:
            response = http.get(target.host, target.port, path, timeout_s=2.0)
        except (OSError, http.ClientError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
            continue
        if response.status != manifest.liveness_status:
            problem = f"status {response.status}, expected {manifest.liveness_status}"
        elif manifest.echo_path and path.encode() not in response.body:
            problem = f"the body {response.body[:80]!r} does not contain the path {path!r}"
        else:
            return None
        break
    return Violation(
        verdict.LIVENESS,
        f"after the scenario, GET {path} on {target.host}:{target.port} failed: {problem}",
    )


def check_cross_talk(anomalies: Iterable[tuple[str, str]]) -> Violation | None:
    """``anomalies`` are (rule, detail) pairs the fault clients recorded."""
    found = [detail for rule, detail in anomalies if rule == verdict.CROSS_TALK]
    if not found:
        return None
    shown = found[:10]
    more = f"\n... and {len(found) - len(shown)} more" if len(found) > len(shown) else ""
    return Violation(
        verdict.CROSS_TALK,
        found[0],
        details="\n".join(shown) + more,
        count=len(found),
    )


def check_fd_leak(
    target: RunningTarget, baseline: procfs.SocketCensus, grace_s: float
) -> tuple[Violation | None, str | None]:
    """After every client is gone the target's sockets must return to the baseline.

    A server that never closes a connection whose peer sent FIN leaves it in CLOSE_WAIT
    forever: the kernel cannot finish the close without the owner's ``close()``.  Returns the
    violation, if any, and a warning for connections stranded by the network (counted apart:
    the server's kernel was never told of their close).
    """
    if target.exit_status() is not None:
        return None, None
    deadline = time.monotonic() + grace_s
    while True:
        # Counting fds is cheap; the TCP table, read only to describe a leak, can take a second
        # on a host with many TIME_WAIT sockets.  The verdict rests on a count taken after the
        # grace period began to expire, never on one started before it.
        started = time.monotonic()
        fds = procfs.socket_fd_count(target.host_pids())
        if fds <= baseline.socket_fds:
            return None, None
        if started >= deadline:
            break
        time.sleep(0.05)
    now = procfs.census(target.host_pids(), target.port)
    leaked = now.socket_fds - baseline.socket_fds
    stranded = min(now.stranded, max(leaked, 0))
    warning = None
    if stranded:
        warning = (
            f"{stranded} connection(s) still ESTABLISHED on the target's side {grace_s:g} s "
            "after every client left, whose client end is gone: the client's FIN or RST never "
            "reached the server (lost or reordered packets), so they are not counted as leaks"
        )
    if leaked - stranded <= 0:
        return None, warning
    counted = max(leaked - stranded, now.close_wait)
    return Violation(
        verdict.FD_LEAK,
        f"{counted} socket(s) still open {grace_s:g} s after every client left "
        f"({now.close_wait} in CLOSE_WAIT)",
        details=f"baseline: {baseline.describe()}\nnow:      {now.describe()}",
        count=max(counted, 1),
    ), warning
