"""netem: delay, jitter, loss, reordering and duplication on the target's port, during a storm.

Loss and duplication make the kernel retransmit and drop duplicate segments; reordering makes
a FIN or an RST overtake the data before it; delay stretches every window between a peer's
action and the server's sight of it.  The server sees the same syscalls, in orders and with
timings it rarely meets on a clean loopback.

It needs the kernel's ``sch_netem`` (``tc qdisc ... netem``), which the host kernel here does
not carry; the kernel matrix's guests load it, so the scenario runs under ``--kernel``.  Only
the target's port is affected: a ``prio`` qdisc on ``lo`` with a fourth band, unused by the
default priority map, holds the netem qdisc, and two ``u32`` filters (source and destination
port) send the target's packets there; resets pass untouched (see ``_netem_on_port``).
``lo`` has one root qdisc for the whole network namespace, so netem faults take a
machine-wide lock and run one at a time; the fault adds its qdisc only where ``lo`` has the
kernel's default one, and removes only the one it added.
"""

from __future__ import annotations

import fcntl
import functools
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from afterclose.faults import _server_side as ss
from afterclose.faults.base import FaultReport, param
from afterclose.harness.errors import ScenarioError

if TYPE_CHECKING:
    from afterclose.harness.control import ServerControl

LOCK_PATH = Path("/run/afterclose-netem.lock")
ROOT_HANDLE = "1:"
NETEM_BAND = "1:4"


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=10, check=False)
    if check and proc.returncode != 0:
        raise ScenarioError(
            f"tc {' '.join(args)} failed: {proc.stderr.strip()}",
            where="fault netem",
            hint="netem needs root and a kernel with sch_netem (CONFIG_NET_SCH_NETEM)",
        )
    return proc


_PROBE = (
    "tc qdisc add dev lo root handle 1: prio bands 4 && "
    "tc qdisc add dev lo parent 1:4 handle 40: netem delay 1ms && "
    "tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport 1 0xffff flowid 1:4"
)


@functools.cache
def unavailable_reason() -> str | None:
    """Why netem cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "netem needs root (CAP_NET_ADMIN) to change the loopback's queueing discipline"
    for tool, package in (("tc", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"netem needs {tool} (apt-get install -y {package})"
    # The same qdiscs and filter the fault sets up, on the loopback of a throwaway network
    # namespace: whether sch_netem, sch_prio and cls_u32 are there (built in, loaded, or
    # loadable) without touching the real loopback.
    probe = subprocess.run(
        ["unshare", "--net", "sh", "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if probe.returncode == 0:
        return None
    return (
        f"tc netem is not available in this kernel ({os.uname().release}: "
        f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'tc failed'}); "
        "run under a kernel that has sch_netem, sch_prio and cls_u32, e.g. --kernel=6.1"
    )


@dataclass(frozen=True)
class Netem(ss.StormFault):
    """A storm while the target's packets are delayed, lost, reordered and duplicated."""

    name: ClassVar[str] = "netem"

    delay_ms: float = param(5.0, lo=0, hi=10_000, doc="added delay of each packet")
    jitter_ms: float = param(2.0, lo=0, hi=10_000, doc="random variation of the delay")
    loss_pct: float = param(2.0, lo=0, hi=100, doc="packets dropped")
    reorder_pct: float = param(10.0, lo=0, hi=100, doc="packets sent at once, ahead of others")
    duplicate_pct: float = param(2.0, lo=0, hi=100, doc="packets sent twice")
    storm_s: float = ss.storm_s_param(2.0, "how long the storm runs under netem", lo=0.1)
    rate_per_s: float = ss.rate_param(200.0)
    concurrency: int = ss.concurrency_param(32)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reorder_pct and not self.delay_ms:
            raise ScenarioError(
                "reorder_pct needs delay_ms > 0: netem reorders by sending some packets "
                "without the delay the others get",
                where=f"fault {self.name}",
                hint="set delay_ms (e.g. 5), or reorder_pct = 0",
            )

    def netem_args(self) -> list[str]:
        args = ["delay", f"{self.delay_ms:g}ms"]
        if self.jitter_ms:
            args.append(f"{self.jitter_ms:g}ms")
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct:g}%"]
        if self.reorder_pct:
            # netem reorders only packets it would otherwise delay: it needs a delay.
            args += ["reorder", f"{self.reorder_pct:g}%"]
        if self.duplicate_pct:
            args += ["duplicate", f"{self.duplicate_pct:g}%"]
        return args

    def headline(self, at: float) -> str:
        return f"netem {' '.join(self.netem_args())} on the target's port"

    def check_runner(self, server: ServerControl) -> None:
        """The runner's check, then whether this kernel can run netem at all."""
        super().check_runner(server)
        reason = unavailable_reason()
        if reason is not None:
            raise ScenarioError(reason, where=server.where)

    def run_on(self, server: ServerControl, rng: random.Random, deadline: float) -> FaultReport:
        begun = self.begin(server, rng)
        with _netem_on_port(server.port, self.netem_args()) as stats:
            ss.add_storm(begun.report, self._storm().run(server, begun.seed, deadline))
            for key, value in stats().items():
                begun.report.count(key, value)
        return begun.finish()


def _root_qdisc() -> list[str]:
    """The words of the loopback's root qdisc line (``qdisc KIND HANDLE root ...``), or []."""
    for line in _tc("qdisc", "show", "dev", "lo").stdout.splitlines():
        words = line.split()
        if len(words) > 3 and words[0] == "qdisc" and "root" in words:
            return words
    return []


@contextmanager
def _netem_on_port(port: int, netem: list[str]) -> Iterator[Callable[[], dict[str, int]]]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_PATH.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root = _root_qdisc()
        # The kernel's own root qdisc (noqueue on lo) has handle 0:; any other was added by
        # someone, and replacing it would change their traffic shaping.
        if root and root[2] != "0:":
            raise ScenarioError(
                f"the loopback already has a root queueing discipline ({' '.join(root[:4])}); "
                "netem would have to replace it",
                where="fault netem",
                hint="remove it if nothing needs it (tc qdisc del dev lo root), e.g. one an "
                "interrupted netem run left behind (qdisc prio 1: root)",
            )
        created = False
        try:
            _tc("qdisc", "add", "dev", "lo", "root", "handle", ROOT_HANDLE, "prio", "bands", "4")
            created = True
            _tc("qdisc", "add", "dev", "lo", "parent", NETEM_BAND, "handle", "40:", "netem", *netem)
            # Resets skip netem: TCP never retransmits a RST, so a lost one would leave the
            # server a half-open connection that only a timeout ends, and fd-leak would blame
            # any server without one.  Loopback IPv4 has no IP options: the TCP flags byte is
            # at offset 20 + 13.
            _tc(
                "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", "protocol", "6", "0xff", "match", "u8", "0x04", "0x04",
                "at", "33", "flowid", "1:1",
            )  # fmt: skip
            for direction in ("dport", "sport"):
                _tc(
                    "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "2",
                    "u32", "match", "ip", direction, str(port), "0xffff", "flowid", NETEM_BAND,
                )  # fmt: skip
            yield _stats
        finally:
            if created:
                # With its handle named, the kernel deletes the root qdisc only if it is
                # still this one (EINVAL otherwise): never someone else's.
                _tc("qdisc", "del", "dev", "lo", "root", "handle", ROOT_HANDLE, check=False)


def _stats() -> dict[str, int]:
    """Packets netem handled and dropped so far (``tc -s qdisc show``)."""
    out = _tc("-s", "qdisc", "show", "dev", "lo").stdout
    counts: dict[str, int] = {}
    block = out.split("qdisc netem", 1)
    if len(block) == 2:
        words = block[1].split()
        for i, word in enumerate(words):
            if word == "Sent" and "netem_packets" not in counts:
                counts["netem_packets"] = int(words[i + 3])
            if word.startswith("(dropped") and "netem_dropped" not in counts:
                counts["netem_dropped"] = int(words[i + 1].rstrip(","))
    return counts
