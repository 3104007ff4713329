"""liveness: after the run, a fresh request gets a correct answer, and state the manifest says
survives a restart did survive it."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from afterclose.harness.oracle.evidence import STATE_LOST_ON_RESTART
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.runners.base import Server

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "liveness"


def check_liveness(
    target: Server, timeout_s: float = 5.0, *, perturbed: bool = False
) -> Violation | None:
    """A fresh request gets a correct answer within ``timeout_s``: connection errors are
    tried again, and wrong answers too when ``perturbed`` (the harness still injects results
    into the server's calls, e.g. a proxy whose fetch from its backend hit an injected reset
    rightly answers 503: a later request must be answered)."""
    from afterclose.harness.protocols import http

    if target.exit_status() is not None:
        return None  # the crash rule already speaks for a dead target
    manifest = target.plan.manifest
    if manifest.protocol != "http":
        return _check_protocol(target, timeout_s)
    path = manifest.liveness_path
    if manifest.echo_path:
        path = f"{path.rstrip('/')}/afterclose-liveness-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    problem = "no attempt"
    while time.monotonic() < deadline:
        try:
            response = http.get(
                target.host,
                target.port,
                path,
                timeout_s=2.0,
                tls=manifest.tls,
                headers=tuple(manifest.request_headers.items()),
            )
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
        if not perturbed:
            break
        time.sleep(0.1)
    return Violation(
        NAME,
        f"after the scenario, GET {path} on {target.host}:{target.port} failed: {problem}",
    )


def _check_protocol(target: Server, timeout_s: float) -> Violation | None:
    """A fresh tagged request in the manifest's protocol is answered (raw: a connection is
    accepted and kept)."""
    manifest = target.plan.manifest
    protocol = manifest.speaks
    deadline = time.monotonic() + timeout_s
    problem = "no attempt"
    while time.monotonic() < deadline:
        problem = protocol.liveness_problem(target.host, target.port, 2.0, tls=manifest.tls)
        if not problem:
            return None
        time.sleep(0.1)
    return Violation(
        NAME,
        f"after the scenario, a fresh {protocol.name} request on {target.host}:{target.port} "
        f"failed: {problem}",
    )


def probe(ev: Evidence) -> Violation | None:
    return check_liveness(ev.server, perturbed=ev.perturbed)


def decide(ev: Evidence) -> list[Violation]:
    out: list[Violation] = []
    fresh = ev.probes.get(NAME)
    if isinstance(fresh, Violation):
        out.append(fresh)
    lost = ev.observations(STATE_LOST_ON_RESTART)
    if lost:
        out.append(Violation.of_many(NAME, [o.detail for o in lost]))
    return out


RULE = Rule(
    NAME,
    "after the scenario, a fresh request did not get a correct answer, or a restart lost "
    "state the manifest says it keeps (`restart_keeps`)",
    decide=decide,
    probe=probe,
)
