"""Free TCP ports on loopback that stay ours while a target runs, even under ``pytest -n``.

Probing with ``bind(0)`` and releasing the port leaves a window in which another xdist worker
(or a client's ephemeral port) can take it.  So ports are drawn below the kernel's ephemeral
range, where ``connect()`` never picks them, and each is held by an ``flock`` on a file in a
shared folder for as long as the target uses it.

The folder holds only the ports leased now (plus those of runs that were killed, until their
port is leased again): a lease removes its file while still holding the lock. Removing a
locked file races with a process that opened it just before: that process may lock the old,
unlinked file. So a lease counts only once the locked file is still the one at its path.
The folder is sticky and writable by all (1777), like /tmp, so that users share the range.
"""

from __future__ import annotations

import contextlib
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
            # Unlinked while still locked: see the module's docstring.
            with contextlib.suppress(OSError):
                (LOCK_DIR / f"{self.port}.lock").unlink()
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


def _lock_dir() -> Path:
    try:
        LOCK_DIR.mkdir(parents=True)
    except FileExistsError:
        return LOCK_DIR
    # mkdir's mode is cut by the umask (1755 under 022): set the sticky, world-writable mode.
    LOCK_DIR.chmod(0o1777)
    return LOCK_DIR


def _try_lock(path: Path) -> IO[str] | None:
    """The locked file at ``path``, or None if another lease holds it (or cannot be shared)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return None  # a file another user left behind: their port, as far as we can tell
    lock = os.fdopen(fd, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return lock
    except (BlockingIOError, FileNotFoundError):
        pass  # held, or removed by its releasing lease after we opened it
    lock.close()
    return None


def lease_port(host: str = "127.0.0.1", attempts: int = 200) -> PortLease:
    folder = _lock_dir()
    low, high = _candidate_range()
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(attempts):
        port = rng.randint(low, high)
        lock = _try_lock(folder / f"{port}.lock")
        if lock is None:
            continue
        lease = PortLease(port, lock)
        if _bindable(host, port):
            return lease
        lease.release()
    raise OSError(f"no free port found on {host} in {low}-{high} after {attempts} attempts")
