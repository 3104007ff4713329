"""The fd-lifecycle model: what the kernel's fd tables and epoll instances held, per the trace.

The model is rebuilt from the records alone and only ever claims what they prove:

* An *incarnation* is one life of an fd number in one process, from the call that returned the
  number to the call that released it.  ``fd 7#3`` is the third incarnation of 7 in its
  process.  A number used by a call the shim did not see (fds 0-2, a pipe made by an
  uninstrumented path) gets an *unknown-origin* incarnation that no rule ever reports on.
* An incarnation refers to an *open file description* (OFD, the kernel's ``struct file``).
  ``dup`` and ``fork`` make new incarnations of the same OFD; the OFD dies when its last
  incarnation, in any process, is released.
* epoll(7) registers an OFD, not a number: an epitem is keyed by (file, fd) and lives until
  EPOLL_CTL_DEL or until the file's last reference is dropped ("closing a file descriptor
  does not remove it from the interest list if other file descriptors still refer to the same
  open file description").  An epoll instance is an OFD too, shared by dups and fork children.

Ordering: a record's ``seq_in``/``seq_out`` come from one global counter taken before and
after the real call, so ``a.seq_out < b.seq_in`` proves a returned before b began; overlapping
intervals prove nothing.  Records are applied in ``seq_out`` order, with one exception handled
by :meth:`Model.create`: close(2) frees the number before it returns, so another thread may be
handed the same number while the close is still in flight.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from afterclose.harness.trace.format import Header, Op, Record

EBADF = 9


class Origin(enum.Enum):
    """How an incarnation came to be."""

    SOCKET = "socket"
    ACCEPT = "accept"
    DUP = "dup"
    EPOLL_CREATE = "epoll_create"
    FDNEW = "fdnew"
    FORK = "fork"  # the child's copy of a parent's incarnation
    UNKNOWN = "unknown"  # used by a call but created by nothing the shim saw


class OfdKind(enum.Enum):
    SOCKET = "socket"
    EPOLL = "epoll"
    FILE = "file"  # known not to be a socket (FDNEW)
    UNKNOWN = "unknown"


class EndKind(enum.Enum):
    CLOSE = "close"
    DUP2 = "dup2"  # dup2/dup3 onto an open number silently closes it first
    CLOSE_RANGE = "close_range"
    UNTRACED = "untraced"  # an EBADF or a newer creation proves it ended, by nothing we saw


_NEVER = 1 << 64  # larger than any sequence number


@dataclass(eq=False, slots=True)
class OpenFile:
    """An open file description; ``refs`` counts its open incarnations in all processes."""

    id: int
    kind: OfdKind
    refs: int = 0
    incs: list[Incarnation] = field(default_factory=list)
    # Registrations (in any epoll instance) whose target is this file: they vanish with it.
    watchers: set[Registration] = field(default_factory=set)
    instance: EpollInstance | None = None
    peer_closed_idx: int = -1  # first record proving the peer went away (read 0, HUP, EPIPE)


@dataclass(eq=False, slots=True)
class Incarnation:
    id: int
    pid: int
    fd: int
    ordinal: int
    ofd: OpenFile
    origin: Origin
    created_idx: int  # record index, -1 when none (unknown origin, fork without its record)
    created_out: int  # seq_out of the creating call; 0 for unknown origin
    creator_tid: int
    unknown: bool
    prev: Incarnation | None = None  # the previous incarnation of the same number
    parent: Incarnation | None = None  # dup source or the forking parent's incarnation
    open: bool = True
    end_kind: EndKind | None = None
    end_idx: int = -1
    end_in: int = _NEVER
    end_out: int = _NEVER
    end_tid: int = 0

    @property
    def label(self) -> str:
        return f"{self.fd}#{self.ordinal}"

    @property
    def closed_by_traced_call(self) -> bool:
        return not self.open and self.end_kind is not EndKind.UNTRACED and self.end_idx >= 0

    def closed_before(self, seq: int) -> bool:
        """The release finished before ``seq`` (a later call's seq_in) and was traced."""
        return self.closed_by_traced_call and self.end_out < seq


@dataclass(eq=False, slots=True)
class Registration:
    """One epitem: (target file, fd number at ADD) in one epoll instance."""

    id: int
    inst: EpollInstance
    incarnation: Incarnation  # the incarnation named by the ADD
    fd: int
    data: int
    events: int
    setter_pid: int
    added_idx: int
    set_idx: int  # the ADD/MOD that set the current data
    set_in: int
    set_out: int
    inferred: bool = False  # MOD of a registration whose ADD the trace does not hold
    alive: bool = True
    armed: bool = True
    removed_idx: int = -1
    removed_out: int = _NEVER
    disarm_idx: int = -1
    disarm_out: int = _NEVER

    @property
    def key(self) -> tuple[int, int]:
        return (self.incarnation.ofd.id, self.fd)


@dataclass(eq=False, slots=True)
class EpollInstance:
    ofd: OpenFile
    regs: dict[tuple[int, int], Registration] = field(default_factory=dict)
    # data value -> the registration whose ADD/MOD last set it: how events are attributed.
    data_map: dict[int, Registration] = field(default_factory=dict)
    # Data values current on two live registrations at once: a tag, not an identity, so an
    # event carrying one cannot be attributed.
    shared: set[int] = field(default_factory=set)
    dead: bool = False

    def owner_of(self, data: int, j: Incarnation, seq_in: int) -> Registration | None:
        """The registration that last set ``data`` here, if it was for an older,
        closed-before-``seq_in`` incarnation of j's number in j's process."""
        if data & 0xFFFFFFFF == j.fd or data in self.shared:
            # data.fd convention: the number itself is just as right for the new incarnation.
            # epoll_data is a union and ``data.fd = fd`` writes only its low 32 bits, so the
            # high half is whatever was on the caller's stack (CPython's select.epoll does this).
            return None
        owner = self.data_map.get(data)
        if owner is None:
            return None
        i = owner.incarnation
        if i is j or i.pid != j.pid or i.fd != j.fd or i.unknown or i.id > j.id:
            return None
        if not i.closed_before(seq_in):
            return None
        return owner


@dataclass(slots=True)
class ProcessState:
    pid: int
    header: Header | None
    fds: dict[int, Incarnation] = field(default_factory=dict)  # latest incarnation per number
    counts: dict[int, int] = field(default_factory=dict)
    forked_from: int = 0


@dataclass(frozen=True, slots=True)
class ForkPoint:
    parent: int
    child: int
    seq: int  # the parent's fork seq_in: the child's table is the parent's as of then
    idx: int  # the FORK record, -1 when only the child's header tells


class Model:
    """fd tables, open files and epoll instances, updated record by record by the rules pass."""

    def __init__(
        self, records: Sequence[Record], headers: Mapping[int, Header] | None = None
    ) -> None:
        self.records = records
        self.headers: Mapping[int, Header] = headers or {}
        self.procs: dict[int, ProcessState] = {}
        self.incarnations = 0
        self.registrations = 0
        self._ofds = 0
        self.accepted: list[Incarnation] = []
        # Closes applied ahead of their seq_out (see apply_close_in_flight) -> what they ended.
        self.early_closes: dict[int, Incarnation] = {}
        # Successful closes per (pid, fd), sorted by seq_in, for the in-flight-close rule.
        self._close_idx: dict[tuple[int, int], list[int]] = {}
        self._close_seq: dict[tuple[int, int], list[int]] = {}
        self.forks: list[ForkPoint] = []
        # Successful ADD/MOD per (pid, data), sorted by seq_in: "was p set again before ...".
        self.set_idx: dict[tuple[int, int], list[int]] = {}
        self.set_seq: dict[tuple[int, int], list[int]] = {}
        self.by_data: dict[int, list[Registration]] = {}
        # epoll_wait calls per (pid, epoll fd number): indices, seq_in, running max seq_out.
        self._waits: dict[tuple[int, int], tuple[list[int], list[int], list[int], list[int]]] = {}
        # Called with (registration, seq) when a registration stops being able to deliver
        # its current data: DEL, release of its file, or a MOD.
        self.on_stop: Callable[[Registration, int], None] | None = None
        self._index()

    # -- pre-pass -------------------------------------------------------------------------

    def _index(self) -> None:
        recs = self.records
        closes: dict[tuple[int, int], list[int]] = {}
        sets: dict[tuple[int, int], list[int]] = {}
        forks: dict[int, ForkPoint] = {}
        waits: dict[tuple[int, int], list[int]] = {}
        close_op, ctl_op, fork_op, wait_op = Op.CLOSE, Op.EPOLL_CTL, Op.FORK, Op.EPOLL_WAIT
        for idx, r in enumerate(recs):
            op = r.op
            if op == close_op:
                # close(2): "the file descriptor is released even if close returns an
                # error" (EINTR, EIO) -- only EBADF means nothing was closed.
                if r.err != EBADF:
                    closes.setdefault((r.pid, r.fd), []).append(idx)
            elif op == ctl_op:
                if r.ret >= 0 and r.flags in (1, 3):
                    sets.setdefault((r.pid, r.data), []).append(idx)
            elif op == wait_op:
                if r.err != EBADF:
                    waits.setdefault((r.pid, r.fd), []).append(idx)
            elif op == fork_op and r.ret > 0:
                forks[r.ret] = ForkPoint(r.pid, r.ret, r.seq_in, idx)
        for key, idxs in closes.items():
            idxs.sort(key=lambda i: recs[i].seq_in)
            self._close_idx[key] = idxs
            self._close_seq[key] = [recs[i].seq_in for i in idxs]
        for key, idxs in sets.items():
            idxs.sort(key=lambda i: recs[i].seq_in)
            self.set_idx[key] = idxs
            self.set_seq[key] = [recs[i].seq_in for i in idxs]
        for key, idxs in waits.items():
            idxs.sort(key=lambda i: recs[i].seq_in)
            seq_in = [recs[i].seq_in for i in idxs]
            # Running maximum of seq_out (and where it is): "was any wait that began before
            # x still in the kernel at x?" is one bisect and one lookup.
            top: list[int] = []
            top_at: list[int] = []
            best, best_at = -1, -1
            for i in idxs:
                if recs[i].seq_out > best:
                    best, best_at = recs[i].seq_out, i
                top.append(best)
                top_at.append(best_at)
            self._waits[key] = (idxs, seq_in, top, top_at)
        for pid, h in self.headers.items():
            if h.fork_seq and h.ppid and pid not in forks:
                forks[pid] = ForkPoint(h.ppid, pid, h.fork_seq, -1)
        self.forks = sorted(forks.values(), key=lambda f: f.seq)

    # -- processes ------------------------------------------------------------------------

    def proc(self, pid: int) -> ProcessState:
        ps = self.procs.get(pid)
        if ps is None:
            ps = self.procs[pid] = ProcessState(pid, self.headers.get(pid))
        return ps

    def fork(self, fp: ForkPoint) -> None:
        """The child's table is a copy of the parent's at the fork: new incarnations (the
        child's own numbers) of the same open files, so every shared file gains a reference
        and, e.g., a registration of a connection outlives the parent's close of it."""
        parent = self.proc(fp.parent)
        child = self.proc(fp.child)
        child.forked_from = fp.parent
        tid = self.records[fp.idx].tid if fp.idx >= 0 else fp.parent
        for fd, inc in sorted(parent.fds.items()):
            if not inc.open or inc.fd in child.fds:
                continue
            copy = self._new_inc(child, fd, inc.ofd, Origin.FORK, fp.idx, fp.seq, tid, inc.unknown)
            copy.parent = inc

    # -- open files -----------------------------------------------------------------------

    def new_ofd(self, kind: OfdKind) -> OpenFile:
        self._ofds += 1
        ofd = OpenFile(self._ofds, kind)
        if kind is OfdKind.EPOLL:
            ofd.instance = EpollInstance(ofd)
        return ofd

    def instance(self, inc: Incarnation) -> EpollInstance:
        """The epoll instance behind an epoll fd; one is made up for an fd of unknown origin."""
        ofd = inc.ofd
        if ofd.instance is None:
            ofd.instance = EpollInstance(ofd)
            if ofd.kind is OfdKind.UNKNOWN:
                ofd.kind = OfdKind.EPOLL
        return ofd.instance

    def _new_inc(
        self,
        ps: ProcessState,
        fd: int,
        ofd: OpenFile,
        origin: Origin,
        idx: int,
        created_out: int,
        tid: int,
        unknown: bool,
    ) -> Incarnation:
        n = ps.counts.get(fd, 0) + 1
        ps.counts[fd] = n
        self.incarnations += 1
        inc = Incarnation(
            self.incarnations, ps.pid, fd, n, ofd, origin, idx, created_out, tid, unknown
        )
        inc.prev = ps.fds.get(fd)
        ps.fds[fd] = inc
        ofd.refs += 1
        ofd.incs.append(inc)
        return inc

    def create(
        self, idx: int, r: Record, fd: int, ofd: OpenFile, origin: Origin
    ) -> tuple[Incarnation, Incarnation | None]:
        """A call returned number ``fd``.  Returns the new incarnation and, if the model still
        had one open on that number, the incarnation this proves was released."""
        pid = r.pid
        self.apply_close_in_flight(pid, fd, r.seq_out)
        ps = self.proc(pid)
        cur = ps.fds.get(fd)
        displaced = None
        if cur is not None and cur.open:
            # The kernel only hands out free numbers: whatever released cur, we did not see it.
            self.end(cur, -1, EndKind.UNTRACED, r.seq_in, r.seq_in, 0)
            displaced = cur
        inc = self._new_inc(ps, fd, ofd, origin, idx, r.seq_out, r.tid, False)
        if origin is Origin.ACCEPT:
            self.accepted.append(inc)
        return inc, displaced

    def apply_close_in_flight(self, pid: int, fd: int, seq_out: int) -> None:
        """close(2) removes the number from the table (and makes it reusable) before it
        returns, so a creation that completes inside a successful close of the same number
        got the number that close released: apply that close first."""
        seqs = self._close_seq.get((pid, fd))
        if not seqs:
            return
        pos = bisect_left(seqs, seq_out) - 1
        if pos < 0:
            return
        cidx = self._close_idx[(pid, fd)][pos]
        c = self.records[cidx]
        if c.seq_out <= seq_out or cidx in self.early_closes:
            return
        cur = self.proc(pid).fds.get(fd)
        if cur is None or not cur.open or cur.created_out > c.seq_in:
            return
        self.early_closes[cidx] = cur
        self.end(cur, cidx, EndKind.CLOSE, c.seq_in, c.seq_out, c.tid)

    def unknown_inc(self, r: Record, fd: int) -> Incarnation:
        """A call succeeded on a number the model has no open incarnation for."""
        ps = self.proc(r.pid)
        return self._new_inc(ps, fd, self.new_ofd(OfdKind.UNKNOWN), Origin.UNKNOWN, -1, 0, 0, True)

    def resolve(self, r: Record, fd: int) -> tuple[Incarnation, bool]:
        """The incarnation a call that did not fail with EBADF used, and whether that is
        certain (the incarnation existed when the call began and was not released before
        the call finished)."""
        ps = self.procs.get(r.pid)
        inc = (ps if ps is not None else self.proc(r.pid)).fds.get(fd)
        if inc is not None:
            if inc.open:
                if inc.created_out < r.seq_in:
                    return inc, True
                # Created while this call ran: the call may have used the previous one.
                return inc, False
            if inc.end_out > r.seq_in:
                # Began before the release finished: it raced the close and got the old file
                # (fdget took its reference first).
                return inc, False
        return self.unknown_inc(r, fd), True

    def end(
        self, inc: Incarnation, idx: int, kind: EndKind, seq_in: int, seq_out: int, tid: int
    ) -> None:
        inc.open = False
        inc.end_kind = kind
        inc.end_idx = idx
        inc.end_in = seq_in
        inc.end_out = seq_out
        inc.end_tid = tid
        ofd = inc.ofd
        ofd.refs -= 1
        if ofd.refs <= 0:
            self._release(ofd, idx, seq_out)

    def _release(self, ofd: OpenFile, idx: int, seq_out: int) -> None:
        """The last reference to a file went away: eventpoll_release() removes every epitem
        on it, and an epoll instance itself is destroyed with all its registrations."""
        for reg in list(ofd.watchers):
            self.kill(reg, idx, seq_out)
        inst = ofd.instance
        if inst is not None:
            inst.dead = True
            for reg in list(inst.regs.values()):
                self.kill(reg, idx, seq_out)

    # -- registrations --------------------------------------------------------------------

    def kill(self, reg: Registration, idx: int, seq_out: int) -> None:
        if not reg.alive:
            return
        if self.on_stop is not None:
            self.on_stop(reg, self.records[idx].seq_in if idx >= 0 else seq_out)
        reg.alive = False
        reg.removed_idx = idx
        reg.removed_out = seq_out
        inst = reg.inst
        if inst.regs.get(reg.key) is reg:
            del inst.regs[reg.key]
        reg.incarnation.ofd.watchers.discard(reg)

    def add(
        self, inst: EpollInstance, inc: Incarnation, idx: int, r: Record, inferred: bool = False
    ) -> Registration:
        key = (inc.ofd.id, r.fd)
        old = inst.regs.get(key)
        if old is not None:
            # The kernel would have said EEXIST: a DEL or a release is missing from the trace.
            self.kill(old, idx, r.seq_out)
        self.registrations += 1
        reg = Registration(
            self.registrations,
            inst,
            inc,
            r.fd,
            r.data,
            r.events,
            r.pid,
            idx,
            idx,
            r.seq_in,
            r.seq_out,
            inferred=inferred,
        )
        inst.regs[key] = reg
        inc.ofd.watchers.add(reg)
        self._set_data(inst, reg, r.data)
        if inc.ofd.refs <= 0 or inst.dead:
            # Raced a close: the file is already gone, so is the epitem.
            self.kill(reg, idx, r.seq_out)
        return reg

    def mod(self, inst: EpollInstance, inc: Incarnation, idx: int, r: Record) -> Registration:
        reg = inst.regs.get((inc.ofd.id, r.fd))
        if reg is None:
            return self.add(inst, inc, idx, r, inferred=True)
        if self.on_stop is not None:
            self.on_stop(reg, r.seq_in)
        # EPOLL_CTL_MOD replaces data and events and re-arms a disarmed EPOLLONESHOT item.
        reg.events = r.events
        reg.armed = True
        reg.set_idx = idx
        reg.set_in = r.seq_in
        reg.set_out = r.seq_out
        reg.setter_pid = r.pid
        self._set_data(inst, reg, r.data)
        return reg

    def delete(self, inst: EpollInstance, inc: Incarnation, idx: int, r: Record) -> None:
        reg = inst.regs.get((inc.ofd.id, r.fd))
        if reg is not None:
            self.kill(reg, idx, r.seq_out)

    def _set_data(self, inst: EpollInstance, reg: Registration, data: int) -> None:
        other = inst.data_map.get(data)
        if other is not None and other is not reg and other.alive and other.data == data:
            inst.shared.add(data)
        reg.data = data
        inst.data_map[data] = reg
        self.by_data.setdefault(data, []).append(reg)

    def set_between(self, pid: int, data: int, after_in: int, before: int) -> list[int]:
        """Indices of successful ADD/MOD of ``data`` in ``pid`` with after_in < seq_in < before."""
        key = (pid, data)
        seqs = self.set_seq.get(key)
        if not seqs:
            return []
        lo = bisect_left(seqs, after_in + 1)
        hi = bisect_left(seqs, before)
        return self.set_idx[key][lo:hi]

    def live_regs_with_data(self, data: int) -> list[Registration]:
        regs = self.by_data.get(data)
        if not regs:
            return []
        keep = list({id(r): r for r in regs if r.alive and r.data == data}.values())
        self.by_data[data] = keep
        return keep

    def wait_in_window(self, inst: EpollInstance, start: int, stop: int) -> int:
        """A wait on ``inst`` that was in the kernel at some point in [start, stop): one that
        began in the window, or began before it and had not returned at ``start``.  Returns
        its record index, or -1."""
        seen: set[tuple[int, int]] = set()
        for inc in inst.ofd.incs:
            key = (inc.pid, inc.fd)
            if key in seen:
                continue
            seen.add(key)
            w = self._waits.get(key)
            if w is None:
                continue
            idxs, seq_in, top, top_at = w
            k = bisect_left(seq_in, start)
            if k < len(seq_in) and seq_in[k] < stop:
                return idxs[k]
            if k > 0 and top[k - 1] > start:
                return top_at[k - 1]
        return -1

    def holders(self, ofd: OpenFile) -> list[Incarnation]:
        return [i for i in ofd.incs if i.open]
