"""memory_limit: cap the container's memory a little above what it uses, then storm it.

Under memory pressure ``malloc`` fails or the kernel reclaims the target's page cache and
socket buffers; at the cap the cgroup's OOM killer ends it.  A server with a per-connection
allocation that grows under a storm (buffers, queues) must stay within bounds or refuse work.

The fault sets the live container's memory limit (the engine's ``docker update --memory``
with ``--memory-swap`` equal to it, the same cgroup setting as ``docker run --memory``) to
what the container uses now plus ``spare_mb``, checks the cgroup says so (count
``memory_max_kib``), storms the target, and reports its peak use and the cgroup's
allocation failures and OOM kills.  An OOM kill is a ``crash`` (the engine reports the
container ``OOMKilled``); the oracle judges the rest under the limit.

The process runner has no cgroup of its own for the target, and ``RLIMIT_AS`` (the rlimit
analogue) caps address space, not memory use (thread stacks and mappings count in full):
this fault needs ``--runner=docker``.
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

MIB = 1024 * 1024
MIN_LIMIT = 8 * MIB  # the engine refuses less than 6 MiB


@dataclass(frozen=True)
class MemoryLimit(ss.StormFault):
    """Cap the container's memory at its current use + ``spare_mb``, then storm it."""

    name: ClassVar[str] = "memory_limit"
    runners: ClassVar[tuple[str, ...]] = ("docker",)
    runner_note: ClassVar[str] = (
        "the memory limit is a cgroup setting of the container (the process runner gives the "
        "target no cgroup of its own, and RLIMIT_AS caps address space, not memory use)"
    )

    spare_mb: float = param(32.0, lo=1, hi=1_000_000, doc="MiB it may use beyond its current use")
    storm_s: float = ss.storm_s_param(1.0, "storm under the limit (0: none)")
    rate_per_s: float = ss.rate_param(300.0)
    concurrency: int = ss.concurrency_param(32)

    def headline(self, at: float) -> str:
        return f"memory.max = use now + {self.spare_mb:g} MiB (no swap); storm {self.storm_s:g}s"

    def run_on(self, server: ServerControl, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(server, rng)
        report = begun.report
        pid = server.live_pids()[0]
        used = _number(pid, "memory.usage_in_bytes", "memory.current")
        if used is None:
            raise server.error(
                "cannot read the container's memory use from its cgroup",
                hint="is the memory cgroup controller enabled for containers on this host?",
            )
        limit = max(used + round(self.spare_mb * MIB), MIN_LIMIT)
        server.update_cgroup(Memory=limit, MemorySwap=limit)
        shown = _number(pid, "memory.limit_in_bytes", "memory.max")
        if shown != limit:
            raise server.error(
                f"set the memory limit to {limit} bytes, but the container's cgroup says {shown}",
            )
        report.count("memory_before_kib", used // 1024)
        report.count("memory_max_kib", limit // 1024)
        failed_before = _failures(pid)
        ooms_before = _oom_kills(pid)
        ss.add_storm(report, self._storm().run(server, begun.seed, deadline))
        if server.alive():
            peak = _number(pid, "memory.max_usage_in_bytes", "memory.peak")
            if peak is not None:
                report.count("memory_peak_kib", peak // 1024)
            report.count("charge_failures", _failures(pid) - failed_before)
            report.count("oom_kills", _oom_kills(pid) - ooms_before)
        return begun.finish()


def _number(pid: int, v1_name: str, v2_name: str) -> int | None:
    return procfs.cgroup_number(pid, "memory", v1_name, v2_name)


def _failures(pid: int) -> int:
    """Times the cgroup hit its limit (v1 ``memory.failcnt``; v2 ``memory.events`` max)."""
    v1 = _number(pid, "memory.failcnt", "memory.failcnt")
    if v1 is not None:
        return v1
    return procfs.cgroup_key(pid, "memory", "memory.events", "memory.events", "max") or 0


def _oom_kills(pid: int) -> int:
    return procfs.cgroup_key(pid, "memory", "memory.oom_control", "memory.events", "oom_kill") or 0
