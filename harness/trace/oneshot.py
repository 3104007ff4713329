"""Two threads handling one EPOLLONESHOT connection at once.

EPOLLONESHOT makes a registration deliver one event and then stay silent until an
EPOLL_CTL_MOD re-arms it: a server that hands each event to a worker relies on it so that one
worker at a time owns the connection.  The worker must re-arm as its last touch of the
connection; re-armed earlier, the next event goes to a second worker while the first still
reads, writes or closes.

The builder notes every delivery of a ONESHOT registration (:class:`Deliveries`); after the
walk, :func:`overlaps` looks at each window from one delivery to the registration's next one
and proves two threads there at once from sequence numbers alone: one thread's calls on the
connection on both sides of another thread's call, or two calls whose intervals overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

from afterclose.harness.trace.facts import ConcurrentOneshot
from afterclose.harness.trace.format import Op, Record
from afterclose.harness.trace.model import Incarnation, Registration
from afterclose.harness.trace.timeline import Resolved

_ACTS = frozenset({Op.READ, Op.WRITE, Op.SHUTDOWN, Op.CLOSE, Op.EPOLL_CTL})
_NEVER = 1 << 64

# registration id -> (registration, wait indices of its ONESHOT deliveries, in walk order)
Deliveries = dict[int, tuple[Registration, list[int]]]


def _acts(recs: Sequence[Record], res: Sequence[Resolved], incs: set[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for idx, r in enumerate(recs):
        inc = res[idx]
        if isinstance(inc, Incarnation) and inc.id in incs and r.op in _ACTS:
            out.setdefault(inc.id, []).append(idx)
    return out


def _rearm_before(recs: Sequence[Record], acts: list[int], seq: int) -> int:
    """The last EPOLL_CTL_MOD on the connection that began before ``seq``, or -1: one still
    in flight when the wait returned may be what armed it."""
    best = -1
    for idx in acts:
        r = recs[idx]
        if _rearm(r) and r.ret >= 0 and r.seq_in < seq:
            best = idx
    return best


def _rearm(r: Record) -> bool:
    return r.op == Op.EPOLL_CTL and r.flags == 3


def _overlap(recs: Sequence[Record], calls: list[int], after: int) -> tuple[int, int] | None:
    """Two calls of two threads on the connection whose intervals intersect.  A re-arm does
    not count: the next delivery, and its handler's first calls, may come from inside it."""
    latest: dict[int, int] = {}  # tid -> its call that returned last so far
    chosen = (i for i in calls if recs[i].seq_in > after and not _rearm(recs[i]))
    for idx in sorted(chosen, key=lambda i: recs[i].seq_in):
        r = recs[idx]
        for tid, prev in latest.items():
            if tid != r.tid and recs[prev].seq_out > r.seq_in:
                return prev, idx
        mine = latest.get(r.tid)
        if mine is None or recs[mine].seq_out < r.seq_out:
            latest[r.tid] = idx
    return None


def _interleaved(
    recs: Sequence[Record], calls: list[int], start: int, d: int, end: int
) -> tuple[int, int, int] | None:
    """A thread that acted in [start, d) acts again in (d, end) after another thread's call
    there: it still handled the connection after the delivery at d went to another."""
    before = {recs[i].tid: i for i in calls if start < recs[i].seq_in < d}
    first_other: dict[int, int] = {}  # tid -> its first call in (d, end)
    for idx in calls:
        r = recs[idx]
        if not d < r.seq_in < end:
            continue
        if r.tid in before:
            for tid, y in first_other.items():
                if tid != r.tid and recs[y].seq_out < r.seq_in:
                    return before[r.tid], y, idx
        first_other.setdefault(r.tid, idx)
    return None


def overlaps(
    recs: Sequence[Record], res: Sequence[Resolved], deliveries: Deliveries
) -> list[ConcurrentOneshot]:
    wanted = {reg.incarnation.id for reg, _ in deliveries.values()}
    if not wanted:
        return []
    acts = _acts(recs, res, wanted)
    out = []
    for reg, waits in deliveries.values():
        inc = reg.incarnation
        calls = acts.get(inc.id)
        if not calls or inc.unknown:
            continue
        outs = [recs[w].seq_out for w in waits]
        fact = None
        pair = _overlap(recs, calls, outs[0])
        if pair is not None:
            later = recs[pair[1]].seq_in
            w = max((w for w in waits if recs[w].seq_out < later), key=lambda w: recs[w].seq_out)
            fact = ConcurrentOneshot(inc, w, -1, pair[0], pair[1], pair[0])
        else:
            for k, w in enumerate(waits):
                start = outs[k - 1] if k else 0
                end = outs[k + 1] if k + 1 < len(outs) else _NEVER
                found = _interleaved(recs, calls, start, outs[k], end)
                if found is not None:
                    fact = ConcurrentOneshot(inc, w, -1, *found)
                    break
        if fact is not None:
            fact.rearm_idx = _rearm_before(recs, calls, recs[fact.wait_idx].seq_out)
            out.append(fact)
    return out
