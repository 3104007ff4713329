"""Go's netpoller: threads that own no connection.

Several rules prove that a thread acted for an older incarnation from which thread made the
calls: ``wrong-incarnation`` (an act after an event of the thread's batch, a second close, the
calls before a stale re-arm), ``stale-batch-event``, ``foreign-close``,
``concurrent-oneshot``.  They assume a connection is handled by the thread it was handed to
(created by, an event delivered to, a queue hand-off) until that thread lets it go.

Go's runtime breaks that by design.  Any thread (an M) may run the netpoller, which only marks
the goroutines parked on the returned poll descriptors runnable; the scheduler runs them on
whichever thread is free, and a goroutine moves to another thread after any blocking syscall or
preemption.  One goroutine may read a connection on T8, DEL it on T8 and close it on T1; the
thread that polled runs any goroutine, for any connection, for as long as it has work (tens of
milliseconds between its waits under load).  The epoll data is the runtime's ``pollDesc``,
recycled from a free list for the next fd.

So in a Go program that waits on one instance from more than one thread -- the runtime's
netpoller -- those facts are dropped; what does not depend on the thread stands (EBADF,
ENOTSOCK, stale data, events for closed or freed connections, leaks).  A Go program that runs
its own loop on a locked OS thread (``runtime.LockOSThread`` and ``syscall.EpollWait``, like
``targets/go-fixed``) waits from one thread and is judged as any other program.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from functools import lru_cache

from afterclose.harness.trace.facts import (
    ActAfterEvent,
    CloseAgainAfterReuse,
    ConcurrentOneshot,
    Fact,
    ForeignClose,
    StaleBatchEvent,
    StaleData,
)
from afterclose.harness.trace.format import Header

_GO_SECTIONS = (b".go.buildinfo", b".note.go.buildid")


@lru_cache(maxsize=64)
def is_go_program(exe: str) -> bool:
    """Whether ``exe`` is a Go program: an ELF64 file with a section the Go linker writes.
    The section table is read, not the data: a cgo build (Debian's caddy) puts its build
    info tens of MiB into the file."""
    try:
        with open(exe, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
                return False
            end = "<" if head[5] == 1 else ">"
            shoff = struct.unpack_from(end + "Q", head, 40)[0]
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", head, 58)
            if not shoff or shentsize < 64 or shstrndx >= shnum:
                return False
            f.seek(shoff + shstrndx * shentsize)
            names_at, names_size = struct.unpack_from(end + "QQ", f.read(64), 24)
            f.seek(names_at)
            names = f.read(min(names_size, 1 << 20)).split(b"\0")
    except (OSError, struct.error):
        return False
    return any(n in names for n in _GO_SECTIONS)


def go_pids(headers: Mapping[int, Header]) -> frozenset[int]:
    """The traced processes whose program (as the trace header names it) is a Go binary."""
    return frozenset(pid for pid, h in headers.items() if h.exe and is_go_program(h.exe))


def without_thread_ownership(
    facts: list[Fact], waiters: Mapping[tuple[int, int], set[int]]
) -> list[Fact]:
    """``facts`` without those proved from which thread made a call, in the Go processes that
    run the runtime's netpoller: an instance that more than one thread waited on (``waiters``:
    (pid, instance's open file id) -> the threads of a Go process that waited on it)."""
    pids = {pid for (pid, _), tids in waiters.items() if len(tids) > 1}
    if not pids:
        return facts
    out: list[Fact] = []
    for f in facts:
        if isinstance(f, ActAfterEvent | StaleBatchEvent | CloseAgainAfterReuse):
            if f.now.pid in pids:
                continue
        elif isinstance(f, ForeignClose | ConcurrentOneshot):
            if f.inc.pid in pids:
                continue
        elif isinstance(f, StaleData) and f.now.pid in pids:
            f.acted = ()  # the calls a goroutine made before the ADD, on whatever thread
        out.append(f)
    return out
