"""pids_limit: cap the container's tasks (threads + processes), then storm it.

A server that starts a thread or a process per connection, or a pool that grows under load,
gets ``EAGAIN`` from ``clone()``/``fork()`` once the cgroup's ``pids.max`` is reached.  It must
refuse or queue the work, not crash, hang or leak the connection it was starting the task for.

The fault sets the live container's pids limit (the engine's ``docker update --pids-limit``,
the same cgroup setting as ``docker run --pids-limit``) to the tasks it runs now plus
``spare_pids``, checks the cgroup's ``pids.max`` says so (count ``pids_max``), storms the
target, and counts the tasks it refused (``pids.events``: ``forks_refused``).  The oracle then
judges the run under the limit: crash, liveness, fd-leak, cross-talk.

The process runner has no cgroup of its own for the target, and ``RLIMIT_NPROC`` (the rlimit
analogue) counts every process of the user and does not bind root: this fault needs
``--runner=docker``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from afterclose.faults import _server_side as ss
from afterclose.faults.base import FaultReport, param
from afterclose.harness import procfs

if TYPE_CHECKING:
    from afterclose.harness.control import ServerControl


@dataclass(frozen=True)
class PidsLimit(ss.StormFault):
    """Cap the container's tasks at those it runs now + ``spare_pids``, then storm it."""

    name: ClassVar[str] = "pids_limit"
    runners: ClassVar[tuple[str, ...]] = ("docker",)
    runner_note: ClassVar[str] = (
        "the pids limit is a cgroup setting of the container (the process runner gives the "
        "target no cgroup of its own, and RLIMIT_NPROC does not bind root)"
    )

    spare_pids: int = param(4, lo=0, hi=100_000, doc="tasks it may start beyond its current ones")
    storm_s: float = ss.storm_s_param(1.0, "storm under the limit (0: none)")
    rate_per_s: float = ss.rate_param(300.0)
    concurrency: int = ss.concurrency_param(32)

    def headline(self, at: float) -> str:
        return f"pids.max = tasks now + {self.spare_pids}; storm {self.storm_s:g}s"

    def run_on(self, server: ServerControl, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(server, rng)
        report = begun.report
        pids = server.live_pids()
        current = procfs.cgroup_number(pids[0], "pids", "pids.current", "pids.current")
        tasks = current if current is not None else procfs.task_count(pids)
        limit = tasks + self.spare_pids
        server.update_cgroup(PidsLimit=limit)
        shown = procfs.cgroup_value(pids[0], "pids", "pids.max", "pids.max")
        if shown != str(limit):
            raise server.error(
                f"set the pids limit to {limit}, but the container's cgroup says "
                f"pids.max = {shown}",
                hint="is the pids cgroup controller enabled for containers on this host?",
            )
        report.count("tasks_before", tasks)
        report.count("pids_max", limit)
        refused_before = _refused(pids[0])
        ss.add_storm(report, self._storm().run(server, begun.seed, deadline))
        report.count("forks_refused", _refused(pids[0]) - refused_before)
        after = procfs.cgroup_number(pids[0], "pids", "pids.current", "pids.current")
        if after is not None:
            report.count("tasks_after", after)
        return begun.finish()


def _refused(pid: int) -> int:
    return procfs.cgroup_key(pid, "pids", "pids.events", "pids.events", "max") or 0
