"""What the trace builder remembers per thread while it walks the records, and the records'
order it walks them in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from afterclose.harness.trace.early_close import EarlyClose
from afterclose.harness.trace.facts import ClosedNumberUse
from afterclose.harness.trace.format import Op, Record
from afterclose.harness.trace.model import Incarnation
from afterclose.harness.trace.receipts import EventSpin, Spin


@dataclass(slots=True)
class Acted:
    """A thread's ops on one incarnation, collected while it has no proof it knows it."""

    inc: Incarnation
    knows: bool
    idxs: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ThreadMemory:
    pid: int
    tid: int
    name: str
    batch: dict[int, tuple[Incarnation, int]] = field(default_factory=dict)
    # epoll data -> (the incarnation its event of the current batch was for, the wait's index)
    batch_data: dict[int, tuple[Incarnation, int]] = field(default_factory=dict)
    batch_idx: int = -1
    last_op: dict[int, tuple[int, Incarnation | None, int]] = field(default_factory=dict)
    acted: dict[int, Acted] = field(default_factory=dict)
    run: list[tuple[int, int, ClosedNumberUse | None]] = field(default_factory=list)
    # fd -> index of this thread's last close of it, when the thread had acted on the
    # incarnation it closed (created it, got an event for it, did I/O or epoll_ctl on it).
    owned_close: dict[int, int] = field(default_factory=dict)
    # fd -> the run of identical empty reads on it (see SPIN_CALLS).
    spin: dict[int, Spin] = field(default_factory=dict)
    # fd -> the run of waits delivering the same event for it, with no call on it between.
    event_spin: dict[int, EventSpin] = field(default_factory=dict)
    # fd -> an incarnation closed with its event of the current batch still unhandled.
    early: dict[int, EarlyClose] = field(default_factory=dict)
    # fd -> an EPOLL_CTL_DEL that was the thread's first call on it since its batch event.
    del_first: dict[int, int] = field(default_factory=dict)


def prepare(records: Sequence[Record], cutoff_seq: int | None) -> Sequence[Record]:
    recs: Sequence[Record] = records
    if cutoff_seq is not None:
        recs = [r for r in records if r.seq_in <= cutoff_seq]
    prev = -1
    ordered = True
    for r in recs:
        if r.seq_out < prev:
            ordered = False
            break
        prev = r.seq_out
    if not ordered:
        event = Op.EPOLL_EVENT
        recs = sorted(recs, key=lambda r: (r.seq_out, r.op == event, r.arg))
    return recs
