"""fd_limit: a low open-file limit, a storm into EMFILE, then the target held at its limit.

A server out of file descriptors gets ``EMFILE`` from ``accept()`` while the connection stays
in the listen backlog.  If the listener is level-triggered, the next ``epoll_wait`` reports it
readable again at once: a server that just returns to its loop spins at 100% CPU until an fd
is freed (the classic EMFILE busy loop).  One that opens a second fd per connection (a timer,
a file) and forgets the connection when that fails leaks it.

The fault lowers ``RLIMIT_NOFILE`` (soft and hard) of every process of the *live* target with
``prlimit`` (root may do that to any process, containers included, so it works under both
runners) to its highest open fd + 1 + ``spare_fds``.  Then:

1. a storm of ``storm_s`` while idle connections hold all but ``slots`` of the fds it may
   still open: it runs into EMFILE again and again;
2. *hold*: idle connections fill every fd it may open, ``waiting`` more sit in the backlog;
   for ``window_s`` the target's CPU is measured: wanting more than ``max_busy`` of one core
   (above its idle baseline) is ``busy-loop``.  "Wanting" is running or runnable
   (``/proc/PID/task/*/schedstat``, all threads of all its processes), so a spinning thread
   counts as ~100% even on a loaded machine where it gets a fraction of a CPU; the report
   also gives the CPU it got (utime + stime, ``/proc/PID/stat``);
3. *after*: every client leaves; the CPU is measured again (a server that leaked its way to
   a permanent EMFILE may spin with no client at all).

The limit stays for the rest of the test, as ``docker run --ulimit nofile=N:N`` would have
set it, so the oracle's liveness and fd-leak checks judge the target under it: a fresh
request must be answered while the limit is still low, and every socket must be closed
(no CLOSE_WAIT, the socket count back to the baseline).  The report counts what the fault
saw (``nofile``, ``reached_limit``, ``*_cpu_pct``, ``close_wait_after``, ...).
"""

from __future__ import annotations

import random
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from afterclose.faults import target_base as tb
from afterclose.faults.base import FaultReport, param
from afterclose.harness import procfs
from afterclose.harness.oracle.evidence import CPU_WHILE_IDLE, Observation

if TYPE_CHECKING:
    from afterclose.harness.session import TargetRun

MAX_HELD = 4000  # idle connections the fault opens at most


@dataclass(frozen=True)
class FdLimit(tb.StormFault):
    """Lower the target's nofile limit, storm it into EMFILE, hold it there: no spin, no leak."""

    name: ClassVar[str] = "fd_limit"

    spare_fds: int = param(16, lo=1, hi=2000, doc="fds the target may open beyond its current ones")
    storm_s: float = tb.storm_s_param(1.0, "storm under the limit (0: none)")
    rate_per_s: float = tb.rate_param(400.0)
    concurrency: int = tb.concurrency_param(48)
    slots: int = param(4, lo=1, hi=1000, doc="fds left to the storm, the rest held by idle clients")
    waiting: int = param(8, lo=1, hi=1000, doc="connections left in the backlog while held")
    window_s: float = param(1.0, lo=0.1, hi=60, doc="each CPU measuring window")
    max_busy: float = param(
        0.2, lo=0.01, hi=1.0, doc="most CPU (fraction of a core) above idle with idle clients"
    )

    def headline(self, at: float) -> str:
        return (
            f"nofile = highest open fd + 1 + {self.spare_fds}; storm {self.storm_s:g}s; "
            f"hold with {self.waiting} waiting for {self.window_s:g}s; idle {self.window_s:g}s"
        )

    def run(self, run: TargetRun, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(run, rng)
        report, target = begun.report, run.target
        pids = self.live_pids(run)
        idle = tb.busy(pids, min(self.window_s, 0.5))
        report.count("idle_cpu_pct", _pct(idle.demand))

        limits = self._lower_limits(run, pids)
        nofile = limits[pids[0]]
        report.count("nofile", nofile)
        free = sum(max(limit - len(tb.open_fds(pid)), 0) for pid, limit in limits.items())
        _raise_own_nofile(min(free + self.waiting, MAX_HELD) + self.concurrency + 64)

        # 1. The storm, with idle connections taking all but `slots` of the free fds: it
        #    runs into EMFILE all the time, not only at its peaks.
        filler = min(max(free - self.slots, 0), MAX_HELD)
        with tb.idle_connections(run.host, run.port, filler) as filled:
            report.count("held_during_storm", filled)
            tb.add_storm(report, self._storm().run(run, begun.seed, deadline))

            # 2. Hold: fill the rest, and leave `waiting` more in the backlog.
            more = min(free - filled + self.waiting, MAX_HELD)
            with tb.idle_connections(run.host, run.port, more) as topped:
                held = filled + topped
                report.count("held_connections", held)
                at_limit = tb.wait_for(lambda: _at_limit(limits), timeout_s=2.0)
                report.count("reached_limit", int(at_limit))
                report.count("fds_at_hold", len(tb.open_fds(pids[0])))
                hold = tb.busy(target.host_pids(), self.window_s)
        report.count("hold_cpu_pct", _pct(hold.demand))
        report.count("hold_cpu_used_pct", _pct(hold.used))
        if hold.demand > idle.demand + self.max_busy:
            state = "at its fd limit" if at_limit else "near its fd limit"
            report.observe(
                _cpu_while_idle(
                    hold,
                    idle,
                    self,
                    f"{state} (nofile {nofile}) with {held} idle client connections, "
                    f"{self.waiting} or so of them waiting to be accepted, target {target.name!r} "
                    f"{_describe(hold, idle)}: it keeps waking up for connections it cannot "
                    "accept (EMFILE on a level-triggered listener?)",
                )
            )

        # 3. After: every client gone.  Let the target settle, measure, and ask it again.
        tb.wait_for(lambda: _settled(run), timeout_s=min(run.manifest.fd_grace_s, 3.0))
        after = tb.busy(target.host_pids(), self.window_s)
        report.count("after_cpu_pct", _pct(after.demand))
        if after.demand > idle.demand + self.max_busy:
            report.observe(
                _cpu_while_idle(
                    after,
                    idle,
                    self,
                    f"after every client left, target {target.name!r} (nofile {nofile}) "
                    f"{_describe(after, idle)}",
                )
            )
        census = procfs.census(target.host_pids(), run.port)
        report.count("socket_fds_after", census.socket_fds)
        report.count("close_wait_after", census.close_wait)
        return begun.finish()

    def _lower_limits(self, run: TargetRun, pids: list[int]) -> dict[int, int]:
        limits: dict[int, int] = {}
        for pid in pids:
            fds = tb.open_fds(pid)
            if not fds:
                continue
            limit = fds[-1] + 1 + self.spare_fds
            try:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
            except ProcessLookupError:
                continue
            except PermissionError:
                raise self.error(
                    run,
                    f"may not change the open-file limit of PID {pid}",
                    hint="prlimit on another process needs root (CAP_SYS_RESOURCE) or the "
                    "same user; run as root, or start the target with a low limit "
                    "([docker] run_args = ['--ulimit', 'nofile=64'])",
                ) from None
            limits[pid] = limit
        if not limits:
            raise self.error(run, "the target's processes are gone")
        return limits


def _cpu_while_idle(busy: tb.Busy, idle: tb.Busy, fault: FdLimit, detail: str) -> Observation:
    values = {
        "idle": idle.demand,
        "busy": busy.demand,
        "allowed": fault.max_busy,
        "window_s": busy.window_s,
    }
    return Observation(kind=CPU_WHILE_IDLE, who=fault.name, detail=detail, values=values)


def _pct(fraction: float) -> int:
    return round(fraction * 100)


def _describe(busy: tb.Busy, idle: tb.Busy) -> str:
    return (
        f"wanted {busy.demand * 100:.0f}% of a CPU for {busy.window_s:.1f} s (running or "
        f"runnable; it got {busy.used * 100:.0f}%), against {idle.demand * 100:.0f}% when idle"
    )


def _at_limit(limits: dict[int, int]) -> bool:
    return any(len(tb.open_fds(pid)) >= limit for pid, limit in limits.items())


def _settled(run: TargetRun) -> bool:
    now = procfs.census(run.target.host_pids(), run.port)
    return now.socket_fds <= run.baseline.socket_fds and now.close_wait == 0


def _raise_own_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
