"""Race-detector style timelines: the life of one fd number (and one epoll data value) across
threads, around a finding, readable by someone who has never seen the tool."""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from afterclose.harness.trace.format import (
    DupKind,
    IoKind,
    Op,
    Record,
    WaitKind,
    epoll_events_str,
)
from afterclose.harness.trace.model import Incarnation, Registration

Resolved = Incarnation | Registration | tuple[Incarnation, ...] | None

MAX_LINES = 40
_SCAN_BACK = 100_000
_SCAN_FORWARD = 20_000
_AFTER_FOCUS = 8  # relevant lines kept after the marked one, when there are more than fit


@dataclass(slots=True)
class TimelineContext:
    """What the renderer needs from a finished rules pass."""

    records: Sequence[Record]
    res: list[Resolved]
    threads: Mapping[tuple[int, int], str]
    trace_path: str | None = None
    multi_process: bool = False
    dup_closed: dict[int, Incarnation] = field(default_factory=dict)
    incomplete: str | None = None


class Subject(Protocol):
    """What a timeline is about: one finding (:class:`~.findings.Finding`).  ``index`` is the
    record it is about, ``refs`` the records it points at."""

    @property
    def rule(self) -> str: ...
    @property
    def summary(self) -> str: ...
    @property
    def meaning(self) -> str: ...
    @property
    def why(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def fd(self) -> int | None: ...
    @property
    def data(self) -> int | None: ...
    @property
    def index(self) -> int: ...
    @property
    def refs(self) -> tuple[int, ...]: ...

    def shown_notes(self) -> dict[int, str]:
        """Record index -> the note shown beside it."""
        ...


def fmt_data(data: int) -> str:
    """Pointers in hex; small values (fd numbers, indices, tags) in decimal."""
    return hex(data) if data >= 4096 else str(data)


def errname(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def inc_label(inc: Incarnation, *, pid: bool = False) -> str:
    text = f"fd {inc.label}"
    if pid:
        text += f" (pid {inc.pid})"
    if inc.unknown:
        text += " (created outside the trace)"
    return text


def thread_label(ctx: TimelineContext, pid: int, tid: int) -> str:
    name = ctx.threads.get((pid, tid), "T?")
    if ctx.multi_process:
        return f"{name} (pid {pid} tid {tid})"
    return f"{name} (tid {tid})"


_IO_NAMES = {k.value: k.name.lower() for k in IoKind}
_DUP_NAMES: dict[int, str] = {
    DupKind.DUP.value: "dup",
    DupKind.DUP2.value: "dup2",
    DupKind.DUP3.value: "dup3",
    DupKind.FCNTL_DUPFD.value: "fcntl(F_DUPFD)",
    DupKind.FCNTL_DUPFD_CLOEXEC.value: "fcntl(F_DUPFD_CLOEXEC)",
}
_WAIT_NAMES = {k.value: k.name.lower() for k in WaitKind}
_CTL_NAMES = {1: "ADD", 2: "DEL", 3: "MOD"}
_SHUT_NAMES = {0: "SHUT_RD", 1: "SHUT_WR", 2: "SHUT_RDWR"}


def call_name(r: Record) -> str:
    op = r.op
    if op == Op.READ:
        return _IO_NAMES.get(r.flags, "read")
    if op == Op.WRITE:
        return _IO_NAMES.get(r.flags, "write")
    if op == Op.DUP:
        return _DUP_NAMES.get(r.flags, "dup")
    if op == Op.EPOLL_WAIT:
        return _WAIT_NAMES.get(r.flags, "epoll_wait")
    if op == Op.FDNEW:
        return "open/pipe/eventfd/..."
    return Op(op).name.lower()


def call_str(r: Record) -> str:
    """The call with its fd arguments, e.g. ``epoll_ctl(5, MOD, 7)``."""
    op = r.op
    name = call_name(r)
    if op in (Op.SOCKET, Op.EPOLL_CREATE, Op.FDNEW, Op.FORK):
        return f"{name}()"
    if op == Op.FREE:
        return f"free({fmt_data(r.data)})"
    if op == Op.SHUTDOWN:
        return f"{name}({r.fd}, {_SHUT_NAMES.get(r.arg, r.arg)})"
    if op == Op.EPOLL_CTL:
        return f"{name}({r.arg}, {_CTL_NAMES.get(r.flags, r.flags)}, {r.fd})"
    if op == Op.DUP and r.flags in (DupKind.DUP2, DupKind.DUP3):
        return f"{name}({r.fd}, {r.arg})"
    if op == Op.CLOSE_RANGE:
        last = "~0" if r.data >= (1 << 31) else str(r.data)
        return f"{name}({r.fd}, {last})"
    return f"{name}({r.fd})"


# What a timeline says after a record the harness injected (RecordFlag.INJECTED).
INJECTED_CALL = "[injected: the harness's own call, not the server's]"
INJECTED_RESULT = "[injected: a result the harness chose]"


def injected_str(r: Record) -> str:
    """The mark of an injected record: the shim's own shutdown() is the harness's call; a
    syscall fault's result is the harness's choice, the call itself the server's."""
    if not r.injected:
        return ""
    return " " + (INJECTED_CALL if r.op == Op.SHUTDOWN else INJECTED_RESULT)


def result_str(r: Record) -> str:
    if r.ret < 0:
        return f" = -1 {errname(r.err)}" + injected_str(r)
    if r.op in (Op.CLOSE, Op.SHUTDOWN, Op.EPOLL_CTL, Op.FREE, Op.CLOSE_RANGE):
        return injected_str(r)
    return f" = {r.ret}" + injected_str(r)


def _event_str(ev: Record, res: Resolved, multi: bool) -> str:
    text = f"{epoll_events_str(ev.events)} data={fmt_data(ev.data)}"
    if isinstance(res, Registration):
        text += f" -> {inc_label(res.incarnation, pid=multi and res.incarnation.pid != ev.pid)}"
    else:
        text += " -> (registration not in the trace)"
    return text


def render_record(
    ctx: TimelineContext, idx: int, fd: int | None = None, data: int | None = None
) -> str:
    """One record as a readable call; for an epoll_wait, with the events about fd/data."""
    recs = ctx.records
    r = recs[idx]
    res = ctx.res[idx] if idx < len(ctx.res) else None
    inc = res if isinstance(res, Incarnation) else None
    op = r.op
    head = call_str(r) + result_str(r)
    if op in (Op.SOCKET, Op.ACCEPT, Op.EPOLL_CREATE, Op.FDNEW, Op.DUP) and r.ret >= 0 and inc:
        what = {
            Op.SOCKET: "",
            Op.ACCEPT: " (new connection)",
            Op.EPOLL_CREATE: " (epoll instance)",
            Op.FDNEW: " (not a socket)",
        }.get(op, "")
        if op == Op.DUP and inc.parent is not None:
            what = f" (same open file as {inc_label(inc.parent)})"
        text = f"{head}  -> {inc_label(inc)}{what}"
        ended = ctx.dup_closed.get(idx)
        if ended is not None:
            text += f", silently closing {inc_label(ended)}"
        return text
    if op == Op.CLOSE:
        if inc is None:
            return head
        if r.ret >= 0 or r.err != 9:
            if inc.end_idx == idx:
                return f"{head} -> {inc_label(inc)} ends"
            return f"{head} (on {inc_label(inc)}, raced another release)"
        return f"{head} ({inc_label(inc)} was already closed)"
    if op == Op.EPOLL_CTL:
        target = inc_label(inc) if inc is not None else f"fd {r.fd}"
        what = _CTL_NAMES.get(r.flags, str(r.flags))
        text = f"epoll_ctl({r.arg}, {what}, {target}"
        if r.flags != 2:
            text += f", {epoll_events_str(r.events)}, data={fmt_data(r.data)}"
        text += ")" + result_str(r)
        if r.err == 9 and inc is not None and not inc.open:
            text += f" ({inc_label(inc)} was already closed)"
        return text
    if op == Op.EPOLL_WAIT:
        evs: list[str] = []
        others = 0
        j = idx + 1
        while j < len(recs) and recs[j].op == Op.EPOLL_EVENT and recs[j].seq_in == r.seq_in:
            ev = recs[j]
            er = ctx.res[j] if j < len(ctx.res) else None
            mine = (data is not None and ev.data == data) or (
                fd is not None
                and isinstance(er, Registration)
                and er.incarnation.fd == fd
                and er.incarnation.pid == r.pid
            )
            if mine or (fd is None and data is None):
                evs.append(_event_str(ev, er, ctx.multi_process))
            else:
                others += 1
            j += 1
        if others:
            evs.append(f"+{others} other event{'s' if others > 1 else ''}")
        if r.ret < 0:
            return head
        return f"{call_name(r)}({r.fd}) -> [{', '.join(evs)}]"
    if op == Op.EPOLL_EVENT:
        return f"event {_event_str(r, res, ctx.multi_process)}"
    if op in (Op.READ, Op.WRITE, Op.SHUTDOWN):
        if inc is not None and r.err == 9:
            return f"{head} ({inc_label(inc)} was already closed)"
        text = head + (f" on {inc_label(inc)}" if inc is not None else "")
        if op == Op.READ and r.ret == 0:
            text += " (peer closed)"
        return text
    if op == Op.FORK:
        return f"{head}  (child pid {r.ret} gets copies of every open fd)"
    if op == Op.CLOSE_RANGE and isinstance(res, tuple):
        hit = [i for i in res if fd is None or i.fd == fd]
        if hit:
            return f"{head} -> " + ", ".join(f"{inc_label(i)} ends" for i in hit)
        return f"{head} -> {len(res)} fds end"
    return head


def _relevant(ctx: TimelineContext, idx: int, pid: int, fd: int | None, data: int | None) -> bool:
    recs = ctx.records
    r = recs[idx]
    if r.pid != pid:
        return False
    op = r.op
    if op == Op.EPOLL_EVENT:
        return False  # shown on its epoll_wait's line
    if data is not None and op in (Op.EPOLL_CTL, Op.FREE) and r.data == data:
        return True
    if op == Op.FORK:
        return True
    if fd is not None:
        if op in (Op.SOCKET, Op.EPOLL_CREATE, Op.FDNEW):
            return r.ret == fd
        if op == Op.ACCEPT:
            return r.ret == fd or r.fd == fd
        if op == Op.DUP:
            return fd in (r.fd, r.ret) or (r.flags in (1, 2) and r.arg == fd)
        if op == Op.CLOSE_RANGE:
            return r.fd <= fd <= r.data
        if op in (Op.CLOSE, Op.SHUTDOWN, Op.READ, Op.WRITE, Op.EPOLL_CTL):
            return r.fd == fd
    if op == Op.EPOLL_WAIT:
        j = idx + 1
        while j < len(recs) and recs[j].op == Op.EPOLL_EVENT and recs[j].seq_in == r.seq_in:
            if data is not None and recs[j].data == data:
                return True
            er = ctx.res[j] if j < len(ctx.res) else None
            if fd is not None and isinstance(er, Registration):
                t = er.incarnation
                if t.fd == fd and t.pid == pid:
                    return True
            j += 1
    return False


def _scan(
    ctx: TimelineContext, lo: int, hi: int, pid: int, fd: int | None, data: int | None
) -> list[int]:
    """Indices in [lo, hi) of the records about fd/data (a cheap test first: this runs over
    up to _SCAN_BACK records per report)."""
    recs = ctx.records
    fdv = -(1 << 40) if fd is None else fd
    datav = -1 if data is None else data
    loose = (Op.EPOLL_WAIT, Op.FORK, Op.DUP, Op.CLOSE_RANGE)
    out = []
    for i in range(lo, hi):
        r = recs[i]
        if r.pid != pid:
            continue
        if (r.fd == fdv or r.ret == fdv or r.data == datav or r.op in loose) and _relevant(
            ctx, i, pid, fd, data
        ):
            out.append(i)
    return out


@dataclass(frozen=True, slots=True)
class Selection:
    """The records a timeline shows around a focus.  ``candidates`` are every related record
    found in the searched range ``[lo, hi)`` (plus the required ones), ``shown`` the ones kept
    (both sorted record indices; ``shown`` is a subset of ``candidates``)."""

    shown: list[int]
    candidates: list[int]
    lo: int
    hi: int


def select_records(
    ctx: TimelineContext, subject: Subject, notes: Mapping[int, str], max_lines: int = MAX_LINES
) -> Selection:
    """Pick the records about fd/data around ``focus``: the focus, ``refs`` and noted records
    always, then up to ``_AFTER_FOCUS`` later ones and as many earlier ones as fit."""
    pid, fd, data, focus = subject.pid, subject.fd, subject.data, subject.index
    refs = subject.refs
    n = len(ctx.records)
    lo = max(0, focus - _SCAN_BACK)
    hi = min(n, focus + _SCAN_FORWARD)
    must = {focus, *(i for i in refs if 0 <= i < n), *(i for i in notes if 0 <= i < n)}
    before = [i for i in _scan(ctx, lo, focus, pid, fd, data) if i not in must] + [
        i for i in must if lo <= i < focus
    ]
    before.sort()
    after = [i for i in _scan(ctx, focus + 1, hi, pid, fd, data) if i not in must] + [
        i for i in must if focus < i < hi
    ]
    after.sort()
    # Anything required but outside the scanned range still gets its line.
    extra = [i for i in must if i < lo or i >= hi]
    candidates = sorted({*before, focus, *after, *extra})
    if len(candidates) > max_lines:
        keep = set(must)
        room = max_lines - len(keep)
        tail = [i for i in after if i not in keep][: min(_AFTER_FOCUS, max(room, 0))]
        keep.update(tail)
        room = max_lines - len(keep)
        head = [i for i in reversed(before) if i not in keep][: max(room, 0)]
        keep.update(head)
        shown = sorted(keep)
    else:
        shown = candidates
    return Selection(shown, candidates, lo, hi)


def render_timeline(ctx: TimelineContext, subject: Subject, max_lines: int = MAX_LINES) -> str:
    """The text timeline of ``subject``: its rule's meaning, what happened, why it is a bug,
    then the records about its fd and data around it."""
    notes = subject.shown_notes()
    sel = select_records(ctx, subject, notes, max_lines)
    rule, summary, meaning, why = subject.rule, subject.summary, subject.meaning, subject.why
    pid, fd, data, focus = subject.pid, subject.fd, subject.data, subject.index
    shown, candidates, lo = sel.shown, sel.candidates, sel.lo

    lines: list[str] = []
    lines.append(f"{rule}: {meaning}")
    lines.append(f"  what happened: {summary}")
    if why:
        lines.append(f"  why it is a bug: {why}")
    if ctx.trace_path:
        lines.append(f"  trace: {ctx.trace_path}")
    if ctx.incomplete:
        lines.append(f"  WARNING: {ctx.incomplete}")
    about = []
    if fd is not None:
        about.append(f"fd {fd}")
    if data is not None:
        about.append(f"data {fmt_data(data)}")
    where = f" in pid {pid}" if ctx.multi_process else ""
    lines.append(
        f"  timeline of {' and '.join(about) or 'the finding'}{where} "
        "(seq = global counter at syscall entry-exit; µs = microseconds since the first line):"
    )
    t0 = ctx.records[shown[0]].t_ns if shown else 0
    recs = ctx.records
    width = max([6, *(len(thread_label(ctx, recs[i].pid, recs[i].tid)) for i in shown)])
    lines.append(f"       {'seq':>17} {'µs':>10}  {'thread':<{width}} call")
    prev_pos: int | None = None
    cand_pos = {i: p for p, i in enumerate(candidates)}
    leading = cand_pos[shown[0]] if shown else 0
    if lo > 0:
        lines.append(
            f"       ... {leading} earlier related records not shown; records before seq "
            f"{ctx.records[lo].seq_in} were not searched ..."
        )
    elif leading:
        lines.append(f"       ... {leading} earlier related records not shown ...")
    # Runs of the same call by the same thread (a read loop, say) fold into one line.
    repeat_key: tuple[str, str] | None = None
    repeats = 0

    def fold() -> None:
        nonlocal repeats
        if repeats:
            s = "s" if repeats > 1 else ""
            lines.append(f"       ... and {repeats} more identical call{s} ...")
            repeats = 0

    for i in shown:
        pos = cand_pos[i]
        if prev_pos is not None and pos - prev_pos > 1:
            fold()
            repeat_key = None
            lines.append(f"       ... {pos - prev_pos - 1} related records not shown ...")
        prev_pos = pos
        r = ctx.records[i]
        who = thread_label(ctx, r.pid, r.tid)
        text = render_record(ctx, i, fd, data)
        note = notes.get(i)
        if i != focus and not note:
            if repeat_key == (who, text):
                repeats += 1
                continue
            fold()
            repeat_key = (who, text)
        else:
            fold()
            repeat_key = None
        if note:
            text += f"  -- {note}"
        marker = ">>>" if i == focus else "   "
        seq = f"{r.seq_in}-{r.seq_out}"
        us = (r.t_ns - t0) / 1000.0
        lines.append(f"  {marker}  {seq:>17} {us:>10.1f}  {who:<{width}} {text}")
    fold()
    if prev_pos is not None and prev_pos < len(candidates) - 1:
        lines.append(f"       ... {len(candidates) - 1 - prev_pos} later related records ...")
    return "\n".join(lines)
