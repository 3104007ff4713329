"""Target-side faults: what the harness does to the running target itself, not through clients.

A client-side :class:`~afterclose.faults.base.Fault` only ever sees ``(endpoint, rng,
deadline)``.  A target-side fault (``fd_limit``, ``pids_limit``, ``memory_limit``, ``pause``,
``kill``) needs the running target: its host PIDs, its container, the runner that can start it
again.  So it gets the whole :class:`~afterclose.harness.session.TargetRun` instead::

    class TargetFault:
        name: ClassVar[str]                      # its module's name, as for client faults
        runners: ClassVar[tuple[str, ...]]       # where it works: "process", "docker"
        from_params(params, where) -> Self       # the same parameter machinery
        run(run: TargetRun, rng, deadline) -> FaultReport

It is registered like a client fault (one module per fault, ``faults.available()`` lists
both kinds) and ``TargetRun.run_fault`` dispatches by kind.  Limits are applied to the *live*
target (``prlimit`` for ``nofile``; the engine's container update for cgroup limits), which
is what ``docker run --ulimit/--pids-limit/--memory`` would have set at start: the target
keeps the limit for the rest of the test, so the oracle's liveness and fd-leak checks run
under it too.

What a target-side fault sees goes into its report as observations (CPU while idle, state
lost on a restart); the rules in ``harness/oracle/rules/`` judge them.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import random
import socket
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from afterclose.faults.base import Endpoint, Fault, FaultReport, _params_of, param, suggest
from afterclose.harness.errors import ScenarioError

if TYPE_CHECKING:
    from afterclose.harness.runners.base import RunningTarget
    from afterclose.harness.runners.docker import ContainerTarget
    from afterclose.harness.session import TargetRun

CLK_TCK = os.sysconf("SC_CLK_TCK")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class TargetFault(abc.ABC):
    """One kind of target-side fault: a frozen dataclass whose fields are its parameters
    (declared with :func:`~afterclose.faults.base.param`), registered under ``name``."""

    name: ClassVar[str]
    runners: ClassVar[tuple[str, ...]] = ("process", "docker")
    runner_note: ClassVar[str] = ""  # why it needs those runners, for the error

    def __post_init__(self) -> None:
        where = f"fault {self.name}"
        for key, p in _params_of(_as_fault(type(self))).items():
            p.check(getattr(self, key), where)

    @classmethod
    def describe_params(cls) -> list[str]:
        return [p.describe() for p in _params_of(_as_fault(cls)).values()]

    @classmethod
    def from_params(cls, params: Mapping[str, object], where: str) -> Self:
        known = _params_of(_as_fault(cls))
        values: dict[str, object] = {}
        for key, value in params.items():
            p = known.get(key)
            if p is None:
                match = suggest(str(key), list(known))
                raise ScenarioError(
                    f"fault {cls.name!r}: unknown parameter {key!r} (allowed: {', '.join(known)})",
                    where=where,
                    hint=f"did you mean {match!r}?" if match else f"use one of: {', '.join(known)}",
                )
            values[key] = p.check(value, where)
        return cls(**values)

    def check_runner(self, run: TargetRun) -> None:
        """ScenarioError unless the run's runner is one this fault works with."""
        runner = run.harness.runner.name
        if runner not in self.runners:
            needs = " or ".join(f"--runner={r}" for r in self.runners)
            raise ScenarioError(
                f"needs {needs}, and this run uses --runner={runner}"
                + (f": {self.runner_note}" if self.runner_note else ""),
                where=self.where(run),
                hint=f"run with --runner={self.runners[0]}, or leave {self.name} out under "
                f"--runner={runner}",
            )

    def where(self, run: TargetRun) -> str:
        """Where this fault's errors say they happened."""
        return f"{run.test_name}: fault {self.name!r}"

    def error(self, run: TargetRun, problem: str, hint: str | None = None) -> ScenarioError:
        """A ScenarioError from this fault in ``run``: ``fault 'NAME': problem``."""
        return ScenarioError(f"fault {self.name!r}: {problem}", where=self.where(run), hint=hint)

    def live_pids(self, run: TargetRun) -> list[int]:
        """The target's host PIDs; ScenarioError if it has none (it is not running)."""
        pids = run.target.host_pids()
        if not pids:
            raise self.error(run, "the target is not running")
        return pids

    @abc.abstractmethod
    def plan(self, rng: random.Random) -> list[str]:
        """The schedule (drawn from ``rng`` alone): what the fault will do, one line a step."""

    @abc.abstractmethod
    def run(self, run: TargetRun, rng: random.Random, deadline: float) -> FaultReport:
        """Do the fault to ``run.target`` until done or ``deadline`` (``time.monotonic()``)."""


def _as_fault(cls: type[Any]) -> type[Fault]:
    # The parameter machinery of client faults only needs a dataclass with a ``name``.
    return typing.cast("type[Fault]", cls)


# --------------------------------------------------------------------------- the target


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / CLK_TCK


def cpu_demand(pids: Iterable[int]) -> float | None:
    """Time the threads of ``pids`` spent running *or runnable, waiting for a CPU*, in
    seconds (``/proc/PID/task/TID/schedstat``); None if the kernel keeps no schedstats.

    On a loaded machine a spinning thread gets only its share of a CPU, but it is runnable
    all the time: its demand stays near 100% of the window however many others compete."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            except FileNotFoundError:
                continue  # the thread exited
            except OSError:
                return None
            if len(fields) < 2:
                return None
            total += int(fields[0]) + int(fields[1])
    return total / 1e9


@dataclass(frozen=True)
class Busy:
    """The target's CPU over a window, as fractions of one core: ``used`` (utime + stime) and
    ``demand`` (running or waiting to run; ``used`` where the kernel keeps no schedstats)."""

    used: float
    demand: float
    window_s: float


def busy(pids: list[int], window_s: float) -> Busy:
    """The target's CPU during the next ``window_s`` seconds."""
    used0, demand0, start = cpu_seconds(pids), cpu_demand(pids), time.monotonic()
    time.sleep(window_s)
    used1, demand1 = cpu_seconds(pids), cpu_demand(pids)
    elapsed = max(time.monotonic() - start, 1e-6)
    used = (used1 - used0) / elapsed
    if demand0 is None or demand1 is None:
        return Busy(used, used, elapsed)
    return Busy(used, max((demand1 - demand0) / elapsed, used), elapsed)


def open_fds(pid: int) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return []


def task_state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return text[text.rindex(")") + 2]


def wait_for(check: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)


def container_of(run: TargetRun) -> ContainerTarget | None:
    """The run's target as a container, or None under another runner."""
    if run.harness.runner.name != "docker":
        return None
    return typing.cast("ContainerTarget", run.target)


def cgroup_dir(pid: int, controller: str) -> tuple[Path, int] | None:
    """The folder of ``pid``'s cgroup holding ``controller``'s files, and the cgroup version
    (1: a v1 hierarchy of that controller; 2: the unified hierarchy)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified: str | None = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and not controllers:
            unified = rel
        elif controller in controllers.split(","):
            folder = CGROUP_ROOT / controllers / rel.lstrip("/")
            if folder.is_dir():
                return folder, 1
    if unified is not None:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            folder = base / unified.lstrip("/")
            # cgroup.controllers: the controllers the parent enabled for this cgroup.
            if controller in _read(folder / "cgroup.controllers").split():
                return folder, 2
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup_value(pid: int, controller: str, v1_name: str, v2_name: str) -> str | None:
    """One cgroup file of ``pid`` (``v1_name`` or ``v2_name`` by version), stripped."""
    found = cgroup_dir(pid, controller)
    if found is None:
        return None
    folder, version = found
    text = _read(folder / (v1_name if version == 1 else v2_name))
    return text.strip() or None


def cgroup_key(pid: int, controller: str, v1_name: str, v2_name: str, key: str) -> int | None:
    """A ``key value`` line of a flat-keyed cgroup file (``pids.events``, ``memory.events``)."""
    text = cgroup_value(pid, controller, v1_name, v2_name)
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def update_container(run: TargetRun, fault: str, **resources: int) -> None:
    """Change the live container's cgroup limits through the engine (``docker update``):
    ``PidsLimit``, ``Memory``, ``MemorySwap`` as the Engine API names them."""
    container = container_of(run)
    assert container is not None
    api = container.api
    url = f"{api.base_url}/v{api.api_version}/containers/{container.container_id}/update"
    response = api.post(url, json=resources, timeout=30)
    if response.status_code >= 300:
        raise ScenarioError(
            f"fault {fault!r}: the engine refused to update container "
            f"{container.container_name}: {response.text.strip()}",
            where=f"{run.test_name}: fault {fault!r}",
            hint="this engine may not support live updates of that limit (docker update)",
        )


def signal_target(target: RunningTarget, signum: int) -> None:
    """Send ``signum`` to every process of the target (host PIDs: works for both runners)."""
    for pid in target.host_pids():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


# --------------------------------------------------------------------------- clients


def endpoint_of(run: TargetRun, *, through_restarts: bool = False) -> Endpoint:
    """Where the storm connects.  ``through_restarts``: keep going while the target is down
    (the ``kill`` fault restarts it; the run's endpoint would stop at its death)."""
    endpoint = run.endpoint()
    return dataclasses.replace(endpoint, gone=None) if through_restarts else endpoint


@dataclass(frozen=True)
class Storm:
    """The client load a target-side fault puts on the target while it acts."""

    duration_s: float
    rate_per_s: float
    concurrency: int
    through_restarts: bool = False

    def fault(self) -> Fault:
        from afterclose import faults

        params = {
            "duration_s": self.duration_s,
            "rate_per_s": self.rate_per_s,
            "concurrency": self.concurrency,
        }
        return faults.create("connection_storm", params, where="target-side fault storm")

    def plan(self, seed: int) -> list[str]:
        """The storm's schedule with the rng seeded by ``seed`` (as :meth:`run` draws it)."""
        if self.duration_s <= 0:
            return []
        return [f"storm: {line}" for line in self.fault().schedule(random.Random(seed))]

    def run(self, run: TargetRun, seed: int, deadline: float) -> FaultReport:
        if self.duration_s <= 0:
            return FaultReport("connection_storm")
        endpoint = endpoint_of(run, through_restarts=self.through_restarts)
        return self.fault().run(endpoint, random.Random(seed), deadline)


def add_storm(report: FaultReport, storm: FaultReport) -> None:
    """Count what the storm's clients did and saw into ``report`` (its schedule is already in
    the fault's own, prefixed ``storm:``)."""
    storm.schedule = []
    name = report.fault
    report.merge(storm)
    report.fault = name


class Background:
    """A storm on a thread, so the fault can act on the target meanwhile."""

    def __init__(self, storm: Storm, run: TargetRun, seed: int, deadline: float) -> None:
        self.result: FaultReport | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(
            target=self._work,
            args=(storm, run, seed, deadline),
            name="target-fault-storm",
            daemon=True,
        )
        self._thread.start()

    def _work(self, storm: Storm, run: TargetRun, seed: int, deadline: float) -> None:
        try:
            self.result = storm.run(run, seed, deadline)
        except BaseException as exc:  # re-raised in join()
            self.error = exc

    def join(self, deadline: float) -> FaultReport:
        self._thread.join(max(deadline + 2.0 - time.monotonic(), 0.1))
        if self.error is not None:
            raise self.error
        return self.result or FaultReport("connection_storm")


def storm_s_param(default: float, doc: str, *, lo: float = 0) -> Any:
    """The ``storm_s`` parameter of a :class:`StormFault`: how long its storm runs."""
    return param(default, lo=lo, hi=600, doc=doc)


def rate_param(default: float) -> Any:
    """The ``rate_per_s`` parameter of a :class:`StormFault`."""
    return param(default, lo=1, hi=100_000, doc="storm: new connections per second")


def concurrency_param(default: int) -> Any:
    """The ``concurrency`` parameter of a :class:`StormFault`."""
    return param(default, lo=1, hi=1024, doc="storm: most connections open at once")


class StormFault(TargetFault):
    """A target-side fault that acts on the target while a :class:`Storm` runs against it.

    Subclasses declare the storm's parameters ``storm_s``, ``rate_per_s`` and ``concurrency``
    themselves (with :func:`storm_s_param`, :func:`rate_param`, :func:`concurrency_param`), so
    that each keeps its own defaults and its own order of parameters: a dataclass base's
    fields would come first.  ``through_restarts``: the storm goes on while the target is down.
    ``strike_within``: the fault acts at a time drawn from the schedule's rng, this range of
    fractions of ``storm_s``; None: it draws no time (``at`` is 0)."""

    storm_s: float
    rate_per_s: float
    concurrency: int
    through_restarts: ClassVar[bool] = False
    strike_within: ClassVar[tuple[float, float] | None] = None

    @abc.abstractmethod
    def headline(self, at: float) -> str:
        """The schedule's first line: what the fault does (``at`` seconds into the storm)."""

    def plan(self, rng: random.Random) -> list[str]:
        return self._schedule(*self._draw(rng))

    def begin(self, run: TargetRun, rng: random.Random) -> Underway:
        """Check the runner, draw the schedule from ``rng``, start the report and the clock."""
        self.check_runner(run)
        at, seed = self._draw(rng)
        return Underway(FaultReport(self.name, schedule=self._schedule(at, seed)), at, seed)

    def _storm(self) -> Storm:
        return Storm(self.storm_s, self.rate_per_s, self.concurrency, self.through_restarts)

    def _draw(self, rng: random.Random) -> tuple[float, int]:
        at = 0.0
        if self.strike_within is not None:
            at = round(self.storm_s * rng.uniform(*self.strike_within), 3)
        return at, rng.getrandbits(64)

    def _schedule(self, at: float, seed: int) -> list[str]:
        return [self.headline(at), *self._storm().plan(seed)]


@dataclass
class Underway:
    """A :class:`StormFault`'s run: its report (with the schedule), when it acts (``at``,
    seconds into the storm), the storm's seed, and when it began."""

    report: FaultReport
    at: float
    seed: int
    started: float = dataclasses.field(default_factory=time.monotonic)

    def finish(self) -> FaultReport:
        """The report, its ``elapsed_s`` the time since the fault began."""
        self.report.elapsed_s = time.monotonic() - self.started
        return self.report


@contextlib.contextmanager
def idle_connections(host: str, port: int, count: int, timeout_s: float = 2.0) -> Iterator[int]:
    """``count`` connections that say nothing and stay open; yields how many connected (the
    kernel completes the handshake even while the target does not accept)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                socks.append(socket.create_connection((host, port), timeout=timeout_s))
            except OSError:
                break
        yield len(socks)
    finally:
        for sock in socks:
            sock.close()
