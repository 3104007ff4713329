"""The layout of an SVG timeline (:mod:`.svg` draws it): which marks, bars and events a
finding gets, and where they go on the sequence-number axis."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import IoKind, Op, Record, epoll_events_str
from afterclose.harness.trace.model import Incarnation, Registration
from afterclose.harness.trace.timeline import (
    TimelineContext,
    fmt_data,
    inc_label,
    render_record,
    select_records,
)

# Layout (px) along the x axis.
SLOT = 22  # distance between two consecutive sequence numbers on the x axis
PAD = SLOT / 2 - 2  # a call's mark reaches this far beyond its seq_in and seq_out
GAP = 30  # extra room where related records were left out


def text_w(text: str, size: float, *, mono: bool = False) -> float:
    """A generous estimate of a text's width (no font metrics in here)."""
    return len(text) * size * (0.61 if mono else 0.6)


# Every kind (IoKind, DupKind, ctl op) fits in the low byte of ``flags``; the high bits are
# markers (such as a syscall fault the shim injected) that do not change the call's name.
_KIND_BITS = 0xFF
_RECV = {IoKind.RECV.value, IoKind.RECVFROM.value, IoKind.RECVMSG.value}
_SEND = {IoKind.SEND.value, IoKind.SENDTO.value, IoKind.SENDMSG.value}


def short(r: Record) -> str:
    """A call's name in at most six characters, for its mark."""
    op = r.op
    kind = r.flags & _KIND_BITS
    if op == Op.EPOLL_CTL:
        return {1: "ADD", 2: "DEL", 3: "MOD"}.get(kind, "ctl")
    if op == Op.READ:
        return "recv" if kind in _RECV else "read"
    if op == Op.WRITE:
        if kind == IoKind.SENDFILE.value:
            return "sendf"
        return "send" if kind in _SEND else "write"
    if op == Op.DUP:
        return "dup2" if kind in (1, 2) else "dup"
    return {
        Op.SOCKET: "socket",
        Op.ACCEPT: "accept",
        Op.CLOSE: "close",
        Op.SHUTDOWN: "shut",
        Op.EPOLL_CREATE: "epoll",
        Op.EPOLL_WAIT: "wait",
        Op.FORK: "fork",
        Op.FREE: "free",
        Op.FDNEW: "open",
        Op.CLOSE_RANGE: "crange",
    }.get(op, op.name.lower()[:6])


# -- what is drawn ---------------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    record: Record
    text: str
    inc: Incarnation | None


@dataclass(slots=True)
class Item:
    """One mark: a record, or a run of identical calls by one thread folded into one."""

    num: int
    first: int
    last: int
    key: tuple[int, int]
    seq_in: int
    seq_out: int
    text: str
    note: str | None
    focus: bool
    inc: Incarnation | None
    hidden_before: int = 0
    count: int = 1
    name: str = ""  # what the mark says
    events: list[Event] = field(default_factory=list)


def focus_inc(ctx: TimelineContext, idx: int, pid: int, fd: int | None) -> Incarnation | None:
    """The incarnation of the focus fd number that record ``idx`` acted on, if any."""
    if fd is None:
        return None
    res = ctx.res[idx] if idx < len(ctx.res) else None
    cand: Incarnation | None = None
    if isinstance(res, Incarnation):
        cand = res
    elif isinstance(res, Registration):
        cand = res.incarnation
    elif isinstance(res, tuple):
        cand = next((i for i in res if i.fd == fd), None)
    if cand is not None and cand.fd == fd and cand.pid == pid:
        return cand
    ended = ctx.dup_closed.get(idx)
    if ended is not None and ended.fd == fd and ended.pid == pid:
        return ended
    return None


def events(
    ctx: TimelineContext, idx: int, pid: int, fd: int | None, data: int | None
) -> list[Event]:
    """The events of the epoll_wait at ``idx`` that are about fd/data."""
    recs = ctx.records
    r = recs[idx]
    out: list[Event] = []
    j = idx + 1
    while j < len(recs) and recs[j].op == Op.EPOLL_EVENT and recs[j].seq_in == r.seq_in:
        ev = recs[j]
        res = ctx.res[j] if j < len(ctx.res) else None
        target = res.incarnation if isinstance(res, Registration) else None
        mine = (data is not None and ev.data == data) or (
            fd is not None and target is not None and target.fd == fd and target.pid == pid
        )
        if mine:
            text = f"event {epoll_events_str(ev.events)} data={fmt_data(ev.data)}"
            text += f" -> {inc_label(target)}" if target is not None else " (registration unknown)"
            inc = target if target is not None and target.fd == fd and target.pid == pid else None
            out.append(Event(ev, text, inc))
        j += 1
        if len(out) >= 8:
            break
    return out


def build_items(
    ctx: TimelineContext, finding: Finding, notes: dict[int, str], max_lines: int
) -> tuple[list[Item], int, int]:
    """The marks, plus how many related records were left out before the first and after the
    last one."""
    sel = select_records(ctx, finding, notes, max_lines)
    recs = ctx.records
    pos = {i: p for p, i in enumerate(sel.candidates)}
    items: list[Item] = []
    prev_pos: int | None = None
    for i in sel.shown:
        r = recs[i]
        p = pos[i]
        hidden = p - prev_pos - 1 if prev_pos is not None else 0
        prev_pos = p
        text = render_record(ctx, i, finding.fd, finding.data)
        note = notes.get(i)
        key = (r.pid, r.tid)
        focus = i == finding.index
        last = items[-1] if items else None
        if (
            last is not None
            and not hidden
            and not focus
            and not note
            and not last.focus
            and not last.note
            and last.key == key
            and last.text == text
        ):
            last.count += 1
            last.last = i
            last.seq_out = r.seq_out
            last.name = f"{short(r)} \u00d7{last.count}"
            continue
        item = Item(
            num=len(items) + 1,
            first=i,
            last=i,
            key=key,
            seq_in=r.seq_in,
            seq_out=r.seq_out,
            text=text,
            note=note,
            focus=focus,
            inc=focus_inc(ctx, i, finding.pid, finding.fd),
            hidden_before=hidden,
            name=short(r),
        )
        if r.op == Op.EPOLL_WAIT:
            item.events = events(ctx, i, finding.pid, finding.fd, finding.data)
        items.append(item)
    leading = pos[sel.shown[0]] if sel.shown else 0
    trailing = len(sel.candidates) - 1 - prev_pos if prev_pos is not None else 0
    return items, leading, trailing


# -- geometry --------------------------------------------------------------------------------


class Axis:
    """Sequence numbers to x: one slot per distinct number shown, extra room at gaps."""

    def __init__(self, items: Sequence[Item], x0: float) -> None:
        self.values = sorted({v for it in items for v in (it.seq_in, it.seq_out)})
        extra: dict[int, float] = {}
        self.gaps: list[tuple[int, int]] = []  # (anchor value, hidden count)
        for prev, nxt in pairwise(items):
            if nxt.hidden_before:
                anchor = nxt.seq_in if nxt.seq_in > prev.seq_out else nxt.seq_out
                extra[anchor] = GAP
                self.gaps.append((anchor, nxt.hidden_before))
        self.xs: dict[int, float] = {}
        self._place(x0, extra)
        # Widen the marks whose name does not fit: room goes in just before their seq_out, so
        # nothing else gets narrower.
        grown = False
        for it in items:
            need = text_w(it.name, 10) + 8 - 2 * PAD
            span = self.xs[it.seq_out] - self.xs[it.seq_in]
            if span < need:
                extra[it.seq_out] = extra.get(it.seq_out, 0.0) + need - span
                grown = True
        if grown:
            self._place(x0, extra)
        self.left = x0 - SLOT
        self.right = (self.xs[self.values[-1]] if self.values else x0) + SLOT

    def _place(self, x0: float, extra: dict[int, float]) -> None:
        x = x0
        for k, v in enumerate(self.values):
            if k:
                x += SLOT
            x += extra.get(v, 0.0)
            self.xs[v] = x

    def at(self, seq: int) -> float:
        vals = self.values
        k = bisect_left(vals, seq)
        if k < len(vals) and vals[k] == seq:
            return self.xs[seq]
        if k == 0:
            return self.left
        if k == len(vals):
            return self.right
        return (self.xs[vals[k - 1]] + self.xs[vals[k]]) / 2

    def gap_x(self, anchor: int) -> float:
        k = bisect_left(self.values, anchor)
        if k == 0:
            return self.left
        return self.xs[self.values[k - 1]] + (SLOT + GAP) / 2


@dataclass(slots=True)
class Bar:
    inc: Incarnation
    colour: str
    x1: float
    x2: float
    open_left: bool
    open_right: bool
    label: str
    tip: str
    row: int = 0


def call_desc(ctx: TimelineContext, idx: int) -> str:
    r = ctx.records[idx]
    who = ctx.threads.get((r.pid, r.tid), f"tid {r.tid}")
    return f"{render_record(ctx, idx)} by {who} at seq {r.seq_in}-{r.seq_out}"


def bars(
    ctx: TimelineContext, incs: Sequence[Incarnation], colours: dict[int, str], axis: Axis
) -> list[Bar]:
    recs = ctx.records
    lo, hi = (axis.values[0], axis.values[-1]) if axis.values else (0, 0)
    bars: list[Bar] = []
    for inc in incs:
        colour = colours[inc.id]
        if inc.created_idx >= 0:
            cr = recs[inc.created_idx]
            open_left = cr.seq_out < lo
            x1 = axis.left if open_left else (axis.at(cr.seq_in) + axis.at(cr.seq_out)) / 2
            born = f"created: {call_desc(ctx, inc.created_idx)}"
        else:
            open_left = True
            x1 = axis.left
            born = "created: outside the trace (or inherited at fork)"
        if inc.open:
            open_right = True
            x2 = axis.right
            died = "still open at the end of the trace"
        elif inc.end_idx >= 0:
            er = recs[inc.end_idx]
            open_right = er.seq_in > hi
            x2 = axis.right if open_right else (axis.at(er.seq_in) + axis.at(er.seq_out)) / 2
            died = f"ended: {call_desc(ctx, inc.end_idx)}"
        else:
            open_right = inc.end_in > hi
            x2 = axis.right if open_right else axis.at(inc.end_in)
            died = f"ended by something the shim did not see, before seq {inc.end_in}"
        x2 = max(x2, x1 + 6)
        label = f"fd {inc.label}"
        if ctx.multi_process:
            label += f" (pid {inc.pid})"
        if inc.unknown:
            label += " ?"
        tip = f"{inc_label(inc, pid=ctx.multi_process)}\n{born}\n{died}"
        bars.append(Bar(inc, colour, x1, x2, open_left, open_right, label, tip))
    # Pack the bars into as few rows as keep them (and their labels) apart.
    ends: list[float] = []
    for bar in sorted(bars, key=lambda b: b.x1):
        reach = max(bar.x2, bar.x1 + text_w(bar.label, 11) + 12) + 6
        for row, end in enumerate(ends):
            if end <= bar.x1:
                bar.row = row
                ends[row] = reach
                break
        else:
            bar.row = len(ends)
            ends.append(reach)
    return bars


def lane_order(ctx: TimelineContext, keys: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    def order(key: tuple[int, int]) -> tuple[int, int, int]:
        name = ctx.threads.get(key, "")
        num = int(name[1:]) if name[1:].isdigit() else 1 << 30
        return (num, key[0], key[1])

    return sorted(set(keys), key=order)
