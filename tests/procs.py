"""What the tests ask of the processes they started."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """Running: neither gone from /proc nor a zombie.  An orphan is reaped by whatever init the
    machine has, late or never, so a zombie counts as ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
