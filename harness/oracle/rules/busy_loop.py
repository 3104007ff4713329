"""busy-loop: a server thread spins.

Three kinds of evidence, each enough.  The trace shows a thread making the same empty call on
one connection over and over (``receipts.SPIN_CALLS`` reads in a row returning 0 or failing
with EAGAIN, with no data read in between), or its waits delivering the same event for one
connection ``SPIN_CALLS`` times in a row while it makes no call on it (a level-triggered
condition nobody handles: epoll_wait returns at once, again and again), in any test.  At the
end of every test, once the clients are gone, a thread of the server wants a CPU for most of
a quiet window (the probe).  Or a fault (``fd_limit``) measured the server's CPU while its
clients were idle above the allowance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from afterclose.harness import procfs
from afterclose.harness.oracle.evidence import CPU_WHILE_IDLE
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.facts import SpinningCall, SpinningEvent, TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import EPOLLERR, EPOLLHUP, epoll_events_str

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "busy-loop"
# The probe's quiet window, after every fault and client has finished.  A thread spins when it
# was running or runnable for more than SPIN_DEMAND of the window by schedstat (on a loaded
# machine a spinning thread waits for a CPU, but it always wants one) and in state R in at
# least RUNNABLE_LOOKS of the looks taken every LOOK_EVERY_S.  Both, because schedstat adds
# a wait to run_delay only when the wait ends: a thread that waited long for a CPU before the
# window and then ran once inside it shows a demand above 100% without spinning.  An idle
# server sleeps in epoll_wait: the probe ends after FIRST_LOOK_S when no thread comes near
# either mark, and looks for the whole window otherwise.
QUIET_WINDOW_S = 0.3
FIRST_LOOK_S = 0.1
LOOK_EVERY_S = 0.02
SPIN_DEMAND = 0.6
RUNNABLE_LOOKS = 0.8


@dataclass(frozen=True)
class Spinner:
    """A server thread that wanted a CPU for ``demand`` (a fraction) of the quiet window."""

    pid: int
    tid: int
    name: str
    demand: float
    window_s: float


Key = tuple[int, int]


class _Window:
    """schedstat demands at the start, and each thread's state at every look since."""

    def __init__(self, pids: list[int], before: dict[Key, float]) -> None:
        self.pids, self.before, self.start = pids, before, time.monotonic()
        self.looks, self.elapsed = 0, 0.0
        self.runnable: dict[Key, int] = {}

    def watch(self, until_s: float) -> None:
        while True:
            self.looks += 1
            for key, state in procfs.thread_states(self.pids).items():
                if state == "R":
                    self.runnable[key] = self.runnable.get(key, 0) + 1
            left = self.start + until_s - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(LOOK_EVERY_S, left))

    def marks(self, demand_share: float, runnable_share: float) -> list[tuple[Key, float]] | None:
        """The threads above both marks, with their demand; None without schedstats."""
        after = procfs.thread_demands(self.pids)
        if after is None:
            return None
        elapsed = max(time.monotonic() - self.start, 1e-6)
        self.elapsed = elapsed
        out = []
        for key, d in sorted(after.items()):
            share = (d - self.before.get(key, d)) / elapsed
            looks = self.runnable.get(key, 0) / max(self.looks, 1)
            if share > demand_share and looks >= runnable_share:
                out.append((key, share))
        return out


def probe(ev: Evidence) -> list[Spinner]:
    """The server's threads that kept wanting a CPU once everything had gone quiet."""
    if ev.server is None or ev.server.exit_status() is not None:
        return []
    pids = list(ev.server.host_pids())
    before = procfs.thread_demands(pids)
    if before is None:
        return []  # no schedstats: the trace and fd_limit's observations still decide
    window = _Window(pids, before)
    window.watch(FIRST_LOOK_S)
    near = window.marks(SPIN_DEMAND / 3, RUNNABLE_LOOKS / 2)
    if not near:
        return []
    window.watch(QUIET_WINDOW_S)
    found = window.marks(SPIN_DEMAND, RUNNABLE_LOOKS) or []
    return [
        Spinner(pid, tid, procfs.thread_name(pid, tid), min(share, 1.0), window.elapsed)
        for (pid, tid), share in found
    ]


def _spinner(s: Spinner) -> str:
    return (
        f"thread {s.name or '?'} (pid {s.pid}, tid {s.tid}) wanted a CPU {s.demand:.0%} of "
        f"the time in a quiet {s.window_s:.1f} s window after the test, with no client "
        "connected (run with the tracer to name the call it repeats)"
    )


def _run(m: TraceModel, fact: SpinningCall | SpinningEvent, what: str, between: str) -> str:
    """The summary of a spin: who repeats ``what`` on which connection, how many times in
    how long, and ``between`` (what did not happen in between)."""
    first, last = m.records[fact.first_idx], m.records[fact.last_idx]
    ms = (last.t_ns - first.t_ns) / 1e6
    return (
        f"{m.tname(first.pid, first.tid)} (tid {first.tid}) spins on {m.label(fact.inc)}: "
        f"{what} {fact.count} times in a row in {ms:.0f} ms "
        f"(seq {first.seq_in} to {last.seq_in}), {between}"
    )


def _spin(m: TraceModel, fact: SpinningCall) -> Finding:
    summary = _run(m, fact, fact.what, "with no data read in between")
    return m.finding(
        RULE,
        summary,
        fact.first_idx,
        fact.inc.fd,
        refs=(fact.inc.created_idx,),
        notes={fact.first_idx: "the spin begins"},
    )


def _unhandled(m: TraceModel, fact: SpinningEvent) -> Finding:
    summary = _run(
        m,
        fact,
        f"epoll_wait reported {epoll_events_str(fact.events)} for it",
        "and the thread made no call on it in between",
    )
    notes = {fact.first_idx: "the spin begins"}
    if not fact.mask & ~(EPOLLERR | EPOLLHUP) and fact.events & (EPOLLERR | EPOLLHUP):
        # epoll_ctl(2): EPOLLERR and EPOLLHUP are always reported, whatever the mask asks for.
        summary += (
            f"; its registration asks for no event (mask {epoll_events_str(fact.mask)}, "
            f"seq {m.records[fact.set_idx].seq_in}), yet epoll always reports EPOLLERR and "
            "EPOLLHUP: an error or hang-up nobody handles wakes every wait, and the connection "
            "is never closed"
        )
        notes[fact.set_idx] = "the interest mask becomes empty"
    return m.finding(
        RULE,
        summary,
        fact.first_idx,
        fact.inc.fd,
        refs=(fact.inc.created_idx, fact.set_idx),
        notes=notes,
    )


def find(m: TraceModel) -> list[Finding]:
    spins = [_spin(m, fact) for fact in m.of(SpinningCall)]
    return spins + [_unhandled(m, fact) for fact in m.of(SpinningEvent)]


def decide(ev: Evidence) -> list[Violation]:
    out = ev.traced(NAME)
    spinners = ev.probes.get(NAME) or []
    if spinners and not out and isinstance(spinners, list):
        out.append(Violation.of_many(NAME, [_spinner(s) for s in spinners]))
    spins = [
        o.detail
        for o in ev.observations(CPU_WHILE_IDLE)
        if o.values["busy"] > o.values["idle"] + o.values["allowed"]
    ]
    if spins:
        out.append(Violation.of_many(NAME, spins))
    return out


RULE = Rule(
    NAME,
    "a server thread spins: the same empty call (read returning 0 or EAGAIN) thousands of "
    "times in a row, waits that return the same event it never acts on thousands of times in "
    "a row, or CPU burnt while its clients were idle (e.g. on EMFILE)",
    why=(
        "nothing new arrived between these calls: the thread never closes or stops watching "
        "the connection, so it burns a core and starves the others."
    ),
    traced=find,
    decide=decide,
    probe=probe,
)
