"""The model builder: one walk over the records, the fd model updated call by call, and a
fact (:mod:`afterclose.harness.trace.facts`) kept wherever a call's meaning depends on the
state at that moment.

Every fact only states what the records prove; whenever the order of two calls is not fixed by
their sequence numbers (their intervals overlap), the call is given the benefit of the doubt.
Nothing is ever stated about an incarnation of unknown origin.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence

from afterclose.harness.trace.early_close import EarlyClose, batch_step, met
from afterclose.harness.trace.facts import (
    ActAfterEvent,
    CloseAgainAfterReuse,
    ClosedNumberUse,
    EventFreedData,
    EventOnClosed,
    Fact,
    FreeWhileArmed,
    ModOfReplaced,
    SocketCallOnFile,
    StaleData,
    TraceModel,
)
from afterclose.harness.trace.format import (
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLL_CTL_MOD,
    EPOLLHUP,
    EPOLLONESHOT,
    EPOLLRDHUP,
    DupKind,
    Header,
    HeaderFlag,
    IoKind,
    Op,
    Record,
    RecordFlag,
)
from afterclose.harness.trace.model import (
    EBADF,
    EndKind,
    EpollInstance,
    Incarnation,
    Model,
    OfdKind,
    Origin,
    Registration,
)
from afterclose.harness.trace.netpoller import go_pids, without_thread_ownership
from afterclose.harness.trace.oneshot import Deliveries, overlaps
from afterclose.harness.trace.pooled import PooledAdds
from afterclose.harness.trace.receipts import EVENT as _EVENT
from afterclose.harness.trace.receipts import Receipts, track_event_spin, track_spin
from afterclose.harness.trace.thread_memory import Acted, ThreadMemory, prepare
from afterclose.harness.trace.timeline import Resolved, TimelineContext

ENOENT = 2
EAGAIN = 11
EPIPE = 32
ENOTSOCK = 88
ECONNRESET = 104
CLOSE_RANGE_CLOEXEC = 4
# Below this, epoll data is an fd number, an index or a tag: values whose reuse by a new
# connection is as legitimate as malloc handing out a freed address again.
SMALL_DATA = 4096
# A closefrom()-style loop: this many EBADF-tolerant closes of n, n+1, n+2 ... in a row.
SWEEP_RUN = 3
_ACTED_CAP = 16
_NEVER = 1 << 64

_SOCKET_IO = {
    IoKind.RECV.value,
    IoKind.RECVFROM.value,
    IoKind.RECVMSG.value,
    IoKind.SEND.value,
    IoKind.SENDTO.value,
    IoKind.SENDMSG.value,
}


class _Walk:
    def __init__(
        self,
        records: Sequence[Record],
        headers: Mapping[int, Header] | None,
        cutoff_seq: int | None,
        trace_path: str | None,
    ) -> None:
        self.recs = prepare(records, cutoff_seq)
        self.headers: Mapping[int, Header] = headers or {}
        self.m = Model(self.recs, self.headers)
        self.res: list[Resolved] = [None] * len(self.recs)
        self.threads: dict[tuple[int, int], ThreadMemory] = {}
        self.names: dict[tuple[int, int], str] = {}
        self.facts: list[Fact] = []
        self.freed: dict[int, dict[int, int]] = {}  # pid -> pointer -> its latest FREE
        self.stale_marks: dict[tuple[int, int], tuple[StaleData, Registration]] = {}
        self.stale_sets: set[int] = set()
        self.pooled = PooledAdds()
        self.go = go_pids(self.headers)
        # (pid, instance) -> the threads that waited on it, in Go processes only
        self.go_waiters: dict[tuple[int, int], set[int]] = {}
        # Frees of a live registration's data, decided when the registration stops (reg id ->
        # (registration, FREE index)).
        self.pending_frees: dict[int, tuple[Registration, int]] = {}
        self.m.on_stop = self._reg_stopped
        self.cur_wait: tuple[int, EpollInstance, ThreadMemory] | None = None
        self.oneshots: Deliveries = {}
        self.dup_closed: dict[int, Incarnation] = {}
        self.events = 0
        self.untraced_closes: dict[int, int] = {}
        self.unattributed: dict[int, int] = {}
        self.receipts = Receipts(self.recs)
        self.cutoff = cutoff_seq
        self._tracking: dict[int, bool] = {}
        self.pids = {r.pid for r in self.recs} | set(self.headers)
        self.ctx = TimelineContext(
            self.recs,
            self.res,
            self.names,
            trace_path,
            multi_process=len(self.pids) > 1,
            dup_closed=self.dup_closed,
        )

    # -- helpers -----------------------------------------------------------------------

    def _thread(self, r: Record) -> ThreadMemory:
        key = (r.pid, r.tid)
        t = self.threads.get(key)
        if t is None:
            name = f"T{len(self.threads) + 1}"
            t = self.threads[key] = ThreadMemory(r.pid, r.tid, name)
            self.names[key] = name
        return t

    def _free_tracking(self, pid: int, *, complete: bool) -> bool:
        """Whether FREE records of ``pid`` can be trusted: to exist, and (complete) to be all
        there.  Synthetic traces without headers are taken as fully tracked."""
        key = pid if complete else -pid - 1
        v = self._tracking.get(key)
        if v is None:
            h = self.headers.get(pid)
            if h is None:
                v = not self.headers
            else:
                v = bool(h.flags & HeaderFlag.FREE_TRACKING)
                if complete:
                    v = v and not h.flags & HeaderFlag.FREE_TABLE_FULL
            self._tracking[key] = v
        return v

    # -- main loop ---------------------------------------------------------------------

    def run(self) -> None:
        recs = self.recs
        m = self.m
        forks = m.forks
        fi = 0
        next_fork = forks[0].seq if forks else _NEVER
        handlers = {
            Op.SOCKET: self._socket,
            Op.ACCEPT: self._accept,
            Op.CLOSE: self._close,
            Op.SHUTDOWN: self._shutdown,
            Op.DUP: self._dup,
            Op.EPOLL_CREATE: self._epoll_create,
            Op.EPOLL_CTL: self._ctl,
            Op.EPOLL_WAIT: self._wait,
            Op.READ: self._io,
            Op.WRITE: self._io,
            Op.FREE: self._free,
            Op.FDNEW: self._fdnew,
            Op.CLOSE_RANGE: self._close_range,
        }
        # FORK records need no handler: the child's table is copied by the fork scheduler
        # below, as of the fork's seq_in.
        table: list[Callable[[int, Record, ThreadMemory], None] | None] = [None] * 32
        for code, handler in handlers.items():
            table[code] = handler
        event_op = Op.EPOLL_EVENT
        close_op = Op.CLOSE
        threads = self.threads
        for idx, r in enumerate(recs):
            so = r.seq_out
            while next_fork < so:
                m.fork(forks[fi])
                fi += 1
                next_fork = forks[fi].seq if fi < len(forks) else _NEVER
            op = r.op
            if op == event_op:
                self._event(idx, r)
                continue
            t = threads.get((r.pid, r.tid))
            if t is None:
                t = self._thread(r)
            if t.run and (op != close_op or r.fd != t.run[-1][0] + 1):
                self._flush_run(t)
            h = table[op] if 0 <= op < 32 else None
            if h is not None:
                h(idx, r, t)
        while fi < len(forks):
            m.fork(forks[fi])
            fi += 1
        for t in threads.values():
            self._flush_run(t)
        for reg, _ in list(self.pending_frees.values()):
            self._reg_stopped(reg, _NEVER)  # still registered at the end
        self.receipts.confirm(self.facts)
        self.facts.extend(overlaps(recs, self.res, self.oneshots))
        if self.go_waiters:
            self.facts = without_thread_ownership(self.facts, self.go_waiters)

    def model(self, lost_records: int, damaged: str | None, trace_path: str | None) -> TraceModel:
        end = 0
        if self.recs:
            end = self.cutoff if self.cutoff is not None else self.recs[-1].seq_out
        lost = max(lost_records, sum(h.lost_records for h in self.headers.values()))
        if lost:
            self.ctx.incomplete = (
                f"the trace lost {lost} records: a missing close, epoll_ctl or free could "
                "change this verdict"
            )
        elif damaged:
            self.ctx.incomplete = (
                f"the trace is incomplete ({damaged}): a missing close, epoll_ctl or "
                "free could change this verdict"
            )
        return TraceModel(
            records=self.recs,
            headers=self.headers,
            kernel=self.m,
            ctx=self.ctx,
            facts=self.facts,
            thread_names=self.names,
            pids=self.pids,
            end_seq=end,
            untraced_closes=self.untraced_closes,
            unattributed=self.unattributed,
            events=self.events,
            lost_records=lost,
            damaged=damaged,
            trace_path=trace_path,
        )

    # -- creations ---------------------------------------------------------------------

    def _created(
        self, idx: int, t: ThreadMemory, inc: Incarnation, displaced: Incarnation | None
    ) -> None:
        # The creator knows what it was handed.  A displaced incarnation was released by
        # something the shim did not see (the model ended it as untraced): count them, since
        # such a process's open fds prove nothing about leaks.
        if displaced is not None:
            self.untraced_closes[inc.pid] = self.untraced_closes.get(inc.pid, 0) + 1
        self.res[idx] = inc
        t.last_op[inc.fd] = (Op.SOCKET, inc, idx)
        t.acted[inc.fd] = Acted(inc, True)
        if t.early:
            met(t.early, inc)

    def _socket(self, idx: int, r: Record, t: ThreadMemory) -> None:
        if r.ret >= 0:
            inc, d = self.m.create(idx, r, r.ret, self.m.new_ofd(OfdKind.SOCKET), Origin.SOCKET)
            self._created(idx, t, inc, d)

    def _fdnew(self, idx: int, r: Record, t: ThreadMemory) -> None:
        if r.ret >= 0:
            inc, d = self.m.create(idx, r, r.ret, self.m.new_ofd(OfdKind.FILE), Origin.FDNEW)
            self._created(idx, t, inc, d)

    def _epoll_create(self, idx: int, r: Record, t: ThreadMemory) -> None:
        if r.ret >= 0:
            ofd = self.m.new_ofd(OfdKind.EPOLL)
            inc, d = self.m.create(idx, r, r.ret, ofd, Origin.EPOLL_CREATE)
            self._created(idx, t, inc, d)

    def _accept(self, idx: int, r: Record, t: ThreadMemory) -> None:
        if r.err == EBADF:
            self._ebadf(idx, r, t, r.fd)
            return
        self.m.resolve(r, r.fd)[0].handled_idx = idx
        if t.early:
            self._batch_step(idx, r, t, r.fd, None, False)
        if r.ret >= 0:
            ofd = self.m.new_ofd(OfdKind.SOCKET)
            inc, d = self.m.create(idx, r, r.ret, ofd, Origin.ACCEPT)
            self._created(idx, t, inc, d)

    def _dup(self, idx: int, r: Record, t: ThreadMemory) -> None:
        m = self.m
        if r.err == EBADF:
            self._ebadf(idx, r, t, r.fd)
            return
        src, _ = m.resolve(r, r.fd)
        if t.early:
            self._batch_step(idx, r, t, r.fd, src, False)
        if r.ret < 0 or r.ret == r.fd:
            return  # failed, or dup2(fd, fd): nothing changes
        if r.flags in (DupKind.DUP2, DupKind.DUP3):
            # dup2/dup3 close the target number first, atomically, without reporting it.
            cur = m.proc(r.pid).fds.get(r.ret)
            if cur is not None and cur.open:
                m.end(cur, idx, EndKind.DUP2, r.seq_in, r.seq_out, r.tid)
                self.dup_closed[idx] = cur
        inc, d = m.create(idx, r, r.ret, src.ofd, Origin.DUP)
        inc.unknown = src.unknown
        inc.parent = src
        self._created(idx, t, inc, d)

    # -- releases ----------------------------------------------------------------------

    def _close(self, idx: int, r: Record, t: ThreadMemory) -> None:
        m = self.m
        fd = r.fd
        if r.err == EBADF:
            cand = self._ebadf(idx, r, t, fd, defer=True)
            t.run.append((fd, idx, cand))
            return
        t.run.append((fd, idx, None))
        early = m.early_closes
        if idx in early:
            inc = early[idx]
            certain = True
        else:
            inc, certain = m.resolve(r, fd)
            if inc.open:
                m.end(inc, idx, EndKind.CLOSE, r.seq_in, r.seq_out, r.tid)
        self.res[idx] = inc
        if t.early:
            self._batch_step(idx, r, t, fd, inc, certain)
        proved = len(self.facts)
        if certain and not inc.unknown and not self._close_again(idx, r, t, inc):
            self._act_after_event(idx, r, t, inc)
        prev = t.last_op.get(fd)
        if certain and len(self.facts) == proved and prev is not None:
            # The thread's last call on the number was on an older incarnation: it held the
            # number for that one.  A plain close proves nothing (a closer thread handed each
            # fd through a queue only closes); an EBADF close shows it closes numbers it
            # does not hold.
            kept = prev[1]
            held = prev[0] != Op.CLOSE or self.recs[prev[2]].err == EBADF
            if held and kept is not None and kept is not inc and kept.id < inc.id:
                self.receipts.close(idx, r, inc, kept, prev[2])
        if prev is not None and prev[1] is inc and prev[0] != Op.CLOSE:
            t.owned_close[fd] = idx
            untouched = prev[0] == _EVENT and prev[2] == t.batch_idx
            if (
                (untouched or t.del_first.get(fd) == prev[2])
                and certain
                and not inc.unknown
                and inc.end_idx == idx
            ):
                # Closed (maybe after a DEL) before the thread touched it since the wait:
                # its event in this batch is still ahead, unhandled.
                t.early[fd] = EarlyClose(inc, t.batch_idx, idx)
        self._remember(idx, r, t, inc, certain)

    def _close_range(self, idx: int, r: Record, t: ThreadMemory) -> None:
        if r.ret < 0 or r.arg & CLOSE_RANGE_CLOEXEC:
            return  # CLOSE_RANGE_CLOEXEC only marks the fds close-on-exec
        m = self.m
        first, last = r.fd, r.data
        ended = []
        for fd, inc in list(m.proc(r.pid).fds.items()):
            # Numbers created while close_range ran may or may not have been swept: only the
            # ones that existed when it began are certainly closed.
            if first <= fd <= last and inc.open and inc.created_out < r.seq_in:
                m.end(inc, idx, EndKind.CLOSE_RANGE, r.seq_in, r.seq_out, r.tid)
                ended.append(inc)
        self.res[idx] = tuple(ended)

    def _flush_run(self, t: ThreadMemory) -> None:
        run = t.run
        if not run:
            return
        t.run = []
        if len(run) >= SWEEP_RUN:
            # closefrom()-style loop (typically right after fork): EBADF there is expected.
            return
        for _, _, cand in run:
            if cand is not None:
                self.facts.append(cand)

    def _ebadf(
        self, idx: int, r: Record, t: ThreadMemory, fd: int, *, defer: bool = False
    ) -> ClosedNumberUse | None:
        """A call failed with EBADF on ``fd``: a fact if the trace shows that number's last
        incarnation was closed before the call began."""
        m = self.m
        last = m.proc(r.pid).fds.get(fd)
        t.last_op[fd] = (r.op, last, idx)
        t.acted.pop(fd, None)
        if last is None or last.unknown:
            return None
        self.res[idx] = last
        if last.open:
            # EBADF proves the number was free at some point during the call: a close still in
            # flight released it (apply it now), or something the shim did not see did.
            m.apply_close_in_flight(r.pid, fd, r.seq_out)
            if last.open and last.created_out < r.seq_in:
                m.end(last, -1, EndKind.UNTRACED, r.seq_in, r.seq_in, 0)
            return None
        if not last.closed_before(r.seq_in):
            return None  # raced the close (or the release was not traced)
        fact = ClosedNumberUse(idx, fd, last)
        if not defer:
            self.facts.append(fact)
        return fact

    # -- i/o ---------------------------------------------------------------------------

    def _shutdown(self, idx: int, r: Record, t: ThreadMemory) -> None:
        if r.flags & RecordFlag.INJECTED:
            # The shim's own shutdown(SHUT_RDWR), made inside a write it fails with
            # ECONNRESET/EPIPE (a syscall fault): the harness's call on the fd the server
            # named, never the server's act.  Resolved for the timeline only.
            self.res[idx] = self.m.resolve(r, r.fd)[0]
            return
        self._io(idx, r, t)

    def _io(self, idx: int, r: Record, t: ThreadMemory) -> None:
        fd = r.fd
        err = r.err
        if err == EBADF:
            self._ebadf(idx, r, t, fd)
            return
        # An injected result (RecordFlag.INJECTED, syscall faults) is judged like a real one:
        # the call is the server's and the result is what it saw.  (The shim's own injected
        # shutdown never gets here: _shutdown.)  Compare kinds with r.kind, which drops that bit.
        if err == ENOTSOCK and (r.op == Op.SHUTDOWN or r.kind in _SOCKET_IO):
            self._enotsock(idx, r)
        # Fast path of Model.resolve: an incarnation open since before the call began.
        ps = self.m.procs.get(r.pid)
        inc = ps.fds.get(fd) if ps is not None else None
        if inc is not None and inc.open and inc.created_out < r.seq_in:
            certain = True
        else:
            inc, certain = self.m.resolve(r, fd)
        self.res[idx] = inc
        inc.handled_idx = idx
        if r.ret == 0 and err == 0 and r.op == Op.READ:
            if inc.ofd.peer_closed_idx < 0:
                inc.ofd.peer_closed_idx = idx
        elif err in (EPIPE, ECONNRESET) and inc.ofd.peer_closed_idx < 0:
            inc.ofd.peer_closed_idx = idx
        if r.op == Op.READ:
            if r.ret > 0:
                if t.spin:
                    t.spin.pop(fd, None)
            elif err == 0 or err == EAGAIN:
                what = "read() returned 0 (EOF)" if err == 0 else "read() failed with EAGAIN"
                track_spin(t.spin, self.facts, idx, inc, what)
        if t.early:
            self._batch_step(idx, r, t, fd, inc, certain)
        if certain and t.batch_data and not inc.unknown:
            self._act_after_event(idx, r, t, inc)
        # (inlined _remember)
        t.last_op[fd] = (r.op, inc, idx)
        if certain:
            a = t.acted.get(fd)
            if a is None or a.inc is not inc:
                t.acted[fd] = Acted(inc, False, [idx])
            elif not a.knows and len(a.idxs) < _ACTED_CAP:
                a.idxs.append(idx)

    def _enotsock(self, idx: int, r: Record) -> None:
        """A socket call on a number that the trace shows went from a socket to a file."""
        cur = self.m.proc(r.pid).fds.get(r.fd)
        if cur is None or not cur.open or cur.origin is not Origin.FDNEW:
            return
        prev = cur.prev
        if prev is None or prev.unknown or prev.ofd.kind is not OfdKind.SOCKET:
            return
        if not cur.created_out < r.seq_in or not prev.closed_before(cur.created_out + 1):
            return
        self.facts.append(SocketCallOnFile(idx, prev, cur))

    def _remember(
        self, idx: int, r: Record, t: ThreadMemory, inc: Incarnation, certain: bool
    ) -> None:
        fd = inc.fd
        t.last_op[fd] = (r.op, inc, idx)
        if not certain:
            return
        a = t.acted.get(fd)
        if a is None or a.inc is not inc:
            t.acted[fd] = Acted(inc, False, [idx])
        elif not a.knows and len(a.idxs) < _ACTED_CAP:
            a.idxs.append(idx)

    # -- what a thread knows about a number ---------------------------------------------

    def _close_again(self, idx: int, r: Record, t: ThreadMemory, j: Incarnation) -> bool:
        """T acted on i (number N) and closed it, another thread was handed N (j), T closes
        N again having done nothing else on N in between: T's second close was meant for i.

        A thread that only ever closes N -- a closer or logger thread handed each fd through
        a queue, which the trace cannot see -- proves nothing by closing N twice: each close
        may be a new hand-off."""
        lo = t.last_op.get(j.fd)
        if lo is None or lo[0] != Op.CLOSE or t.owned_close.get(j.fd) != lo[2]:
            return False
        i = lo[1]
        if i is None or i is j or i.unknown or i.end_idx != lo[2] or i.id > j.id:
            return False
        if j.creator_tid == t.tid or j.created_idx < 0 or j.origin is Origin.FORK:
            return False
        if j.ofd.kind is OfdKind.FILE:
            # A file, pipe or eventfd another thread opened and this one closes is how objects
            # that own an fd change threads (Apache's request pool, cleaned up by the worker
            # that finishes a response's write completion): no proof of a stale close.
            return False
        self.facts.append(CloseAgainAfterReuse(idx, i, j))
        return True

    def _act_after_event(self, idx: int, r: Record, t: ThreadMemory, j: Incarnation) -> None:
        """T got an event for i on N; i was then closed and N reused (j) by other threads;
        before its next epoll_wait, T acts on N -- i.e. on j, for i.  Or T got no event for
        j's number, but for i's data: i was closed, another thread registered j with that
        data after T's wait returned (so the event was not j's), and T acts on j -- a pool
        that hands a closed connection's state to the next one, whatever its number."""
        data: int | None = None
        b = t.batch.get(j.fd)
        if b is None:
            data = self._event_data_set_for(t, j)
            if data is None:
                return
            b = t.batch_data[data]
        i, ev_idx = b
        if i is j or i.pid != j.pid or i.unknown or i.id > j.id:
            return
        if not i.closed_before(r.seq_in) or i.end_tid == t.tid:
            return
        if j.creator_tid == t.tid or j.created_idx < 0 or not j.created_out < r.seq_in:
            return
        self.facts.append(ActAfterEvent(idx, i, ev_idx, j, t.batch_idx, data))

    def _event_data_set_for(self, t: ThreadMemory, j: Incarnation) -> int | None:
        """The data of an event of T's batch that another thread last set for j (by then
        perhaps deleted again), after T's wait returned: so the event was not j's."""
        einc = self.res[t.batch_idx]
        if not isinstance(einc, Incarnation):
            return None
        data_map = self.m.instance(einc).data_map
        wait_out = self.recs[t.batch_idx].seq_out
        for d in t.batch_data:
            owner = data_map.get(d)
            if owner is None or owner.incarnation is not j or owner.set_in <= wait_out:
                continue
            if self.recs[owner.set_idx].tid != t.tid:
                return d
        return None

    def _batch_step(
        self, idx: int, r: Record, t: ThreadMemory, fd: int, inc: Incarnation | None, certain: bool
    ) -> None:
        fact = batch_step(t.early, idx, r.op, fd, inc, certain)
        if fact is not None:
            self.facts.append(fact)

    # -- epoll -------------------------------------------------------------------------

    def _ctl(self, idx: int, r: Record, t: ThreadMemory) -> None:
        m = self.m
        epfd, fd, what = r.arg, r.fd, r.flags
        if r.err == EBADF:
            # EBADF does not say which of the two fds was bad: blame the one the model shows
            # closed, and only if the other is not closed too.
            fds = m.proc(r.pid).fds
            e, tg = fds.get(epfd), fds.get(fd)
            e_bad = e is not None and not e.open
            t_bad = tg is not None and not tg.open
            if t_bad and not e_bad:
                self._ebadf(idx, r, t, fd)
            elif e_bad and not t_bad:
                self._ebadf(idx, r, t, epfd)
            elif not e_bad and not t_bad:
                # Both look open: one of them was being closed while this call ran.
                m.apply_close_in_flight(r.pid, fd, r.seq_out)
                m.apply_close_in_flight(r.pid, epfd, r.seq_out)
            return
        einc, _ = m.resolve(r, epfd)
        inst = m.instance(einc)
        j, certain = m.resolve(r, fd)
        self.res[idx] = j
        if t.early:
            self._batch_step(idx, r, t, fd, j, certain)
        if certain and what != EPOLL_CTL_DEL and self.pooled.held:
            held = self.pooled.confirmed(j.id, inst.ofd.id, r.tid, r.data, r.ret >= 0, r.err)
            if held is not None:
                self.facts.append(held)
                self.stale_sets.add(held.idx)
        # The number went to a new file while this MOD ran (the old one closed meanwhile): it
        # re-armed the old registration, gone since, or the new one, and nothing in the trace
        # says which, so neither gets its data (events that follow name the right one).
        reused_under_mod = what == EPOLL_CTL_MOD and not certain and j.open
        if r.ret >= 0 and not reused_under_mod:
            if what in (EPOLL_CTL_ADD, EPOLL_CTL_MOD):
                stale = self._stale(idx, r, t, inst, j, certain)
                add = what == EPOLL_CTL_ADD
                reg = m.add(inst, j, idx, r) if add else m.mod(inst, j, idx, r)
                if add and certain:
                    self.receipts.add(j, idx)
                if stale is not None:
                    if stale.idx not in self.pooled.setters:
                        self.stale_sets.add(idx)
                    self.stale_marks[(inst.ofd.id, r.data)] = (stale, reg)
            elif what == EPOLL_CTL_DEL:
                m.delete(inst, j, idx, r)
                lo = t.last_op.get(fd)
                if lo is not None and lo[0] == _EVENT and lo[2] == t.batch_idx:
                    t.del_first[fd] = idx
        elif what == EPOLL_CTL_MOD and r.err == ENOENT and certain and j.open and not j.unknown:
            self._mod_enoent(idx, r, inst, j)
        if certain and t.batch_data and not j.unknown:
            self._act_after_event(idx, r, t, j)
        self._remember(idx, r, t, j, certain)

    def _stale(
        self,
        idx: int,
        r: Record,
        t: ThreadMemory,
        inst: EpollInstance,
        j: Incarnation,
        certain: bool,
    ) -> StaleData | None:
        if not certain or j.unknown or not j.open:
            return None
        d = r.data
        prior = inst.regs.get((j.ofd.id, r.fd))
        add = r.flags == EPOLL_CTL_ADD
        if not add and prior is not None and prior.data == d:
            return None
        owner = inst.owner_of(d, j, r.seq_in)
        if owner is None:
            return None
        i = owner.incarnation
        if add:
            # Re-adding a number with a value that was freed since it was set is what malloc
            # reuse looks like; without complete free tracking it cannot be told apart.  A
            # value whose last setter was itself a stale re-arm has no trustworthy owner.
            if d < SMALL_DATA or not self._free_tracking(r.pid, complete=True):
                return None
            if prior is None and self._created_by(j, r):
                # The first ADD of a connection by the thread that just created it: the value
                # is that thread's fresh choice for the new connection.  Servers that keep
                # connections in a pool (nginx: a preallocated array with a free list, and
                # the pointer's low "instance" bit as tag) hand the same value to the next
                # connection on the same number without any free().
                return None
            if owner.set_idx in self.stale_sets or owner.set_idx in self.pooled.setters:
                return None
            if owner.set_out > i.end_in:
                # The call that set d returned only after its target began closing: whoever
                # closed it may have freed d before the shim knew d was epoll data (it learns
                # that when epoll_ctl returns), so a missing FREE proves nothing.
                return None
            fr = self.freed.get(r.pid, {}).get(d)
            if fr is not None and self.recs[fr].seq_in > owner.set_in:
                return None
        # The thread's earlier ops on j, with no event for j before them: a stale re-arm
        # proves it was acting for i then too.
        a = t.acted.get(j.fd)
        acted = tuple(a.idxs) if a is not None and a.inc is j and not a.knows else ()
        fact = StaleData(idx, owner.set_idx, i, j, d, acted)
        if add and j.id not in self.receipts.added:
            # The connection's first ADD, by a thread that did not create it, of a value no
            # free() ended: a pool's recycled address (harness/trace/pooled.py) unless the
            # connection's own owner registers it too.
            self.pooled.hold(fact, inst.ofd.id, r.tid)
        else:
            self.facts.append(fact)
        return fact

    def _created_by(self, inc: Incarnation, r: Record) -> bool:
        if inc.created_idx < 0:
            return False
        created = self.recs[inc.created_idx]
        return created.pid == r.pid and created.tid == r.tid

    def _mod_enoent(self, idx: int, r: Record, inst: EpollInstance, j: Incarnation) -> None:
        """MOD failed with ENOENT because the number's new incarnation is not registered; its
        data belongs to the old one: the thread was re-arming a connection that is gone."""
        if inst.regs.get((j.ofd.id, r.fd)) is not None:
            return
        owner = inst.owner_of(r.data, j, r.seq_in)
        if owner is None:
            return
        self.facts.append(ModOfReplaced(idx, owner.set_idx, owner.incarnation, j))

    def _wait(self, idx: int, r: Record, t: ThreadMemory) -> None:
        if r.err == EBADF:
            self._ebadf(idx, r, t, r.fd)
            return
        einc, _ = self.m.resolve(r, r.fd)
        inst = self.m.instance(einc)
        self.res[idx] = einc
        if r.pid in self.go:
            self.go_waiters.setdefault((r.pid, inst.ofd.id), set()).add(r.tid)
        t.batch = {}
        t.batch_data = {}
        t.batch_idx = idx
        t.early = {}
        t.del_first = {}
        self.cur_wait = (idx, inst, t)

    def _event(self, idx: int, r: Record) -> None:
        self.events += 1
        cw = self.cur_wait
        if cw is None or self.recs[cw[0]].seq_in != r.seq_in or self.recs[cw[0]].pid != r.pid:
            return  # an event without its epoll_wait record: nothing to attribute it to
        wait_idx, inst, t = cw
        d = r.data
        reg = inst.data_map.get(d)
        if reg is not None and self._other_set_in_flight(r, reg):
            self.res[idx] = None
            return  # the data of two incarnations: the event is either's
        self.res[idx] = reg
        if reg is None:
            # An ADD/MOD of d still in flight (began before the wait returned, returned after
            # it: records are applied in seq_out order) explains the event; anything else is
            # a registration the shim never saw.
            sets = self.m.set_between(r.pid, d, -1, r.seq_out)
            if not any(self.recs[s].seq_out > r.seq_out for s in sets):
                self.unattributed[r.pid] = self.unattributed.get(r.pid, 0) + 1
            return
        i = reg.incarnation
        self.receipts.event(i, wait_idx)
        if reg.events & EPOLLONESHOT:
            self.oneshots.setdefault(reg.id, (reg, []))[1].append(wait_idx)
        if reg.events & EPOLLONESHOT and reg.armed:
            # epoll(7): with EPOLLONESHOT the item is disabled after one event until MOD.
            if self.pending_frees:
                self._reg_stopped(reg, r.seq_out)
            reg.armed = False
            reg.disarm_idx = idx
            reg.disarm_out = r.seq_out
        if r.events & (EPOLLHUP | EPOLLRDHUP) and i.ofd.peer_closed_idx < 0:
            i.ofd.peer_closed_idx = wait_idx
        if d in inst.shared:
            return  # a tag shared by live registrations: the event cannot be attributed
        if i.pid == t.pid:
            fd = i.fd
            if i.open:
                track_event_spin(t.event_spin, self.facts, wait_idx, reg, r.events, t.last_op)
            t.batch[fd] = (i, wait_idx)
            t.batch_data[d] = (i, wait_idx)
            t.last_op[fd] = (_EVENT, i, wait_idx)
            a = t.acted.get(fd)
            if a is None or a.inc is not i or not a.knows:
                t.acted[fd] = Acted(i, True)
        if i.unknown:
            return
        wait = self.recs[wait_idx]
        if i.pid == r.pid and reg.alive and i.closed_before(wait.seq_in):
            holders = tuple(h for h in self.m.holders(i.ofd) if h is not i)
            self.facts.append(EventOnClosed(wait_idx, d, i, reg.added_idx, holders))
        sm = self.stale_marks.get((inst.ofd.id, d))
        if sm is not None and sm[1] is reg and reg.data == d:
            sm[0].followups.append(wait_idx)
        freed = self.freed.get(r.pid)
        fr = freed.get(d) if freed is not None else None
        if fr is not None:
            f = self.recs[fr]
            if f.seq_out < wait.seq_in:
                resets = self.m.set_between(r.pid, d, f.seq_in, wait.seq_out)
                if all(s in self.stale_sets for s in resets):
                    self.facts.append(EventFreedData(wait_idx, d, i, fr, reg.set_idx))

    def _other_set_in_flight(self, ev: Record, reg: Registration) -> bool:
        """An ADD/MOD of the event's data for another incarnation began before the wait
        returned and returned after it (records are applied in seq_out order, so ``reg`` is
        the last one that returned).  ep_insert() queues a file that is ready at once (a fresh
        socket is writable) and wakes the waiters before epoll_ctl returns, so the event may be
        that registration's: a pool that hands a closed connection's state to the next one
        sets the same data, and the data alone cannot say which of the two it was."""
        fds = self.m.proc(ev.pid).fds
        for s in self.m.set_between(ev.pid, ev.data, min(reg.set_in, ev.seq_in) - 1, ev.seq_out):
            c = self.recs[s]
            if c.seq_out > ev.seq_out and fds.get(c.fd) is not reg.incarnation:
                return True
        return False

    # -- free --------------------------------------------------------------------------

    def _free(self, idx: int, r: Record, t: ThreadMemory) -> None:
        p = r.data
        self.freed.setdefault(r.pid, {})[p] = idx
        if not self._free_tracking(r.pid, complete=False):
            return
        for reg in self.m.live_regs_with_data(p):
            if reg.setter_pid != r.pid or reg.incarnation.unknown or reg.inst.dead:
                continue
            if reg.set_out > r.seq_in:
                continue  # set while free() ran: not a state the free began in
            if not reg.armed and reg.disarm_out < r.seq_in:
                continue  # EPOLLONESHOT already fired and was not re-armed: it cannot fire
            if reg.incarnation.ofd.refs <= 0:
                continue
            self.pending_frees.setdefault(reg.id, (reg, idx))

    def _reg_stopped(self, reg: Registration, stop: int) -> None:
        """The registration stops delivering its data at ``stop`` (DEL, last close, MOD,
        or an EPOLLONESHOT event).  A free of that data before then is a fact if an
        epoll_wait on the instance was in the kernel in between: it could have returned the
        freed pointer.  A loop that frees and then closes or DELs before any wait can run --
        a single-threaded server's usual teardown -- never exposes it."""
        pend = self.pending_frees.pop(reg.id, None)
        if pend is None:
            return
        _, fidx = pend
        f = self.recs[fidx]
        widx = self.m.wait_in_window(reg.inst, f.seq_in, stop)
        if widx < 0:
            return
        self.facts.append(FreeWhileArmed(fidx, reg.incarnation, reg.set_idx, widx))


def build(
    records: Sequence[Record],
    headers: Mapping[int, Header] | None = None,
    *,
    cutoff_seq: int | None = None,
    lost_records: int = 0,
    trace_path: str | None = None,
    damaged: str | None = None,
) -> TraceModel:
    """Walk ``records`` (all processes, sorted by seq_out, each EPOLL_EVENT right after its
    EPOLL_WAIT; sorted here if they are not) once and return the annotated model.
    ``headers`` maps pid to its file header (fork points, free tracking, lost records);
    ``cutoff_seq`` ignores calls that began after it; ``damaged`` says why a trace with no
    lost records is nevertheless incomplete."""
    # The walk allocates a few objects per record and frees none of them until the end: the
    # cyclic collector would only rescan them over and over (about 10% of the run time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        walk = _Walk(records, headers, cutoff_seq, trace_path)
        walk.run()
        return walk.model(lost_records, damaged, trace_path)
    finally:
        if enabled:
            gc.enable()
