"""A private ``redis-server`` on loopback, for tests and benchmarks of shared exploration.

It listens on a leased port (harness/ports.py), keeps nothing on disk (``--save ''``,
``--appendonly no``) and is stopped by its PID (:func:`stop`, which the campaign tests use
for the servers and workers they start too).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from afterclose.harness.errors import CampaignError
from afterclose.harness.ports import lease_port

READY_S = 10.0


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def local_redis(host: str = "127.0.0.1") -> Iterator[str]:
    """A fresh, empty ``redis-server``; yields its ``redis://host:port/0`` address."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise CampaignError(
            "redis-server is not installed",
            hint="apt-get install redis-server (scripts/setup-system)",
        )
    with lease_port(host) as lease:
        argv = [
            binary,
            "--port",
            str(lease.port),
            "--bind",
            host,
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + READY_S
            while not _answers(host, lease.port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise CampaignError(
                        f"redis-server on {host}:{lease.port} did not start",
                        details=f"exit status {proc.poll()}",
                    )
                time.sleep(0.05)
            yield f"redis://{host}:{lease.port}/0"
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a server started here, by its PID: SIGTERM, and SIGKILL if it is not gone in 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
