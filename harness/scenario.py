"""Scenarios: faults composed into phases that run one after another against one target.

>>> from afterclose.harness.scenario import scenario
>>> s = (scenario("rst-storm", seed=7)
...      .phase("warm-up", "connection_storm", rate_per_s=200, duration_s=1, mix={"keepalive": 1})
...      .phase("chaos", "shutdown_race", connections=200, close_mode="rst", repeat=2)
...      .phase("together", parallel=[("reset_peer", {"phase": "after-request"}),
...                                   ("half_close", {})]))
>>> report = target.run_scenario(s)  # doctest: +SKIP

Phases run in order; the faults of a phase run at the same time, one thread each, and the phase
runs ``repeat`` times.  Every fault of every phase draws its plan from its own
``random.Random``, seeded from the scenario's seed, the phase's index, the repetition and the
fault's place in the phase: the whole client-side schedule (:meth:`Scenario.schedule`) is a
function of the scenario and its seed, however the threads interleave.

A scenario is an immutable value: :meth:`Scenario.phase` returns a new scenario, and every fault
is validated when its phase is added (errors name the scenario, ``phase[i]`` and the key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afterclose import faults
from afterclose.faults.base import Endpoint, Fault, FaultReport, suggest
from afterclose.harness.errors import ScenarioError

if TYPE_CHECKING:
    from afterclose.harness.session import TargetRun

__all__ = [
    "FaultCall",
    "Phase",
    "PhaseEvent",
    "PhaseReport",
    "Scenario",
    "ScenarioReport",
    "run_scenario",
    "scenario",
    "watch_phases",
]

# Keys of a phase that are not fault parameters (in the Python API and in scenario files).
PHASE_KEYS = ("name", "fault", "parallel", "repeat", "budget_s")
MAX_REPEAT = 1000
MAX_BUDGET_S = 3600.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
SCHEDULE_FILE = "schedule.txt"

Where = Callable[[str], str]


def _bad_name(name: object) -> bool:
    return not isinstance(name, str) or not NAME_PATTERN.match(name)


def _hint_for(key: str, options: Sequence[str], what: str) -> str:
    match = suggest(key, options)
    listing = ", ".join(options)
    return f"did you mean {match!r}? ({what}: {listing})" if match else f"{what}: {listing}"


def fault_params(name: str, where: str | None = None) -> tuple[str, ...]:
    """The parameter names of fault ``name`` (ScenarioError if there is no such fault)."""
    return tuple(f.name for f in dataclasses.fields(typing.cast(Any, faults.get(name, where))))


@dataclass(frozen=True)
class FaultCall:
    """One fault of a phase: its name, the parameters as given, and the validated fault."""

    fault: str
    params: Mapping[str, object]
    instance: Fault = field(repr=False, compare=False)

    @classmethod
    def make(
        cls, fault: object, params: Mapping[str, object], where: Where, extra_keys: Sequence[str]
    ) -> FaultCall:
        """Validate ``params`` for ``fault``; ``where(key)`` locates a key in errors.

        ``extra_keys`` are the other keys allowed where the parameters are written (the phase
        keys), offered as suggestions when a key is unknown.
        """
        if not isinstance(fault, str):
            raise ScenarioError(
                f"'fault' must be the name of a fault, got {fault!r}",
                where=where("fault"),
                hint=f"use one of: {', '.join(faults.available())}",
            )
        known = fault_params(fault, where("fault"))
        for key in params:
            if key not in known:
                raise ScenarioError(
                    f"unknown key {key!r} for fault {fault!r}",
                    where=where(key),
                    hint=_hint_for(key, [*known, *extra_keys], f"allowed keys with {fault}"),
                )
        cls_ = faults.get(fault)
        try:
            instance = cls_.from_params(params, where(""))
        except ScenarioError:
            # Name the key: the first value rejected on its own (else the error as it was, e.g.
            # a constraint between parameters).
            for key, value in params.items():
                cls_.from_params({key: value}, where(key))
            raise
        return cls(fault, dict(params), instance)


@dataclass(frozen=True)
class Phase:
    """Faults run together (``parallel``: one thread each), ``repeat`` times in a row.

    ``budget_s`` bounds the whole phase (default: the harness's per-fault budget).
    """

    name: str
    calls: tuple[FaultCall, ...]
    parallel: bool = False
    repeat: int = 1
    budget_s: float | None = None

    @property
    def faults(self) -> tuple[str, ...]:
        return tuple(c.fault for c in self.calls)


def rng_for(seed: int, phase: int, repetition: int, slot: int) -> random.Random:
    """The rng of fault ``slot`` of repetition ``repetition`` of phase ``phase``."""
    return random.Random(f"afterclose-scenario:{seed}:{phase}:{repetition}:{slot}")


def _prefix(index: int, phase: Phase, repetition: int, slot: int) -> str:
    parts = [f"phase[{index}] {phase.name}"]
    if phase.repeat > 1:
        parts.append(f"rep {repetition}")
    if phase.parallel:
        parts.append(f"parallel[{slot}]")
    parts.append(phase.calls[slot].fault)
    return " ".join(parts)


def _check_int(value: object, key: str, lo: int, hi: int | None, where: Where) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < lo
        or (hi is not None and value > hi)
    ):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ScenarioError(
            f"{key!r} must be an integer ({allowed}), got {value!r}", where=where(key)
        )
    return value


def _check_budget(value: object, where: Where) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_BUDGET_S
        or math.isnan(value)
    ):
        raise ScenarioError(
            f"'budget_s' must be a number of seconds in (0, {MAX_BUDGET_S:g}], got {value!r}",
            where=where("budget_s"),
        )
    return float(value)


def make_phase(
    index: int,
    name: object,
    fault: object,
    params: Mapping[str, object],
    *,
    parallel: object = None,
    repeat: object = 1,
    budget_s: object = None,
    where: Where,
) -> Phase:
    """Validate one phase; ``where(key)`` names the key in errors (file and ``phase[i]``).

    Either ``fault`` with its ``params``, or ``parallel``: a list of ``(fault, params)`` pairs or
    of tables ``{"fault": ..., **params}``.
    """
    if _bad_name(name):
        raise ScenarioError(
            f"phase name {name!r} is not usable",
            where=where("name"),
            hint="use letters, digits and . _ + -",
        )
    assert isinstance(name, str)
    reps = _check_int(repeat, "repeat", 1, MAX_REPEAT, where)
    budget = _check_budget(budget_s, where)
    if parallel is None:
        if fault is None:
            raise ScenarioError(
                "a phase needs 'fault' (one fault) or 'parallel' (faults run together)",
                where=where("fault"),
            )
        call = FaultCall.make(fault, params, where, PHASE_KEYS)
        return Phase(name, (call,), False, reps, budget)
    if fault is not None:
        raise ScenarioError(
            "a phase has either 'fault' or 'parallel', not both", where=where("parallel")
        )
    if params:
        key = next(iter(params))
        raise ScenarioError(
            f"unknown key {key!r} in a parallel phase "
            f"(phase keys: {', '.join(k for k in PHASE_KEYS if k != 'fault')})",
            where=where(key),
            hint=_hint_for(key, PHASE_KEYS, "phase keys")
            if suggest(key, PHASE_KEYS)
            else "a parallel phase takes the fault parameters inside each entry of 'parallel'",
        )
    if isinstance(parallel, str | bytes) or not isinstance(parallel, Sequence) or not parallel:
        raise ScenarioError(
            f"'parallel' must be a non-empty list of faults, got {parallel!r}",
            where=where("parallel"),
            hint='e.g. parallel = [{fault = "reset_peer"}, {fault = "half_close"}]',
        )
    calls = []
    for slot, entry in enumerate(parallel):

        def at(key: str, slot: int = slot) -> str:
            return where(f"parallel[{slot}]" + (f".{key}" if key else ""))

        if isinstance(entry, Mapping):
            entry_params = {k: v for k, v in entry.items() if k != "fault"}
            calls.append(FaultCall.make(entry.get("fault"), entry_params, at, ("fault",)))
        elif (
            isinstance(entry, Sequence)
            and not isinstance(entry, str)
            and len(entry) == 2
            and isinstance(entry[1], Mapping)
        ):
            calls.append(FaultCall.make(entry[0], entry[1], at, ()))
        else:
            raise ScenarioError(
                f"each entry of 'parallel' must be a table with a 'fault' key, got {entry!r}",
                where=at(""),
                hint='e.g. {fault = "reset_peer", phase = "after-request"}',
            )
    return Phase(name, tuple(calls), True, reps, budget)


@dataclass(frozen=True)
class Scenario:
    """A named sequence of phases; ``seed`` (if set) fixes the client-side schedule."""

    name: str
    seed: int | None = None
    description: str = ""
    phases: tuple[Phase, ...] = ()

    def __post_init__(self) -> None:
        if _bad_name(self.name):
            raise ScenarioError(
                f"scenario name {self.name!r} is not usable",
                hint="use letters, digits and . _ + - (it becomes the test's name)",
            )
        if self.seed is not None:
            _check_int(self.seed, "seed", 0, None, lambda key: f"scenario {self.name!r}")

    def phase(
        self,
        name: str,
        fault: str | None = None,
        /,
        *,
        parallel: Sequence[tuple[str, Mapping[str, object]] | Mapping[str, object]] | None = None,
        repeat: int = 1,
        budget_s: float | None = None,
        **params: object,
    ) -> Scenario:
        """This scenario with one more phase: ``fault`` with ``params``, or ``parallel``
        faults (``[(fault, params), ...]``), run ``repeat`` times."""
        index = len(self.phases)

        def where(key: str) -> str:
            return f"scenario {self.name!r}: phase[{index}]" + (f".{key}" if key else "")

        new = make_phase(
            index,
            name,
            fault,
            params,
            parallel=parallel,
            repeat=repeat,
            budget_s=budget_s,
            where=where,
        )
        return self.with_phase(new, where)

    def with_phase(self, phase: Phase, where: Where) -> Scenario:
        if any(p.name == phase.name for p in self.phases):
            raise ScenarioError(
                f"phase name {phase.name!r} is used twice", where=where("name"), hint="rename one"
            )
        return dataclasses.replace(self, phases=(*self.phases, phase))

    def seeded(self, seed: int | None) -> Scenario:
        return dataclasses.replace(self, seed=seed)

    def slots(self) -> Iterator[tuple[int, Phase, int, int]]:
        """``(phase index, phase, repetition, slot)`` for every fault run, in schedule order."""
        for index, phase in enumerate(self.phases):
            for rep in range(phase.repeat):
                for slot in range(len(phase.calls)):
                    yield index, phase, rep, slot

    def schedule(self, seed: int | None = None) -> list[str]:
        """The client-side schedule a run with ``seed`` (default: the scenario's) reports."""
        seed = self._seed(seed)
        lines: list[str] = []
        for index, phase, rep, slot in self.slots():
            rng = rng_for(seed, index, rep, slot)
            prefix = _prefix(index, phase, rep, slot)
            lines.extend(f"{prefix}: {line}" for line in phase.calls[slot].instance.schedule(rng))
        return lines

    def _seed(self, seed: int | None) -> int:
        if seed is not None:
            return seed
        if self.seed is None:
            raise ValueError(f"scenario {self.name!r} has no seed: pass one")
        return self.seed

    def to_toml(self, header: str = "") -> str:
        """The scenario as a scenario file (see docs/scenarios.md); loads back equal."""
        out = [f"# {line}".rstrip() for line in header.splitlines()]
        out.append(f"name = {_toml_value(self.name)}")
        if self.description:
            out.append(f"description = {_toml_value(self.description)}")
        if self.seed is not None:
            out.append(f"seed = {self.seed}")
        for phase in self.phases:
            out.extend(["", "[[phase]]", f"name = {_toml_value(phase.name)}"])
            if phase.repeat != 1:
                out.append(f"repeat = {phase.repeat}")
            if phase.budget_s is not None:
                out.append(f"budget_s = {_toml_value(phase.budget_s)}")
            if phase.parallel:
                out.append("parallel = [")
                for call in phase.calls:
                    items = {"fault": call.fault, **call.params}
                    out.append(f"    {_toml_value(items)},")
                out.append("]")
            else:
                (call,) = phase.calls
                out.append(f"fault = {_toml_value(call.fault)}")
                out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in call.params.items())
        return "\n".join(out) + "\n"


def scenario(name: str, seed: int | None = None, description: str = "") -> Scenario:
    """A new, empty scenario; add phases with :meth:`Scenario.phase`."""
    return Scenario(name, seed, description)


# --------------------------------------------------------------------------- TOML output

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class PhaseReport:
    """One phase's run: ``report`` merges ``reports`` (one per fault and repetition)."""

    index: int
    name: str
    report: FaultReport
    reports: tuple[FaultReport, ...]


@dataclass(frozen=True)
class ScenarioReport:
    """A scenario's run: the seed used, a merged report per phase and the whole schedule."""

    scenario: Scenario
    seed: int
    phases: tuple[PhaseReport, ...]
    schedule: tuple[str, ...]
    elapsed_s: float

    def __getitem__(self, key: int | str) -> FaultReport:
        """The merged report of the phase at index ``key`` or named ``key``."""
        if isinstance(key, int):
            return self.phases[key].report
        for phase in self.phases:
            if phase.name == key:
                return phase.report
        raise KeyError(key)

    @property
    def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for phase in self.phases:
            total.update(phase.report.counts)
        return total

    def digest(self) -> str:
        """A short hash of the schedule: equal digests, equal client-side schedules."""
        return schedule_digest(self.schedule)

    def headline(self) -> str:
        return (
            f"scenario {self.scenario.name!r} seed {self.seed}: {len(self.phases)} phase(s), "
            f"{len(self.schedule)} connection(s) planned, schedule {self.digest()}"
        )

    def summary(self) -> str:
        lines = [self.headline()]
        lines.extend(f"  phase[{p.index}] {p.name}: {p.report.summary()}" for p in self.phases)
        return "\n".join(lines)


def schedule_digest(lines: Sequence[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _run_slot(
    call: FaultCall, endpoint: Endpoint, rng: random.Random, deadline: float
) -> FaultReport:
    return call.instance.run(endpoint, rng, deadline)


def _run_parallel(
    phase: Phase, jobs: Sequence[tuple[int, random.Random]], endpoint: Endpoint, deadline: float
) -> list[FaultReport]:
    results: list[FaultReport | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(n: int, slot: int, rng: random.Random) -> None:
        try:
            results[n] = _run_slot(phase.calls[slot], endpoint, rng, deadline)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [
        threading.Thread(
            target=work, args=(n, slot, rng), name=f"phase-{phase.name}-{slot}", daemon=True
        )
        for n, (slot, rng) in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(deadline + 5.0 - time.monotonic(), 0.1))
    if errors:
        raise errors[0]
    out: list[FaultReport] = []
    for (slot, _), report in zip(jobs, results, strict=True):
        if report is None:  # the fault outlived its deadline by far: report it, do not hang
            report = FaultReport(phase.calls[slot].fault)
            report.count("stuck_workers")
        out.append(report)
    return out


@dataclass(frozen=True)
class PhaseEvent:
    """A phase repetition starting (``report`` None) or a whole phase done (its merged report)."""

    index: int
    phase: Phase
    repetition: int
    report: FaultReport | None = None


PhaseListener = Callable[[PhaseEvent], None]
_phase_listeners: list[PhaseListener] = []
_phase_lock = threading.Lock()


@contextlib.contextmanager
def watch_phases(listener: PhaseListener) -> Iterator[None]:
    """Call ``listener`` as the phases of any scenario start and end (the command line's
    progress), from the thread that runs the scenario."""
    with _phase_lock:
        _phase_listeners.append(listener)
    try:
        yield
    finally:
        with _phase_lock:
            _phase_listeners.remove(listener)


def _tell(event: PhaseEvent) -> None:
    with _phase_lock:
        listeners = list(_phase_listeners)
    for listener in listeners:
        listener(event)


def run_scenario(run: TargetRun, scen: Scenario, default_budget_s: float) -> ScenarioReport:
    """Run ``scen`` against ``run``'s target; its reports join ``run.reports`` (judged by the
    oracle) and its schedule ``run.schedule`` (also written to ``schedule.txt``)."""
    seed = scen.seed if scen.seed is not None else run.seed
    endpoint = run.endpoint()
    start = time.monotonic()
    phases: list[PhaseReport] = []
    schedule: list[str] = []
    for index, phase in enumerate(scen.phases):
        phase_start = time.monotonic()
        deadline = phase_start + (phase.budget_s or default_budget_s)
        reports: list[FaultReport] = []
        for rep in range(phase.repeat):
            _tell(PhaseEvent(index, phase, rep))
            jobs = [(slot, rng_for(seed, index, rep, slot)) for slot in range(len(phase.calls))]
            if phase.parallel:
                got = _run_parallel(phase, jobs, endpoint, deadline)
            else:
                got = [_run_slot(phase.calls[0], endpoint, jobs[0][1], deadline)]
            for (slot, _), report in zip(jobs, got, strict=True):
                prefix = _prefix(index, phase, rep, slot)
                schedule.extend(f"{prefix}: {line}" for line in report.schedule)
            reports.extend(got)
            run.reports.extend(got)
        merged = FaultReport("")
        for report in reports:
            merged.merge(report)
        merged.elapsed_s = time.monotonic() - phase_start
        phases.append(PhaseReport(index, phase.name, merged, tuple(reports)))
        _tell(PhaseEvent(index, phase, phase.repeat - 1, merged))
    result = ScenarioReport(scen, seed, tuple(phases), tuple(schedule), time.monotonic() - start)
    run.schedule.extend(schedule)
    _write_schedule(run.workdir, result)
    return result


def _write_schedule(workdir: Path, result: ScenarioReport) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with (workdir / SCHEDULE_FILE).open("a") as f:
            f.write(f"# {result.headline()}\n")
            f.writelines(f"{line}\n" for line in result.schedule)
    except OSError:
        pass  # the schedule is a convenience copy; the run itself holds it
