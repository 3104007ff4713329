"""Seeding from /proc: the fd table and epoll interest lists of a process that was already
running when tracing attached, and the synthetic records that rebuild them in the trace."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from afterclose.harness import procfs
from afterclose.harness.trace.ebpf.output import RawRecord
from afterclose.harness.trace.format import EPOLL_CTL_ADD, DupKind, Op

__all__ = ["ProcSnapshot", "Registration", "scan_process", "seed_records"]


@dataclass
class Registration:
    tfd: int
    events: int
    data: int
    ino: int


@dataclass
class ProcSnapshot:
    """A process's fd table and epoll interest lists as /proc showed them after attach."""

    pid: int
    ppid: int
    exe: str
    start_ns: int  # monotonic ns when the scan began
    end_ns: int  # ... and when it finished
    links: dict[int, str] = field(default_factory=dict)  # fd -> readlink of /proc/PID/fd/N
    inodes: dict[int, int] = field(default_factory=dict)  # fd -> inode number
    epoll: dict[int, list[Registration]] = field(default_factory=dict)  # epfd -> its items


def scan_process(pid: int) -> ProcSnapshot | None:
    """Read ``/proc/PID/fd`` and each epoll fd's ``fdinfo``; None if the process is gone."""
    start = time.monotonic_ns()
    ppid = procfs.parent_pid(pid)
    exe = procfs.exe(pid)
    links = procfs.fd_links(pid)
    if ppid is None or links is None:
        return None
    snap = ProcSnapshot(pid, ppid, exe, start, start)
    for fd, (link, ino) in links.items():
        snap.links[fd] = link
        snap.inodes[fd] = ino
        if link == "anon_inode:[eventpoll]":
            items = procfs.epoll_items(pid, fd)
            if items is None:
                continue
            snap.epoll[fd] = [Registration(*item) for item in items]
    snap.end_ns = time.monotonic_ns()
    return snap


_CREATES = {Op.SOCKET, Op.ACCEPT, Op.EPOLL_CREATE, Op.FDNEW, Op.DUP}


def _changed_numbers(
    recs: Iterable[RawRecord], before: int
) -> tuple[set[int], list[tuple[int, int]]]:
    """fd numbers whose binding a traced call of one process changed (or may have changed)
    before ``before``: created, closed or replaced.  Returns (numbers, close_range spans)."""
    nums: set[int] = set()
    spans: list[tuple[int, int]] = []
    for op, _pid, _tid, si, _so, fl, fd, arg, data, _ev, ret in recs:
        if si >= before:
            continue
        if op in _CREATES and ret >= 0:
            nums.add(ret)
            if op == Op.DUP and fl in (DupKind.DUP2, DupKind.DUP3):
                nums.add(arg)
        elif op == Op.CLOSE:
            nums.add(fd)
        elif op == Op.CLOSE_RANGE:
            spans.append((fd, data))
    return nums, spans


def seed_records(snap: ProcSnapshot, recs: Sequence[RawRecord]) -> list[tuple[int, ...]]:
    """Synthetic records (op, flags, fd, arg, data, events, ret) that rebuild ``snap`` as of
    attach time, leaving out every number a traced call touched before the scan ended."""
    changed, spans = _changed_numbers(recs, snap.end_ns)
    ctl_seen = {(r[7], r[6]) for r in recs if r[0] == Op.EPOLL_CTL and r[3] < snap.end_ns}

    def untouched(fd: int) -> bool:
        return fd not in changed and not any(a <= fd <= b for a, b in spans)

    out: list[tuple[int, ...]] = []
    seeded: set[int] = set()
    first_of_socket: dict[int, int] = {}
    for fd in sorted(snap.links):
        if not untouched(fd):
            continue
        link = snap.links[fd]
        if link.startswith("socket:["):
            ino = snap.inodes[fd]
            src = first_of_socket.get(ino)
            if src is not None:
                # Two numbers for one socket: a dup made before attach (same open file).
                out.append((Op.DUP, DupKind.DUP, src, -1, 0, 0, fd))
            else:
                first_of_socket[ino] = fd
                out.append((Op.SOCKET, 0, 0, 0, 0, 0, fd))
        elif link == "anon_inode:[eventpoll]":
            out.append((Op.EPOLL_CREATE, 0, 0, 0, 0, 0, fd))
        else:
            out.append((Op.FDNEW, 0, 0, 0, 0, 0, fd))
        seeded.add(fd)
    for epfd in sorted(snap.epoll):
        if epfd not in seeded:
            continue
        for reg in snap.epoll[epfd]:
            tfd = reg.tfd
            # Only registrations of a number that still names the registered file: another
            # (closed, kept alive by a dup) would pin its events on a stranger.
            if tfd not in seeded or snap.inodes.get(tfd) != reg.ino or (epfd, tfd) in ctl_seen:
                continue
            out.append((Op.EPOLL_CTL, EPOLL_CTL_ADD, tfd, epfd, reg.data, reg.events, 0))
    return out
