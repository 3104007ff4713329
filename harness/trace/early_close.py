"""Stale events of one wait batch: a thread closes an fd whose event in its current batch it
has not handled yet (the handling of another event of the batch closed it), the number is
handed to a new connection, and the batch's stale event is then dispatched to the new
connection by number.

The builder keeps one :class:`EarlyClose` per such close for the thread until its next
epoll_wait and feeds it the thread's calls (:func:`batch_step`).  The handler of a new
connection registers it, and maybe reads it, at once; a thread that afterwards acted on
another fd and then comes back to the new connection, with no event for it, is dispatching
the stale event.
"""

from __future__ import annotations

from dataclasses import dataclass

from afterclose.harness.trace.facts import StaleBatchEvent
from afterclose.harness.trace.format import Op
from afterclose.harness.trace.model import Incarnation, Origin


@dataclass(slots=True)
class EarlyClose:
    """The thread closed ``inc`` (at ``close_idx``) with its event of the batch of
    ``wait_idx`` unhandled; ``now``: the number's next incarnation, once the thread met it;
    ``moved``: the thread has since acted on another fd; ``io``: it did more than register
    ``now`` before moving on (a handler that reads a new connection at once)."""

    inc: Incarnation
    wait_idx: int
    close_idx: int
    now: Incarnation | None = None
    moved: bool = False
    io: bool = False


def batch_step(
    early: dict[int, EarlyClose],
    idx: int,
    op: int,
    fd: int,
    inc: Incarnation | None,
    certain: bool,
) -> StaleBatchEvent | None:
    """One call of the thread on ``fd`` (``inc``, when known, and whether that is certain)."""
    fact = None
    for efd, e in list(early.items()):
        if efd != fd:
            if e.now is not None:
                e.moved = True
            continue
        if inc is None or inc is e.inc or not certain or inc.unknown:
            continue
        if inc.id < e.inc.id or inc.pid != e.inc.pid:
            continue
        if e.now is None:
            e.now = inc
        if e.now is not inc:
            del early[efd]
        elif e.moved and not e.io:
            del early[efd]
            fact = StaleBatchEvent(idx, e.wait_idx, e.inc, e.close_idx, inc)
        elif op != Op.EPOLL_CTL:
            e.io = True
    return fact


def met(early: dict[int, EarlyClose], inc: Incarnation) -> None:
    """The thread created ``inc``.

    Only a connection the thread accepted can be the stale event's victim as far as the trace
    tells.  One it opened itself (``socket()``, an outgoing connection: a proxy's connection to
    its backend) it drives in any order: HAProxy connects, turns to the client's fd, then
    tries a speculative ``recv()`` on the new socket before it registers it."""
    e = early.get(inc.fd)
    if e is None or e.now is not None:
        return
    if inc.origin is Origin.ACCEPT:
        e.now = inc
    else:
        del early[inc.fd]
