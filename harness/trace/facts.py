"""The annotated trace model: what the builder's one walk over the records proved.

:func:`afterclose.harness.trace.builder.build` replays the records through the fd model
(:mod:`afterclose.harness.trace.model`) once and keeps, besides the final state, a *fact* for
every call whose meaning depends on the state at that moment: which incarnation it touched,
which registration an event belonged to, what the calling thread had been told about the
number.  Every fact holds a snapshot of what it needs, so the rules
(``harness/oracle/rules/``) read facts and the final model and keep no state of their own.

Facts are listed in the order the walk proved them (:attr:`TraceModel.facts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import Header, HeaderFlag, Record
from afterclose.harness.trace.model import EndKind, Incarnation, Model, Origin
from afterclose.harness.trace.timeline import TimelineContext, call_str, inc_label

if TYPE_CHECKING:
    from afterclose.harness.oracle.rule import Rule


# -- facts -----------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class ClosedNumberUse:
    """A call failed with EBADF on ``fd``, whose last incarnation ``last`` was closed (by a
    traced call) before the call began; not part of a closefrom()-style sweep."""

    idx: int
    fd: int
    last: Incarnation


@dataclass(eq=False, slots=True)
class SocketCallOnFile:
    """A socket call failed with ENOTSOCK: the socket ``prev`` was closed and its number is
    now ``cur``, a non-socket."""

    idx: int
    prev: Incarnation
    cur: Incarnation


@dataclass(eq=False, slots=True)
class CloseAgainAfterReuse:
    """A thread acted on ``first`` and closed it; another thread was handed the number (``now``);
    the first thread closed the number again, having done nothing else on it in between."""

    idx: int
    first: Incarnation
    now: Incarnation


@dataclass(eq=False, slots=True)
class ActAfterEvent:
    """Since its last epoll_wait (``batch_idx``) the thread got an event for ``event_inc``
    (in the wait at ``event_idx``); ``event_inc`` was then closed by another thread and its
    number handed to ``now``, created by another thread; the thread then acted on ``now``.
    With ``data``: the event's data, which another thread set for ``now`` (of any number)
    after the wait returned."""

    idx: int
    event_inc: Incarnation
    event_idx: int
    now: Incarnation
    batch_idx: int
    data: int | None = None


@dataclass(eq=False, slots=True)
class StaleBatchEvent:
    """The wait at ``wait_idx`` gave the thread an event for ``event_inc``; before touching
    ``event_inc`` the same thread closed it (``close_idx``: the handling of another event of
    the batch did), the number was handed to ``now``; the thread did what a new connection's
    handler does at once (``now``'s registration, nothing else), moved on to another fd, and
    then came back to act on ``now`` (at ``idx``) before its next epoll_wait, with no event
    for ``now``: the batch's stale event for the number was dispatched to the new
    connection."""

    idx: int
    wait_idx: int
    event_inc: Incarnation
    close_idx: int
    now: Incarnation


@dataclass(eq=False, slots=True)
class ConcurrentOneshot:
    """Between the EPOLLONESHOT delivery of the wait at ``wait_idx`` and the registration's
    next delivery, two threads acted on ``inc`` at once: ``first`` and ``last`` by one thread
    around ``other`` by another (or ``first`` and ``other`` overlapping, ``last`` = ``first``);
    ``rearm_idx``: the EPOLL_CTL_MOD that armed the delivery."""

    inc: Incarnation
    wait_idx: int
    rearm_idx: int
    first: int
    other: int
    last: int


@dataclass(eq=False, slots=True)
class ModOfReplaced:
    """EPOLL_CTL_MOD failed with ENOENT on ``now`` (not registered), with the data that the
    ADD/MOD at ``owner_set_idx`` had set for ``old``, an older, closed incarnation."""

    idx: int
    owner_set_idx: int
    old: Incarnation
    now: Incarnation


@dataclass(eq=False, slots=True)
class StaleData:
    """An ADD/MOD on ``now`` set the data that the ADD/MOD at ``owner_set_idx`` had set for
    ``old``, an older, closed incarnation of the same number (and, for an ADD, a value that
    complete free tracking shows was not freed and set again since).  ``acted``: the thread's
    earlier calls on ``now``, made with no event for it; ``followups``: waits that later
    delivered the stale data."""

    idx: int
    owner_set_idx: int
    old: Incarnation
    now: Incarnation
    data: int
    acted: tuple[int, ...] = ()
    followups: list[int] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class EventOnClosed:
    """The wait at ``wait_idx`` (in ``inc``'s process) returned an event for ``inc``, closed
    before the wait began, through a live registration (added at ``added_idx``); ``holders``:
    the incarnations still open on the same file at that moment."""

    wait_idx: int
    data: int
    inc: Incarnation
    added_idx: int
    holders: tuple[Incarnation, ...]


@dataclass(eq=False, slots=True)
class EventFreedData:
    """The wait at ``wait_idx`` returned ``data`` for ``incarnation``: a pointer freed at
    ``free_idx``, before the wait began, and not set again since by a sound ADD/MOD."""

    wait_idx: int
    data: int
    incarnation: Incarnation
    free_idx: int
    set_idx: int


@dataclass(eq=False, slots=True)
class FreeWhileArmed:
    """free() at ``free_idx`` of the data of a live, armed registration of ``incarnation`` (set
    at ``set_idx``); the wait at ``wait_idx`` was in the kernel before the registration
    stopped, so it could have returned the freed pointer."""

    free_idx: int
    incarnation: Incarnation
    set_idx: int
    wait_idx: int


@dataclass(eq=False, slots=True)
class ForeignClose:
    """A thread closed ``inc`` (an accepted connection, registered with epoll) that it never
    received: another thread accepted it, the closer's last call on the number (at
    ``kept_idx``) was on ``kept``, an older incarnation, and no epoll wait had been handed an
    event for ``inc`` when the close began (every wait that delivered one began after the close
    returned).  ``age_ns``: how old ``inc`` was."""

    idx: int
    inc: Incarnation
    added_idx: int
    age_ns: int
    kept: Incarnation
    kept_idx: int


@dataclass(eq=False, slots=True)
class SpinningCall:
    """A thread made the same call on ``inc`` ``count`` times in a row with the same empty
    result (``what``: a read that returned 0, or one that failed with EAGAIN), with no data
    read from ``inc`` in between: from ``first_idx`` to ``last_idx``."""

    first_idx: int
    last_idx: int
    inc: Incarnation
    what: str
    count: int


@dataclass(eq=False, slots=True)
class SpinningEvent:
    """A thread's epoll waits delivered the same ``events`` for ``inc`` ``count`` times in a
    row, and the thread made no call on ``inc`` in between (level-triggered: the condition
    stays, so every wait returns at once): from the wait ``first_idx`` to ``last_idx``.
    ``mask``: the registration's interest mask when the spin began, set by ``set_idx``."""

    first_idx: int
    last_idx: int
    inc: Incarnation
    events: int
    count: int
    mask: int
    set_idx: int


Fact = (
    ClosedNumberUse
    | SocketCallOnFile
    | CloseAgainAfterReuse
    | ActAfterEvent
    | StaleBatchEvent
    | ConcurrentOneshot
    | ModOfReplaced
    | StaleData
    | EventOnClosed
    | EventFreedData
    | FreeWhileArmed
    | ForeignClose
    | SpinningCall
    | SpinningEvent
)
F = TypeVar("F")


# -- which processes outlived the run --------------------------------------------------------

# Why a traced process that the harness did not end was gone at the cut-off with no exit in its
# trace: the shim marks every exit and fatal signal it can see, so only a signal no handler
# sees (SIGKILL: the OOM killer, a supervisor, a user) or an exit behind the shim's back is left.
NOT_RUNNING = (
    "it was no longer running at the cut-off and its trace records no exit (a SIGKILL, "
    "e.g. from the OOM killer, ends a process without a word)"
)


@dataclass(frozen=True)
class Running:
    """The target's processes that ran at the cut-off, as the harness saw them from outside.

    ``pids``: their PIDs, as the host numbers them and, for a container's processes, as the
    container does: a trace names a process by either (the shim by the PID it sees, the eBPF
    tracer by the host's).  ``ended``: PID -> how the harness ended that process on purpose (a
    fault's signal, a restart), said instead of :data:`NOT_RUNNING`."""

    pids: frozenset[int]
    ended: Mapping[int, str] = field(default_factory=dict)

    def gone(self, pids: Iterable[int], headers: Mapping[int, Header]) -> dict[int, str]:
        """pid -> why, for each of ``pids`` that was gone at the cut-off without its trace
        saying so.  A trace that records the process's exit or a fatal signal speaks for
        itself (an exit after the cut-off proves it ran then).  A PID that runs at the cut-off
        is judged even when the harness ended an earlier process of that number: it is a new
        one."""
        said = HeaderFlag.CRASHED | HeaderFlag.EXITED
        out: dict[int, str] = {}
        for pid in sorted(pids):
            h = headers.get(pid)
            if pid in self.pids or (h is not None and h.flags & said):
                continue
            out[pid] = self.ended.get(pid, NOT_RUNNING)
        return out


# -- the model -------------------------------------------------------------------------------


@dataclass(eq=False)
class TraceModel:
    """The records, the fd model after the walk, and the facts proved on the way."""

    records: Sequence[Record]
    headers: Mapping[int, Header]
    kernel: Model
    ctx: TimelineContext
    facts: list[Fact]
    thread_names: Mapping[tuple[int, int], str]
    pids: set[int]
    # Where judging stops: the cut-off, else the last record's seq_out (0 without records).
    end_seq: int
    # pid -> fd numbers handed out again with no traced close of the previous incarnation.
    untraced_closes: Mapping[int, int]
    # pid -> epoll events whose data no traced epoll_ctl set.
    unattributed: Mapping[int, int]
    events: int
    lost_records: int
    # Why a trace with no lost records is nevertheless incomplete (a damaged file), if it is.
    damaged: str | None
    trace_path: str | None
    # Paths of the per-process trace files, when known (pid -> path).
    files: Mapping[int, str] = field(default_factory=dict)
    # pid -> why the process was gone at the cut-off although its trace records no exit of
    # its own (see :class:`Running`); empty when nobody looked (a trace judged offline).
    gone: Mapping[int, str] = field(default_factory=dict)

    def of(self, kind: type[F]) -> Iterator[F]:
        """The facts of one kind, in the order the walk proved them."""
        for fact in self.facts:
            if isinstance(fact, kind):
                yield fact

    # -- words every rule uses ----------------------------------------------------------------

    def tname(self, pid: int, tid: int) -> str:
        return self.thread_names.get((pid, tid), f"tid {tid}")

    def label(self, inc: Incarnation) -> str:
        return inc_label(inc, pid=self.ctx.multi_process)

    def created_desc(self, inc: Incarnation) -> str:
        how = {
            Origin.ACCEPT: "accepted",
            Origin.SOCKET: "created by socket()",
            Origin.DUP: "created by dup",
            Origin.FDNEW: "opened",
            Origin.EPOLL_CREATE: "created by epoll_create",
            Origin.FORK: "inherited at fork",
        }.get(inc.origin, "created")
        if inc.created_idx < 0:
            return how
        return f"{how} by {self.tname(inc.pid, inc.creator_tid)} at seq {inc.created_out}"

    def closed_desc(self, inc: Incarnation) -> str:
        how = {EndKind.DUP2: "replaced by dup2", EndKind.CLOSE_RANGE: "closed by close_range"}
        return (
            f"{how.get(inc.end_kind, 'closed') if inc.end_kind else 'closed'} at seq "
            f"{inc.end_out} by {self.tname(inc.pid, inc.end_tid)}"
        )

    def words(self, idx: int, old: Incarnation, new: Incarnation) -> dict[str, str]:
        """What a summary says of the call at record ``idx`` on a number whose older
        incarnation ``old`` ended before it and whose newer one is ``new`` (the same one when
        the number was not reused); a rule's template names them: ``{t}`` the calling thread,
        ``{call}``, ``{seq}`` its entry, ``{fd}``, ``{old}``, ``{old_closed}``, ``{old_end}``,
        ``{new}``, ``{new_created}``."""
        r = self.records[idx]
        return {
            "t": self.tname(r.pid, r.tid),
            "call": call_str(r),
            "seq": str(r.seq_in),
            "fd": str(new.fd),
            "old": self.label(old),
            "old_closed": self.closed_desc(old),
            "old_end": str(old.end_out),
            "new": self.label(new),
            "new_created": self.created_desc(new),
        }

    def reuse_finding(
        self,
        rule: Rule,
        summary: str,
        idx: int,
        old: Incarnation,
        new: Incarnation,
        *,
        data: int | None = None,
        refs: Iterable[int] = (),
        notes: dict[int, str] | None = None,
    ) -> Finding:
        """A finding at record ``idx`` on ``new``'s number, whose older incarnation ``old``
        ended before the call: the timeline shows ``refs``, where ``old`` ended and where
        ``new`` began (``old`` and ``new`` are the same when the number was not reused)."""
        marks = dict(notes or {})
        if old.end_idx >= 0:
            marks.setdefault(old.end_idx, f"{self.label(old)} closed here")
        return self.finding(
            rule,
            summary,
            idx,
            new.fd,
            data,
            refs=(*refs, old.end_idx, new.created_idx),
            notes=marks,
        )

    def finding(
        self,
        rule: Rule,
        summary: str,
        idx: int,
        fd: int | None,
        data: int | None = None,
        refs: Iterable[int] = (),
        notes: dict[int, str] | None = None,
        *,
        pid: int | None = None,
    ) -> Finding:
        """A finding of ``rule`` at record ``idx`` (its timeline is drawn around it)."""
        r = self.records[idx]
        return Finding(
            rule.name,
            summary,
            idx,
            r.seq_in,
            r.pid if pid is None else pid,
            r.tid,
            fd,
            data,
            tuple(i for i in refs if i >= 0),
            notes or {},
            _ctx=self.ctx,
            meaning=rule.plain_meaning,
            why=rule.why,
        )

    # -- how far the trace can be trusted -----------------------------------------------------

    def warnings(self) -> list[str]:
        """What the trace could not show, per process: each caveat limits some rule."""
        out: list[str] = []
        if self.lost_records:
            out.append(
                f"trace incomplete: {self.lost_records} records were lost (the shim ran out of "
                "trace chunks); a missing record can hide a violation or explain one away"
            )
        elif self.damaged:
            out.append(f"trace incomplete: {self.damaged}")
        for pid, h in sorted(self.headers.items()):
            if h.lost_records:
                out.append(f"pid {pid}: {h.lost_records} records lost")
            if h.flags & HeaderFlag.FREE_TABLE_FULL:
                out.append(
                    f"pid {pid}: the shim's table of epoll data pointers filled up; some free() "
                    "calls were not recorded (free rules may miss findings; stale ADDs are not "
                    "checked)"
                )
            if not h.flags & HeaderFlag.FREE_TRACKING:
                out.append(
                    f"pid {pid}: free() was not tracked: freed-while-registered and "
                    "event-for-freed-data were not checked"
                )
            if h.flags & HeaderFlag.CRASHED:
                out.append(
                    f"pid {pid}: the shim saw a fatal signal; its trace may stop early "
                    "(fd-leak is not checked for it)"
                )
            if h.ppid and h.fork_seq and h.ppid not in self.pids:
                out.append(
                    f"pid {pid}: forked from pid {h.ppid}, which is not in the trace: its "
                    "inherited fds are of unknown origin"
                )
        for pid, why in sorted(self.gone.items()):
            held = sum(1 for inc in self.kernel.accepted if inc.pid == pid and inc.open)
            if held:
                out.append(
                    f"pid {pid}: {why}; the kernel released the {held} connection(s) it still "
                    "held, so fd-leak is not checked for it"
                )
        for pid, n in sorted(self.untraced_closes.items()):
            out.append(
                f"pid {pid}: {n} fd numbers were handed out again with no traced close (a raw "
                "close syscall, io_uring, or exec dropping close-on-exec fds): fd-leak is not "
                "checked for it"
            )
        for pid, n in sorted(self.unattributed.items()):
            out.append(
                f"pid {pid}: {n} epoll events carried data that no traced epoll_ctl set "
                "(registrations made behind the shim, e.g. through io_uring): those events "
                "were not checked"
            )
        return out
