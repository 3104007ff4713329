"""Exploration: Hypothesis generates fault sequences until one breaks the target, then shrinks it.

Each example is a :class:`~afterclose.harness.scenario.Scenario` drawn from a bounded space
(1..``max_phases`` phases of one fault or two in parallel, every parameter within
:data:`LIMITS`, and a seed).  It runs on a freshly started target (``Harness.start``), judged by
the oracle; the property is "no violation".  A race may not show on every run of the same
scenario, so an example runs up to ``runs_per_example`` times and fails if any run fails, and a
failing example that passes when Hypothesis replays it (``Flaky``) is not an error.

Every run costs a target start and a verdict (about 1.5 s), so Hypothesis' shrinker, which
mostly tries candidates that pass, gets only so far within the budget: the search has
:data:`SEARCH_SHARE` of it, and the rest goes to a greedy simplification of the smallest failure
(:func:`simpler`: drop a phase, split a parallel phase, halve a number).  The smallest failing
scenario seen that fails again (``verify_runs``) is written as a scenario file (see
docs/scenarios.md) the user can commit as a regression test.

Generation is seeded by the fault seed (``--seed``), uses no example database unless one is
shared (``--db``, see harness/campaign/shared_db.py) and is bounded by ``max_examples`` and
``budget_s`` (once spent, examples pass without running, which ends the
search and the shrinking; verifying the result takes a few runs more).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import Phase as HPhase
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import Flaky

from afterclose import faults
from afterclose.faults.base import Spec
from afterclose.harness import replay
from afterclose.harness.errors import AftercloseError
from afterclose.harness.interrupts import Interrupts
from afterclose.harness.scenario import Scenario, make_phase, scenario
from afterclose.harness.session import Harness, Outcome, Settings, TargetRun

if TYPE_CHECKING:
    from afterclose.harness.campaign.shared_db import SharedExamples

# Upper bounds of the explored space, by parameter name (a fault's own range still applies).
LIMITS: dict[str, float] = {
    "connections": 60,
    "concurrency": 16,
    "requests_per_connection": 4,
    "max_delay_us": 1000,
    "max_connections": 200,
    "rate_per_s": 400.0,
    "duration_s": 0.5,
    "processes": 2,
}
# Parameters that choose how a fault is performed, not what it does: left at their defaults
# (connection_storm's engine: "native" on a target it cannot serve is an error, not a find).
NOT_EXPLORED = ("engine",)
INT_SPAN = 50  # parameters not in LIMITS: at most this far above their lower bound
FLOAT_SPAN = 1.0
MAX_WEIGHT = 4
SEARCH_SHARE = 0.7  # of the budget for Hypothesis; the rest simplifies what it found
VERIFY_CANDIDATES = 3  # failing examples verified, smallest first, before giving up
HEAVY_FAULTS = ("connection_storm", "idle_hold")  # drawn last: shrinking prefers the others

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExploreOptions:
    out: str = "scenarios/found-{rule}.toml"
    max_examples: int = 50
    budget_s: float = 120.0
    runs_per_example: int = 2
    verify_runs: int = 3
    faults: tuple[str, ...] = ()
    max_phases: int = 3
    max_parallel: int = 2
    max_repeat: int = 2
    shared: SharedExamples | None = None  # --db: examples shared with other workers


@dataclass(frozen=True)
class Found:
    """A failing example: the scenario, its run and the verdict."""

    scenario: Scenario
    run: TargetRun
    outcome: Outcome

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.rule for v in self.outcome.violations))


@dataclass(frozen=True)
class ExploreResult:
    seed: int
    examples: int
    runs: int
    elapsed_s: float
    found: Found | None = None
    scenario: Scenario | None = None  # as written to ``path``
    path: Path | None = None
    reproduced: int | None = None  # verification: how many of its runs failed again
    written_by: str | None = None  # --db: another worker wrote this scenario (who, where)
    unwritten: str | None = None  # why ``path`` could not be written; ``toml`` is the file
    toml: str | None = None


# --------------------------------------------------------------------------- the space


def param_strategy(name: str, kind: object, spec: Spec) -> st.SearchStrategy[object] | None:
    if kind is bool:
        return st.booleans()
    if kind in (int, float):
        lo = spec.lo if spec.lo is not None else -math.inf
        hi = spec.hi if spec.hi is not None else math.inf
        span = INT_SPAN if kind is int else FLOAT_SPAN
        # Near the lower bound, or around 0 when the range spans it (Hypothesis shrinks to 0).
        base = max(lo, min(0.0, hi)) if lo < 0 else lo
        top = max(base, min(hi, LIMITS.get(name, base + span)))
        bottom = max(lo, -span) if lo < 0 < hi else base
        if kind is int:
            return st.integers(math.ceil(bottom), math.floor(top))
        return st.floats(bottom, top, allow_nan=False).map(
            lambda x: min(max(round(x, 2), bottom), top)
        )
    if kind is str and spec.choices:
        return st.sampled_from(spec.choices)
    if typing.get_origin(kind) is not None and spec.choices:  # Mapping[str, float]: weights
        return st.dictionaries(
            st.sampled_from(spec.choices), st.integers(1, MAX_WEIGHT), min_size=1, max_size=3
        )
    return None  # a kind this space does not know: the fault's default


def fault_strategy(name: str) -> st.SearchStrategy[tuple[str, dict[str, object]]]:
    """``(name, params)`` with every parameter drawn within :data:`LIMITS`."""
    cls = faults.get(name)
    hints = typing.get_type_hints(cls)
    params: dict[str, st.SearchStrategy[object]] = {}
    for f in dataclasses.fields(typing.cast(Any, cls)):
        if f.name in NOT_EXPLORED:
            continue
        strategy = param_strategy(f.name, hints[f.name], f.metadata.get("spec", Spec()))
        if strategy is not None:
            params[f.name] = strategy
    order = list(params)  # the fault's own order, whatever order Hypothesis drew them in
    return st.fixed_dictionaries(params).map(lambda p: (name, {k: p[k] for k in order}))


def build_scenario(
    name: str, seed: int, phases: Sequence[tuple[Sequence[tuple[str, dict[str, object]]], int]]
) -> Scenario:
    s = scenario(name, seed=seed)
    for i, (calls, repeat) in enumerate(phases):

        def where(key: str, i: int = i) -> str:
            return f"explored scenario: phase[{i}]" + (f".{key}" if key else "")

        label = f"{i + 1}-" + "+".join(fault for fault, _ in calls)
        if len(calls) == 1:
            fault, params = calls[0]
            phase = make_phase(i, label, fault, params, repeat=repeat, where=where)
        else:
            phase = make_phase(i, label, None, {}, parallel=list(calls), repeat=repeat, where=where)
        s = s.with_phase(phase, where)
    return s


def scenarios(
    fault_names: Sequence[str],
    *,
    max_phases: int = 3,
    max_parallel: int = 2,
    max_repeat: int = 2,
    name: str = "explore",
) -> st.SearchStrategy[Scenario]:
    """Scenarios of 1..``max_phases`` phases over ``fault_names`` (shrinks toward the first)."""
    call = st.one_of(*(fault_strategy(n) for n in fault_names))
    phase = st.tuples(st.lists(call, min_size=1, max_size=max_parallel), st.integers(1, max_repeat))
    return st.builds(
        lambda seed, phases: build_scenario(name, seed, phases),
        st.integers(0, 2**32 - 1),
        st.lists(phase, min_size=1, max_size=max_phases),
    )


def default_faults() -> list[str]:
    names = faults.available("client")  # scenario phases run client-side faults only
    return sorted(names, key=lambda n: n in HEAVY_FAULTS)


def describe(s: Scenario) -> str:
    def call(fault: str, params: Mapping[str, object]) -> str:
        return f"{fault}(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"

    parts = []
    for p in s.phases:
        text = " + ".join(call(c.fault, c.params) for c in p.calls)
        parts.append(text + (f" x{p.repeat}" if p.repeat > 1 else ""))
    return f"seed {s.seed}: " + " ; ".join(parts)


# --------------------------------------------------------------------------- the search


class _Violation(Exception):
    """The property failed: a run of the example violated a rule."""


class _Explorer:
    def __init__(self, harness: Harness, options: ExploreOptions, log: Log) -> None:
        self.harness = harness
        self.options = options
        self.log = log
        self.base = Path(tempfile.mkdtemp(prefix=f"afterclose-explore-{harness.manifest.name}-"))
        self.start = time.monotonic()
        self.examples = 0
        self.runs = 0
        self.failures: list[Found] = []
        self.simplified = 0
        self.problem: Exception | None = None  # re-raised once Hypothesis is done

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def out_of_budget(self, share: float = SEARCH_SHARE) -> bool:
        """Past ``share`` of the budget (the search's share by default), or stopped."""
        return self.problem is not None or self.elapsed() >= self.options.budget_s * share

    def attempt(self, s: Scenario, label: str) -> Found | None:
        """Up to ``runs_per_example`` runs of ``s``: the first failing one, or None."""
        for k in range(self.options.runs_per_example):
            got = self.run_once(s, f"{label}-run{k}")
            if not got.outcome.ok:
                self.failures.append(got)
                self.log(
                    f"[{self.elapsed():6.1f}s] {label}: VIOLATION "
                    f"{', '.join(got.rules)} (run {k + 1}) - {describe(s)}"
                )
                return got
        self.log(f"[{self.elapsed():6.1f}s] {label}: ok - {describe(s)}")
        return None

    def run_once(self, s: Scenario, label: str) -> Found:
        self.runs += 1
        workdir = self.base / label
        with self.harness.start(workdir, label) as run:
            run.run_scenario(s)
            outcome = run.finish()
        if outcome.ok:
            shutil.rmtree(workdir, ignore_errors=True)
        return Found(s, run, outcome)

    def check(self, s: Scenario) -> None:
        """The property: no run of ``s`` violates a rule (up to ``runs_per_example`` runs)."""
        if self.out_of_budget():
            return
        self.examples += 1
        try:
            got = self.attempt(s, f"example {self.examples}")
        except Exception as exc:  # the harness or a fault, not the target: stop searching
            self.problem = exc
            return
        if got is not None:
            raise _Violation(", ".join(got.rules))

    def simplify(self) -> None:
        """Greedy, after Hypothesis: try simpler variants of the smallest failure (see
        :func:`simpler`) until none fails or the budget is spent."""
        if not self.failures:
            return
        best = min(self.failures, key=lambda f: size(f.scenario)).scenario
        seed = best.seed or 0
        current = spec_of(best)
        progress = True
        while progress:
            progress = False
            for candidate in simpler(current):
                if self.out_of_budget(1.0):
                    return
                self.simplified += 1
                s = build_scenario(best.name, seed, candidate)
                if self.attempt(s, f"simplify {self.simplified}") is not None:
                    current, progress = candidate, True
                    break

    def search(self, fault_names: Sequence[str], seed: int) -> None:
        o = self.options
        strategy = scenarios(
            fault_names,
            max_phases=o.max_phases,
            max_parallel=o.max_parallel,
            max_repeat=o.max_repeat,
        )

        interrupts = Interrupts()

        @search_settings(o.max_examples, o.shared, HPhase.generate, HPhase.shrink)
        @hypothesis_seed(seed)
        @given(strategy)
        def no_violation(s: Scenario) -> None:
            with interrupts.open():
                self.check(s)

        # Flaky: the shrunk example did not fail again when replayed; choose() copes.  Ctrl-C
        # lands in an example's body or after the search (see Interrupts.open).
        with interrupts.installed(), contextlib.suppress(_Violation, Flaky), interrupts.held():
            no_violation()

    def verify(self, s: Scenario, label: str) -> int:
        """How many of ``verify_runs`` fresh runs of ``s`` failed again."""
        failed = 0
        for k in range(self.options.verify_runs):
            got = self.run_once(s, f"{label}-verify{k}")
            if not got.outcome.ok:
                failed += 1
                shutil.rmtree(got.run.workdir, ignore_errors=True)
        return failed

    def choose(self) -> tuple[Found, int | None] | None:
        """The failing example to write, and how many verification runs it failed again.

        The smallest that fails again in most of its verification runs (tried smallest
        first); else the one that failed again most often; else the smallest.  A scenario the
        search saw fail once may fail one run in ten: the shrinking accepts any failure, and a
        regression test that rarely fails is worth little.  Not simply the last failure either:
        while shrinking, Hypothesis also runs larger examples (a shortened choice sequence is
        completed with random choices).
        """
        ranked: list[Found] = []
        for f in sorted(self.failures, key=lambda f: size(f.scenario)):
            if all(f.scenario.to_toml() != r.scenario.to_toml() for r in ranked):
                ranked.append(f)
        if not ranked:
            return None
        chosen: tuple[Found, int | None] = (ranked[0], None)
        runs = self.options.verify_runs
        if runs:
            chosen = (ranked[0], 0)
            for n, candidate in enumerate(ranked[:VERIFY_CANDIDATES]):
                again = self.verify(candidate.scenario, f"candidate{n}")
                self.log(
                    f"[{self.elapsed():6.1f}s] verify: failed again in {again} of {runs} "
                    f"run(s) - {describe(candidate.scenario)}"
                )
                if again > (chosen[1] or 0):
                    chosen = (candidate, again)
                if 2 * again > runs:
                    break
        for f in self.failures:
            if f is not chosen[0]:
                shutil.rmtree(f.run.workdir, ignore_errors=True)
        return chosen


def search_settings(max_examples: int, shared: SharedExamples | None, *phases: HPhase) -> settings:
    """Hypothesis' settings for a search whose every example starts and judges a target (a
    second or more each: no deadline, no health check on speed) and whose failures the
    caller reports itself.  Shared (``--db``): the run first replays what the workers saved."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=shared.database if shared is not None else None,
        derandomize=False,
        phases=((HPhase.reuse,) if shared is not None else ()) + phases,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        print_blob=False,
    )


PhaseSpecs = list[tuple[list[tuple[str, dict[str, object]]], int]]  # phases: (faults, repeat)


def spec_of(s: Scenario) -> PhaseSpecs:
    return [([(c.fault, dict(c.params)) for c in p.calls], p.repeat) for p in s.phases]


def _floor(fault: str, key: str) -> float:
    for f in dataclasses.fields(typing.cast(Any, faults.get(fault))):
        if f.name == key:
            lo = f.metadata.get("spec", Spec()).lo
            return max(lo, 0) if lo is not None else 0
    return 0


def simpler(spec: PhaseSpecs) -> Iterator[PhaseSpecs]:
    """Simpler variants of ``spec``, the boldest first: without one phase, one fault of a
    parallel phase alone, a single repetition, one integer parameter halved toward its floor."""
    if len(spec) > 1:
        for i in reversed(range(len(spec))):
            yield spec[:i] + spec[i + 1 :]
    for i, (calls, repeat) in enumerate(spec):
        if len(calls) > 1:
            for call in calls:
                yield [*spec[:i], ([call], repeat), *spec[i + 1 :]]
        if repeat > 1:
            yield [*spec[:i], (calls, 1), *spec[i + 1 :]]
    for i, (calls, repeat) in enumerate(spec):
        for j, (fault, params) in enumerate(calls):
            for key, value in params.items():
                if not isinstance(value, int) or isinstance(value, bool):
                    continue
                floor = math.ceil(_floor(fault, key))
                if value > floor:
                    smaller = {**params, key: floor + (value - floor) // 2}
                    new_calls = [*calls[:j], (fault, smaller), *calls[j + 1 :]]
                    yield [*spec[:i], (new_calls, repeat), *spec[i + 1 :]]


def size(s: Scenario) -> tuple[float, ...]:
    """How big a scenario is, to pick the smallest failing one: phases, faults, repetitions,
    then the sum of its numeric parameters (connections, concurrency, delays...)."""
    calls = [c for p in s.phases for c in p.calls]
    numbers = sum(abs(v) for c in calls for v in c.params.values() if isinstance(v, int | float))
    return (len(s.phases), len(calls), sum(p.repeat for p in s.phases), numbers, s.seed or 0)


def _out_path(template: str, rule: str) -> Path:
    path = Path(template.replace("{rule}", rule).replace("<rule>", rule))
    candidate, n = path, 1
    while candidate.exists():  # never overwrite a committed regression test
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def check_out_folder(template: str) -> None:
    """Before the search: the folder ``--out`` names (or its nearest existing parent) takes a
    new file, so a violation found after minutes is not lost to a read-only folder."""
    folder = _out_path(template, "rule").parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    hint = (
        "run from a writable folder, or give --out a writable path (--out=/tmp/found-{rule}.toml)"
    )
    if not existing.is_dir():
        raise AftercloseError(
            f"cannot write the scenario file: {existing} is not a folder",
            where=f"--out={template}",
            hint=hint,
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise AftercloseError(
            f"cannot write the scenario file into {existing.absolute()}: {exc.strerror or exc}",
            where=f"--out={template}",
            hint=hint,
        ) from None


def write_scenario(path: Path, text: str) -> str | None:
    """Write the found scenario; why not, if it could not be (the caller prints it instead)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def run_it(settings: Settings, path: Path) -> str:
    """The pytest command that runs a written scenario file: it carries its own seed."""
    return replay.command(settings, "pytest", ["--no-builtin-suite", str(path)], seed=False)


def explore(harness: Harness, options: ExploreOptions, log: Log = print) -> ExploreResult:
    """Search for a violation; write the shrunk scenario to ``options.out`` if one is found."""
    names = list(options.faults) or default_faults()
    for name in names:
        faults.get(name, where="--faults")
    check_out_folder(options.out)
    seed = harness.settings.fault_seed
    explorer = _Explorer(harness, options, log)
    log(
        f"exploring {harness.manifest.name!r} with {', '.join(names)}: seed {seed}, "
        f"up to {options.max_examples} examples x {options.runs_per_example} run(s), "
        f"budget {options.budget_s:g} s, artifacts {explorer.base}"
    )
    explorer.search(names, seed)
    if explorer.problem is not None:
        raise explorer.problem
    explorer.simplify()
    chosen = explorer.choose()
    result = ExploreResult(seed, explorer.examples, explorer.runs, explorer.elapsed())
    if chosen is None:
        # Passing runs removed their folders: nothing is left to look at.
        shutil.rmtree(explorer.base, ignore_errors=True)
        return result
    found, reproduced = chosen
    rule = found.rules[0] if found.rules else "violation"
    path = _out_path(options.out, rule)
    written = dataclasses.replace(
        found.scenario,
        name=path.stem,
        description=f"found by afterclose explore against {harness.manifest.name} "
        f"(seed {seed}): {', '.join(found.rules)}",
    )
    verified = (
        "not verified"
        if reproduced is None
        else f"failed again in {reproduced} of {options.verify_runs} fresh run(s)"
        if reproduced
        else f"did not fail again in {options.verify_runs} run(s): a rare race, run it repeatedly"
    )
    header = "\n".join(
        [
            f"Found by `{replay.command(harness.settings, 'explore')}`"
            " and shrunk (Hypothesis, then simplified).",
            f"Violated: {', '.join(found.rules)}; {verified}.",
            f"Run it: {run_it(harness.settings, path)}",
        ]
    )
    owner = options.shared.claim(describe(written), str(path)) if options.shared else None
    result = dataclasses.replace(
        result,
        elapsed_s=explorer.elapsed(),
        runs=explorer.runs,
        found=found,
        scenario=written,
        reproduced=reproduced,
    )
    if owner is not None:
        log(f"[{explorer.elapsed():6.1f}s] not written: another worker wrote it ({owner})")
        return dataclasses.replace(result, written_by=owner)
    text = written.to_toml(header)
    why = write_scenario(path, text)
    if why is not None:
        log(f"[{explorer.elapsed():6.1f}s] cannot write {path}: {why}")
        return dataclasses.replace(result, unwritten=f"cannot write {path}: {why}", toml=text)
    found.run.replay_nodeid = str(path)
    return dataclasses.replace(result, path=path)


def command(args: argparse.Namespace, settings_: Settings) -> int:
    """``afterclose explore``: 1 if a violation was found (and written), 0 if none."""
    options = ExploreOptions(
        out=args.out,
        max_examples=args.max_examples,
        budget_s=args.budget_s,
        runs_per_example=args.runs_per_example,
        verify_runs=args.verify_runs,
        faults=tuple(f for f in (args.faults or "").split(",") if f),
        max_phases=args.max_phases,
    )
    harness = Harness(settings_)
    if getattr(args, "db", None):
        from afterclose.harness.campaign.shared_db import SharedExamples, search_space

        space = search_space("explore", settings_.target, options.faults or default_faults())
        options = dataclasses.replace(
            options, shared=SharedExamples(args.db, f"{space}:{options.max_phases}")
        )
    try:
        result = explore(harness, options)
    finally:
        if options.shared is not None:
            options.shared.close()
    summary = (
        f"{result.examples} example(s), {result.runs} run(s) in {result.elapsed_s:.1f} s "
        f"(seed {result.seed})"
    )
    if result.found is not None and result.written_by is not None:
        print(f"\nviolation found: {summary}; written by another worker: {result.written_by}")
        return 1
    if result.found is not None and result.unwritten is not None:
        print(f"\nviolation found: {summary}")
        print(result.found.run.failure_message(result.found.outcome))
        print(f"\n{result.unwritten}; the scenario file, to save by hand:\n")
        print(result.toml)
        return 1
    if result.found is None or result.path is None:
        print(f"no violation: {summary}")
        return 0
    print(f"\nviolation found: {summary}")
    print(result.found.run.failure_message(result.found.outcome))
    print(f"\nwrote {result.path}:\n")
    print(result.path.read_text(encoding="utf-8"))
    print(f"run it: {run_it(settings_, result.path)}")
    return 1
