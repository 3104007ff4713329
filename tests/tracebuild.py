"""A tiny DSL to write synthetic traces readably.

Every call takes the next two sequence numbers (entry, exit), so calls written one after the
other happened one after the other.  To make calls overlap, start one with :meth:`begin` and
finish it with :meth:`end`::

    t = TraceBuilder()
    c = t.begin(t.close, tid=3, fd=7)   # close(7) enters
    t.accept(tid=1, ret=7)              # ... accept returns 7 while the close is in flight
    t.end(c)                            # close(7) returns

Times are 1 µs per sequence number.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afterclose.harness.oracle.judge import judge_records
from afterclose.harness.trace.findings import TraceVerdict
from afterclose.harness.trace.format import (
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLL_CTL_MOD,
    EPOLLET,
    EPOLLHUP,
    EPOLLIN,
    EPOLLONESHOT,
    EPOLLOUT,
    EPOLLRDHUP,
    DupKind,
    Header,
    HeaderFlag,
    IoKind,
    Op,
    Record,
)

IN, OUT, HUP, RDHUP, ONESHOT, ET = EPOLLIN, EPOLLOUT, EPOLLHUP, EPOLLRDHUP, EPOLLONESHOT, EPOLLET
EBADF, ENOENT, EAGAIN, ENOTSOCK, EEXIST = 9, 2, 11, 88, 17

__all__ = [
    "EAGAIN",
    "EBADF",
    "EEXIST",
    "ENOENT",
    "ENOTSOCK",
    "ET",
    "HUP",
    "IN",
    "ONESHOT",
    "OUT",
    "RDHUP",
    "Pending",
    "TraceBuilder",
    "conn",
    "counts",
    "elf_file",
    "seed_race",
    "server",
]

# A listening socket, an epoll instance, and some epoll data pointers the scenarios use.
LISTEN, EP = 3, 5
A, B, C, C2 = 0x55D0C2A0, 0x55D0C400, 0x7F00AA10, 0x7F00BB20


@dataclass(slots=True)
class Pending:
    """A call that has entered but not yet returned."""

    fields: dict[str, Any]
    seq_in: int
    events: list[tuple[int, int]] = field(default_factory=list)


class TraceBuilder:
    def __init__(
        self, pid: int = 100, *, free_tracking: bool = True, exe: str = "/synthetic"
    ) -> None:
        self.pid = pid
        self.exe = exe  # the program every traced process runs, as its header names it
        self.seq = 0
        self.records: list[Record] = []
        self.pids: dict[int, tuple[int, int]] = {pid: (0, 0)}  # pid -> (ppid, fork_seq)
        self.flags = HeaderFlag.FREE_TRACKING if free_tracking else HeaderFlag(0)
        self.exits: dict[int, int] = {}  # pid -> exit_seq (HeaderFlag.EXITED)
        self._begun: Pending | None = None

    # -- plumbing --------------------------------------------------------------------------

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _rec(self, fields: dict[str, Any], seq_in: int, seq_out: int) -> Record:
        f = dict(fields)
        f.setdefault("pid", self.pid)
        base: dict[str, Any] = {
            "flags": 0,
            "fd": 0,
            "arg": 0,
            "data": 0,
            "events": 0,
            "err": 0,
            "ret": 0,
        }
        base.update(f)
        if base["err"]:
            base["ret"] = -1
        return Record(seq_in=seq_in, seq_out=seq_out, t_ns=seq_in * 1000, **base)

    def _call(self, fields: dict[str, Any], events: Iterable[tuple[int, int]] = ()) -> Any:
        if self._begun is not None:
            p = Pending(fields, self._begun.seq_in, list(events))
            self._begun = None
            return p
        seq_in = self._next()
        return self._finish(Pending(fields, seq_in, list(events)))

    def _finish(self, p: Pending) -> Record:
        seq_out = self._next()
        rec = self._rec(p.fields, p.seq_in, seq_out)
        self.records.append(rec)
        if rec.op == Op.EPOLL_WAIT:
            for n, (ev, data) in enumerate(p.events):
                self.records.append(
                    self._rec(
                        {
                            "op": Op.EPOLL_EVENT,
                            "tid": rec.tid,
                            "pid": rec.pid,
                            "fd": rec.fd,
                            "arg": n,
                            "events": ev,
                            "data": data,
                        },
                        p.seq_in,
                        seq_out,
                    )
                )
        return rec

    def begin(self, method: Callable[..., Any], **kwargs: Any) -> Pending:
        """Enter a call now; it returns when :meth:`end` is called."""
        self._begun = Pending({}, self._next())
        p = method(**kwargs)
        assert isinstance(p, Pending)
        return p

    def end(self, p: Pending) -> Record:
        return self._finish(p)

    def skip(self, n: int = 1) -> None:
        """Let sequence numbers (time) pass."""
        self.seq += n

    # -- calls -----------------------------------------------------------------------------

    def socket(self, *, tid: int, ret: int, pid: int | None = None) -> Any:
        return self._call(self._f(Op.SOCKET, tid, pid, ret=ret))

    def accept(
        self, *, tid: int, ret: int, fd: int = 3, err: int = 0, pid: int | None = None
    ) -> Any:
        return self._call(self._f(Op.ACCEPT, tid, pid, fd=fd, ret=ret, err=err))

    def close(self, *, tid: int, fd: int, err: int = 0, pid: int | None = None) -> Any:
        return self._call(self._f(Op.CLOSE, tid, pid, fd=fd, err=err))

    def shutdown(
        self, *, tid: int, fd: int, how: int = 2, err: int = 0, pid: int | None = None
    ) -> Any:
        return self._call(self._f(Op.SHUTDOWN, tid, pid, fd=fd, arg=how, err=err))

    def dup(self, *, tid: int, fd: int, ret: int, pid: int | None = None) -> Any:
        return self._call(self._f(Op.DUP, tid, pid, fd=fd, arg=-1, ret=ret, flags=DupKind.DUP))

    def dup2(self, *, tid: int, fd: int, newfd: int, pid: int | None = None) -> Any:
        f = self._f(Op.DUP, tid, pid, fd=fd, arg=newfd, ret=newfd, flags=DupKind.DUP2)
        return self._call(f)

    def epoll_create(self, *, tid: int, ret: int, pid: int | None = None) -> Any:
        return self._call(self._f(Op.EPOLL_CREATE, tid, pid, ret=ret))

    def ctl(
        self,
        *,
        tid: int,
        epfd: int,
        fd: int,
        how: int,
        data: int = 0,
        events: int = IN,
        err: int = 0,
        pid: int | None = None,
    ) -> Any:
        f = self._f(Op.EPOLL_CTL, tid, pid, fd=fd, arg=epfd, flags=how, data=data, err=err)
        f["events"] = events if how != EPOLL_CTL_DEL else 0
        return self._call(f)

    def ctl_add(self, *, tid: int, epfd: int, fd: int, data: int, **kw: Any) -> Any:
        return self.ctl(tid=tid, epfd=epfd, fd=fd, how=EPOLL_CTL_ADD, data=data, **kw)

    def ctl_mod(self, *, tid: int, epfd: int, fd: int, data: int, **kw: Any) -> Any:
        return self.ctl(tid=tid, epfd=epfd, fd=fd, how=EPOLL_CTL_MOD, data=data, **kw)

    def ctl_del(self, *, tid: int, epfd: int, fd: int, **kw: Any) -> Any:
        return self.ctl(tid=tid, epfd=epfd, fd=fd, how=EPOLL_CTL_DEL, **kw)

    def wait(
        self,
        *,
        tid: int,
        epfd: int,
        events: Iterable[tuple[int, int]] = (),
        err: int = 0,
        pid: int | None = None,
    ) -> Any:
        evs = list(events)
        f = self._f(Op.EPOLL_WAIT, tid, pid, fd=epfd, arg=64, ret=len(evs), err=err)
        return self._call(f, evs)

    def read(
        self,
        *,
        tid: int,
        fd: int,
        ret: int = 100,
        err: int = 0,
        kind: IoKind = IoKind.READ,
        pid: int | None = None,
    ) -> Any:
        return self._call(self._f(Op.READ, tid, pid, fd=fd, ret=ret, err=err, flags=kind))

    def write(
        self,
        *,
        tid: int,
        fd: int,
        ret: int = 100,
        err: int = 0,
        kind: IoKind = IoKind.WRITE,
        pid: int | None = None,
    ) -> Any:
        return self._call(self._f(Op.WRITE, tid, pid, fd=fd, ret=ret, err=err, flags=kind))

    def fork(self, *, tid: int, child: int, pid: int | None = None) -> Any:
        rec = self._call(self._f(Op.FORK, tid, pid, ret=child))
        parent = pid if pid is not None else self.pid
        seq_in = rec.seq_in
        self.pids[child] = (parent, seq_in)
        return rec

    def free(self, *, tid: int, ptr: int, pid: int | None = None) -> Any:
        return self._call(self._f(Op.FREE, tid, pid, data=ptr))

    def fdnew(self, *, tid: int, ret: int, pid: int | None = None) -> Any:
        return self._call(self._f(Op.FDNEW, tid, pid, ret=ret))

    def close_range(
        self, *, tid: int, first: int, last: int = (1 << 64) - 1, pid: int | None = None
    ) -> Any:
        return self._call(self._f(Op.CLOSE_RANGE, tid, pid, fd=first, data=last))

    def _f(self, op: Op, tid: int, pid: int | None, **kw: Any) -> dict[str, Any]:
        f: dict[str, Any] = {"op": op, "tid": tid, **kw}
        if pid is not None:
            f["pid"] = pid
            self.pids.setdefault(pid, (0, 0))
        return f

    # -- results ---------------------------------------------------------------------------

    def exit(self, pid: int | None = None) -> int:
        """The process ends here (exit, _exit, its last thread): its header says so."""
        seq = self._next()
        self.exits[self.pid if pid is None else pid] = seq
        return seq

    def sorted_records(self) -> list[Record]:
        return sorted(self.records, key=lambda r: (r.seq_out, r.op == Op.EPOLL_EVENT, r.arg))

    def headers(self) -> Mapping[int, Header]:
        out: dict[int, Header] = {}
        for pid, (ppid, fork_seq) in self.pids.items():
            out[pid] = Header(
                version=1,
                record_size=64,
                chunk_records=1024,
                n_chunks=16,
                pid=pid,
                ppid=ppid,
                flags=self.flags | (HeaderFlag.EXITED if pid in self.exits else 0),
                next_chunk=1,
                lost_records=0,
                start_ns=0,
                fork_seq=fork_seq,
                free_table_slots=1024,
                free_table_used=0,
                exe=self.exe,
                exit_seq=self.exits.get(pid, 0),
            )
        return out

    def check(self, **kw: Any) -> TraceVerdict:
        return judge_records(self.sorted_records(), self.headers(), **kw)


# -- scenarios shared by the rule tests ----------------------------------------------------


def counts(v: TraceVerdict) -> dict[str, int]:
    return {rule: len(occ) for rule, occ in v.occurrences.items()}


def server(t: TraceBuilder, tid: int = 1) -> None:
    """A listening socket on 3 and an epoll instance on 5 watching it."""
    t.socket(tid=tid, ret=LISTEN)
    t.epoll_create(tid=tid, ret=EP)
    t.ctl_add(tid=tid, epfd=EP, fd=LISTEN, data=LISTEN)


def conn(t: TraceBuilder, fd: int, data: int, *, tid: int = 1, events: int = IN) -> None:
    t.accept(tid=tid, ret=fd)
    t.ctl_add(tid=tid, epfd=EP, fd=fd, data=data, events=events)


def seed_race() -> TraceBuilder:
    """epoll thread T1 hands client c (7#1) to worker T2; error thread T3 holds c too."""
    t = TraceBuilder()
    server(t, tid=11)
    t.accept(tid=11, ret=7)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN | RDHUP, C)])
    t.read(tid=12, fd=7, ret=0)  # T2: peer closed
    t.free(tid=12, ptr=C)
    t.close(tid=12, fd=7)
    t.wait(tid=11, epfd=EP, events=[(IN, LISTEN)])
    t.accept(tid=11, ret=7)  # 7#2: a stranger
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C2, events=IN | ONESHOT | ET)
    t.shutdown(tid=13, fd=7)  # T3, still acting for c
    t.ctl_mod(tid=13, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN, C)])
    return t


def elf_file(path: Path, sections: Iterable[str]) -> Path:
    """A minimal little-endian ELF64 file whose section table names ``sections`` (and the
    section-name table): enough for what reads section names, nothing runs it."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    n = len(list(sections)) + 2  # the null section, the named ones, .shstrtab
    shoff = 64 + len(names)
    head = b"\x7fELF\x02\x01\x01" + bytes(9)
    head += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, n, n - 1)
    table = bytes(64)
    at = 1
    for name in [*sections, ".shstrtab"]:
        offset, size = (64, len(names)) if name == ".shstrtab" else (0, 0)
        table += struct.pack(
            "<IIQQQQIIQQ", at, 3 if name == ".shstrtab" else 1, 0, 0, offset, size, 0, 0, 1, 0
        )
        at += len(name) + 1
    path.write_bytes(head + names + table)
    return path
