"""Free TCP ports on loopback that stay ours while a target runs, even under ``pytest -n``.

Probing with ``bind(0)`` and releasing the port leaves a window in which another xdist worker
(or a client's ephemeral port) can take it.  So ports are drawn below the kernel's ephemeral
range, where ``connect()`` never picks them, and each is held by an ``flock`` on a file in a
shared folder for as long as the target uses it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from afterclose.harness import procfs

LOCK_DIR = Path(tempfile.gettempdir()) / "afterclose-ports"
DEFAULT_RANGE = (20000, 32000)


def ephemeral_range() -> tuple[int, int]:
    return procfs.ephemeral_port_range() or (32768, 60999)


def _candidate_range() -> tuple[int, int]:
    low, high = DEFAULT_RANGE
    eph_low, eph_high = ephemeral_range()
    if not (high < eph_low or low > eph_high):
        # The ephemeral range covers ours (a tuned host): use the space under it instead.
        low, high = 10000, max(10001, eph_low - 1)
    return low, high


@dataclass
class PortLease:
    port: int
    _lock: IO[str]

    def release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> PortLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def lease_port(host: str = "127.0.0.1", attempts: int = 200) -> PortLease:
    LOCK_DIR.mkdir(mode=0o1777, parents=True, exist_ok=True)
    low, high = _candidate_range()
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(attempts):
        port = rng.randint(low, high)
        lock = (LOCK_DIR / f"{port}.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        if _bindable(host, port):
            return PortLease(port, lock)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    raise OSError(f"no free port found on {host} in {low}-{high} after {attempts} attempts")
