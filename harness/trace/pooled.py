"""Stale ADDs of pooled data: held until the trace shows a second owner.

A server that keeps its connections in recycled memory (Apache's per-connection pools, Varnish's
session mempool, nginx's connection array) hands the next connection on a number the very
address the previous one had, with no ``free()`` in between, and the thread that registers the
new connection need not be the one that accepted it (Apache's listener accepts, a worker serves
the request and ADDs the connection for keep-alive).  Such a first ADD of a connection, with a
value no free() ended, looks exactly like a thread re-adding a closed connection's pointer.

What tells them apart comes later in the trace: in the real bug the new connection has an owner
of its own that registers it too, with its own data.  Either its ADD fails with ``EEXIST``
(the stale ADD came first), or it sets another value on the registration (ADD after a DEL, or
MOD).  With one registration per connection, the value is the connection's own.

:class:`PooledAdds` holds such an ADD's :class:`StaleData` until one of those calls confirms it;
an unconfirmed one is never a fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from afterclose.harness.trace.facts import StaleData

EEXIST = 17


@dataclass(slots=True)
class _Held:
    fact: StaleData
    inst: int  # the epoll instance's open file id
    tid: int  # the thread that made the pooled ADD


@dataclass(slots=True)
class PooledAdds:
    held: dict[int, _Held] = field(default_factory=dict)  # incarnation id -> the held ADD
    setters: set[int] = field(default_factory=set)  # record indices of held ADDs

    def hold(self, fact: StaleData, inst: int, tid: int) -> None:
        self.held[fact.now.id] = _Held(fact, inst, tid)
        self.setters.add(fact.idx)

    def confirmed(
        self, inc_id: int, inst: int, tid: int, data: int, ok: bool, err: int
    ) -> StaleData | None:
        """An ADD/MOD on incarnation ``inc_id`` in ``inst`` by thread ``tid``: the held fact it
        confirms, if any -- an ADD that failed with EEXIST, or a call by another thread that
        set another value."""
        h = self.held.get(inc_id)
        if h is None or h.inst != inst:
            return None
        if ok and (tid == h.tid or data == h.fact.data):
            return None
        if not ok and err != EEXIST:
            return None
        del self.held[inc_id]
        self.setters.discard(h.fact.idx)
        return h.fact
