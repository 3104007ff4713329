"""Readiness strategies (a log line, an open port, an HTTP answer, an answer in the target's
protocol) sharing one polling loop."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from afterclose.harness.manifest import ReadySpec
from afterclose.harness.protocols.base import Protocol

POLL_INTERVAL_S = 0.02


@dataclass(frozen=True)
class Probe:
    """One readiness check: ``check()`` is True once ready; ``missing`` says what was not
    seen, ``last`` (if given) what was seen instead on the last try."""

    missing: str
    check: Callable[[], bool]
    last: Callable[[], str | None] = lambda: None


def log_line_probe(text: str, logs: tuple[Path, ...]) -> Probe:
    def check() -> bool:
        for log in logs:
            try:
                if text.encode() in log.read_bytes():
                    return True
            except FileNotFoundError:
                continue
        return False

    return Probe(f"the line {text!r} did not appear in the target's output", check)


def port_probe(host: str, port: int) -> Probe:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return Probe(f"nothing listened on {host}:{port}", check)


def http_probe(host: str, port: int, path: str, tls: bool = False) -> Probe:
    seen: list[str] = []

    def check() -> bool:
        from afterclose.harness.protocols import http

        try:
            response = http.get(host, port, path, timeout_s=1.0, tls=tls)
        except OSError as exc:
            seen[:] = [f"the last try got {exc.strerror or exc}"]
            return False
        except http.ClientError as exc:
            seen[:] = [f"the last answer was not HTTP ({exc})"]
            return False
        seen[:] = [f"the last answer was HTTP {response.status}"]
        return response.status < 500

    return Probe(
        f"GET {path} on {host}:{port} got no answer below 500",
        check,
        lambda: seen[0] if seen else None,
    )


def protocol_probe(host: str, port: int, protocol: Protocol, tls: bool) -> Probe:
    def check() -> bool:
        return not protocol.liveness_problem(host, port, 1.0, tls=tls)

    over = " over TLS" if tls else ""
    return Probe(f"{host}:{port} gave no answer in protocol {protocol.name!r}{over}", check)


def probe_for(
    spec: ReadySpec,
    host: str,
    port: int,
    logs: tuple[Path, ...],
    protocol: Protocol | None = None,
    tls: bool = False,
) -> Probe:
    if spec.log is not None:
        return log_line_probe(spec.log, logs)
    if spec.http is not None:
        return http_probe(host, port, spec.http, tls)
    if spec.protocol and protocol is not None:
        return protocol_probe(host, port, protocol, tls)
    return port_probe(host, port)


class NotReady(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def wait_until(probe: Probe, timeout_s: float, still_running: Callable[[], str | None]) -> float:
    """Poll ``probe`` until it passes; returns seconds waited.

    ``still_running`` returns None while the target lives, else why it stopped, so a target
    that dies during start-up is reported at once instead of after the timeout.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        if probe.check():
            return time.monotonic() - start
        gone = still_running()
        if gone is not None:
            raise NotReady(f"the target stopped before it was ready: {gone}")
        if time.monotonic() >= deadline:
            last = probe.last()
            raise NotReady(
                f"{probe.missing} within {timeout_s:g} s" + (f" ({last})" if last else "")
            )
        time.sleep(POLL_INTERVAL_S)
