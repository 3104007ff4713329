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


def with_argument(argument: str) -> list[int]:
    """PIDs of the running processes that have ``argument`` in their command line (one of
    its words, or inside one: ``--homedir=DIR``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(argument.encode() in w for w in words) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found
