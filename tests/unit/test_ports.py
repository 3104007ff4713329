"""Port leases: held by a lock file while in use, the folder shared by every user and bounded."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from afterclose.harness import ports


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "afterclose-ports"
    monkeypatch.setattr(ports, "LOCK_DIR", folder)
    return folder


def test_the_folder_is_sticky_and_writable_by_all_whatever_the_umask(lock_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        ports.lease_port().release()
    finally:
        os.umask(old)
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o1777


def test_a_released_lease_leaves_no_file_and_a_held_one_is_not_leased_twice(
    lock_dir: Path,
) -> None:
    leases = [ports.lease_port() for _ in range(20)]
    assert len({lease.port for lease in leases}) == 20
    assert sorted(p.name for p in lock_dir.iterdir()) == sorted(
        f"{lease.port}.lock" for lease in leases
    )
    for lease in leases:
        lease.release()
    assert list(lock_dir.iterdir()) == []


def test_a_lease_held_by_another_process_is_skipped(lock_dir: Path) -> None:
    held = ports.lease_port()
    try:
        # Another process sees every port but the one held: force its draw onto that port.
        code = (
            "import random, sys\n"
            "from pathlib import Path\n"
            "from afterclose.harness import ports\n"
            f"ports.LOCK_DIR = Path({str(lock_dir)!r})\n"
            f"random.Random.randint = lambda self, a, b: {held.port}\n"
            "try:\n"
            "    ports.lease_port(attempts=5)\n"
            "except OSError as exc:\n"
            "    print('refused:', exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert out.startswith("refused: no free port"), out
    finally:
        held.release()


def test_a_file_left_by_a_killed_run_is_reused_and_then_removed(lock_dir: Path) -> None:
    first = ports.lease_port()
    port = first.port
    first._lock.close()  # a killed process: its lock is gone, its file stays
    assert (lock_dir / f"{port}.lock").exists()
    lock = ports._try_lock(lock_dir / f"{port}.lock")
    assert lock is not None
    ports.PortLease(port, lock).release()
    assert not (lock_dir / f"{port}.lock").exists()
