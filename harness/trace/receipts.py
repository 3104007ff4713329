"""What the builder's walk keeps to tell who received a connection, and which threads spin.

:class:`Receipts` remembers, per incarnation, its first EPOLL_CTL_ADD and the earliest wait
that delivered an event for it, and collects the closes that may be foreign (a thread closing
a connection it was never handed); :func:`track_spin` follows runs of identical empty reads,
:func:`track_event_spin` runs of waits delivering an event the thread never acts on.
Both only state what the records prove, and record facts (:mod:`afterclose.harness.trace.facts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from afterclose.harness.trace.facts import Fact, ForeignClose, SpinningCall, SpinningEvent
from afterclose.harness.trace.format import Record
from afterclose.harness.trace.model import Incarnation, Origin, Registration

# The same empty read on one connection this many times in a row is a spin: a correct server
# reads EOF once and closes, and reads EAGAIN once per readiness event, which brings data.
SPIN_CALLS = 1000
# "Got an event for" in a thread's memory of its last business with a number.
EVENT = -1
# A connection closed by a thread that never received it is a foreign close only while it is
# this young: an idle timer on its own thread may rightly close one that stayed silent longer.
FOREIGN_CLOSE_YOUNG_NS = 1_000_000_000


def _one_more(run: Spin | EventSpin, idx: int) -> bool:
    """Record ``idx`` as one more of ``run``, in its fact too once it has one; True when the
    run just became long enough to be a spin (and its fact is due)."""
    run.count += 1
    if run.fact is not None:
        run.fact.count = run.count
        run.fact.last_idx = idx
        return False
    return run.count >= SPIN_CALLS and not run.inc.unknown


@dataclass(slots=True)
class Spin:
    """A thread's run of identical empty reads on one incarnation."""

    inc: Incarnation
    what: str
    first_idx: int
    count: int = 1
    fact: SpinningCall | None = None


def track_spin(
    spins: dict[int, Spin], facts: list[Fact], idx: int, inc: Incarnation, what: str
) -> None:
    """One more empty read (``what``) of ``inc`` by the thread whose runs are ``spins``."""
    s = spins.get(inc.fd)
    if s is None or s.inc is not inc or s.what != what:
        spins[inc.fd] = Spin(inc, what, idx)
        return
    if _one_more(s, idx):
        s.fact = SpinningCall(s.first_idx, idx, inc, what, s.count)
        facts.append(s.fact)


@dataclass(slots=True)
class EventSpin:
    """A thread's run of waits delivering the same event for one incarnation, untouched."""

    inc: Incarnation
    events: int
    first_idx: int
    last_idx: int
    count: int = 1
    fact: SpinningEvent | None = None


def track_event_spin(
    spins: dict[int, EventSpin],
    facts: list[Fact],
    wait_idx: int,
    reg: Registration,
    events: int,
    last_op: Mapping[int, tuple[int, Incarnation | None, int]],
) -> None:
    """The thread's wait ``wait_idx`` delivered ``events`` through ``reg``; ``last_op`` is the
    thread's memory of its last business with each number (before this event).  The run goes
    on while the thread made no call on the number since its previous wait's event for it and
    no thread read, wrote or accepted on it (another thread may be the one handling it)."""
    inc = reg.incarnation
    last = last_op.get(inc.fd)
    untouched = last is not None and last[0] == EVENT and last[1] is inc and last[2] != wait_idx
    s = spins.get(inc.fd)
    if (
        not untouched
        or s is None
        or s.inc is not inc
        or s.events != events
        or inc.handled_idx > s.last_idx
    ):
        spins[inc.fd] = EventSpin(inc, events, wait_idx, wait_idx)
        return
    s.last_idx = wait_idx
    if _one_more(s, wait_idx):
        s.fact = SpinningEvent(s.first_idx, wait_idx, inc, events, s.count, reg.events, reg.set_idx)
        facts.append(s.fact)


@dataclass(slots=True)
class Receipts:
    recs: Sequence[Record]
    added: dict[int, int] = field(default_factory=dict)  # incarnation id -> first ADD index
    first_wait_in: dict[int, int] = field(default_factory=dict)  # id -> earliest wait seq_in
    candidates: list[tuple[int, Incarnation, Incarnation, int]] = field(default_factory=list)

    def add(self, inc: Incarnation, idx: int) -> None:
        self.added.setdefault(inc.id, idx)

    def event(self, inc: Incarnation, wait_idx: int) -> None:
        w_in = self.recs[wait_idx].seq_in
        first = self.first_wait_in.get(inc.id)
        if first is None or w_in < first:
            self.first_wait_in[inc.id] = w_in

    def _delivered_before(self, inc: Incarnation, r: Record) -> bool:
        """A wait that began before ``r`` returned delivered an event for ``inc``."""
        first = self.first_wait_in.get(inc.id)
        return first is not None and first < r.seq_out

    def close(
        self, idx: int, r: Record, inc: Incarnation, kept: Incarnation, kept_idx: int
    ) -> None:
        """Thread ``r.tid`` closes ``inc``; its last call on the number (``kept_idx``) was on
        ``kept``, an older incarnation: it made no call on ``inc``.  A candidate if another
        thread of the process accepted ``inc`` and registered it with epoll before the close
        began, and it was young."""
        if inc.unknown or inc.origin is not Origin.ACCEPT or inc.created_idx < 0:
            return
        if inc.pid != r.pid or inc.creator_tid == r.tid or not inc.created_out < r.seq_in:
            return
        added = self.added.get(inc.id)
        if added is None or not self.recs[added].seq_out < r.seq_in:
            return
        if r.t_ns - self.recs[inc.created_idx].t_ns >= FOREIGN_CLOSE_YOUNG_NS:
            return
        if not self._delivered_before(inc, r):
            self.candidates.append((idx, inc, kept, kept_idx))

    def confirm(self, facts: list[Fact]) -> None:
        """At the end of the walk: a candidate no wait could have handed an event before the
        close returned (waits are seen in seq_out order, so some arrive after the close)."""
        for idx, inc, kept, kept_idx in self.candidates:
            r = self.recs[idx]
            if not self._delivered_before(inc, r):
                age = r.t_ns - self.recs[inc.created_idx].t_ns
                facts.append(ForeignClose(idx, inc, self.added[inc.id], age, kept, kept_idx))
