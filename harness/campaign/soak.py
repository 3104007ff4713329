"""``afterclose soak``: round after round on fresh targets until a violation or the time is up.

Rounds alternate between a test of the built-in suite (in file order, round robin) and a
scenario generated from the explorer's space (harness/explore.py), each on a freshly started
target judged by the oracle.  Every round has its own fault seed, drawn from the campaign's
seed and the round's number, so a violation is replayed by the command its report prints.

The campaign lives in a folder (``--campaign-dir``, see harness/campaign/state.py): run again
with the same folder, an interrupted campaign continues where it stopped (round counter, seed
sequence, time spent, findings).  With ``--db`` the generated scenarios come from Hypothesis'
example database on Redis, shared with every worker of the campaign
(harness/campaign/shared_db.py): the first generated round replays what other workers saved.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from afterclose.harness.campaign import state as campaign_state
from afterclose.harness.campaign.duration import format_duration, parse_duration
from afterclose.harness.campaign.junit import write_junit
from afterclose.harness.campaign.rounds import SuiteEntry, suite_entries
from afterclose.harness.campaign.shared_db import SharedExamples, add_db_argument, search_space
from afterclose.harness.campaign.state import CampaignState, RoundRecord
from afterclose.harness.campaign.status import StatusLine
from afterclose.harness.errors import AftercloseError, CampaignError
from afterclose.harness.interrupts import Interrupts
from afterclose.harness.scenario import Scenario
from afterclose.harness.session import Harness, Outcome, Settings, TargetRun

MIXES = ("both", "suite", "generated")
Log = Callable[[str], None]


class _Violation(Exception):
    """A generated round violated a rule (the property of its Hypothesis run failed)."""


class _Stop(BaseException):
    """The campaign is over.  Not an Exception: Hypothesis lets it through without taking
    the example for a failure (nor saving it, nor deleting a shared one it replays)."""


@dataclasses.dataclass(frozen=True)
class SoakOptions:
    folder: Path
    duration_s: float | None = None  # None: the campaign's own (resumed), else required
    junitxml: Path | None = None
    max_rounds: int = 0  # rounds in all, over every invocation (0: no limit)
    mix: str = "both"
    faults: tuple[str, ...] = ()
    max_phases: int = 2
    db: str | None = None


@dataclasses.dataclass
class SoakResult:
    rounds: int  # in all, this invocation's included
    ran: int  # this invocation's
    resumed: bool
    stopped: str  # "violation", "time", "rounds", "interrupted"
    finding: RoundRecord | None = None


def default_folder(target: str) -> Path:
    return Path.cwd() / f"afterclose-campaign-{Path(target).name}"


def round_seed(campaign_seed: int, number: int) -> int:
    return random.Random(f"{campaign_seed}:round:{number}").getrandbits(32)


class Soak:
    def __init__(
        self,
        harness: Harness,
        options: SoakOptions,
        stream: TextIO = sys.stderr,
        out: Log = print,
    ) -> None:
        self.harness = harness
        self.options = options
        self.out = out
        self.folder = options.folder
        self.base_settings = harness.settings
        self.shared: SharedExamples | None = None
        self.resumed = False
        self.state = self._open_folder()
        self.records = campaign_state.read_rounds(self.folder)
        self.duration_s = self._duration()
        self.suite, self.skipped = suite_entries() if options.mix != "generated" else ([], [])
        self.start = time.monotonic()
        self.spent_before = self.state.spent_s
        self.ran = 0
        self.current = ""
        self.stopped = "time"
        self.finding: RoundRecord | None = None
        self.broken: RoundRecord | None = None  # a round the harness could not run
        self.status = StatusLine(stream, self.render)
        self.interrupts = Interrupts()

    # ------------------------------------------------------------------ folder and state

    def _open_folder(self) -> CampaignState:
        target = self.harness.settings.target
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CampaignError(
                f"cannot create the campaign folder: {exc.strerror or exc}",
                where=self.folder,
                hint="pass a writable --campaign-dir",
            ) from None
        state = campaign_state.load_state(self.folder)
        if state is None:
            return CampaignState(target=target, seed=self.harness.settings.fault_seed)
        if state.target != target:
            raise CampaignError(
                f"this campaign folder holds a campaign against {state.target!r}, not {target!r}",
                where=self.folder,
                hint=f"pass --target={state.target} to continue it, or another --campaign-dir",
            )
        self.resumed = True
        return state

    def _duration(self) -> float:
        if self.options.duration_s is not None:
            return self.options.duration_s
        if self.resumed and self.state.duration_s > 0:
            return self.state.duration_s
        raise CampaignError(
            "a new campaign needs a --duration",
            where=self.folder,
            hint="e.g. --duration=8h (or 90s, 10m, 1h30m)",
        )

    def _save(self) -> None:
        self.state.spent_s = self.spent()
        self.state.duration_s = self.duration_s
        campaign_state.save_state(self.folder, self.state)

    def spent(self) -> float:
        return self.spent_before + (time.monotonic() - self.start)

    def remaining(self) -> float:
        return self.duration_s - self.spent()

    # ------------------------------------------------------------------ status

    def render(self) -> str:
        rules = sorted({rule for r in self.records for rule in r.rules}) or ["none"]
        connections = sum(r.connections for r in self.records)
        return (
            f"soak {self.harness.settings.target}: {len(self.records)} round(s) "
            f"({self.ran} now{', ' + self.current if self.current else ''}), "
            f"{connections} connection(s), rules seen: {', '.join(rules)}, "
            f"{format_duration(self.spent())} elapsed / "
            f"{format_duration(max(0.0, self.remaining()))} remaining"
        )

    # ------------------------------------------------------------------ rounds

    def next_kind(self) -> str:
        if self.options.mix != "both":
            return self.options.mix
        if not self.suite:
            return "generated"
        # Alternate, starting with a generated round: with --db it replays the shared ones.
        last = self.records[-1].kind if self.records else "suite"
        return "generated" if last == "suite" else "suite"

    def _seed(self, number: int) -> None:
        """The round's fault seed: ``pytest --fault-seed=SEED -k NAME`` replays a suite round
        (the harness mixes it with the test's name, as the plugin does)."""
        seed = round_seed(self.state.seed, number)
        self.harness.settings = dataclasses.replace(self.base_settings, fault_seed=seed)

    def _start(self, number: int, test_name: str, env: dict[str, str] | None = None) -> TargetRun:
        self._seed(number)
        workdir = self.folder / "runs" / f"round-{number:05d}"
        shutil.rmtree(workdir, ignore_errors=True)  # a round interrupted earlier
        return self.harness.start(workdir, test_name, extra_env=env)

    def _record(self, record: RoundRecord, run: TargetRun | None, began: float) -> None:
        self.interrupts.check()  # a round interrupted is not recorded
        record.elapsed_s = time.monotonic() - began
        record.workdir = str(run.workdir) if run is not None else ""
        with self.interrupts.held():
            self.records.append(record)
            self.ran += 1
            campaign_state.append_round(self.folder, record)
            if record.ok and run is not None:
                shutil.rmtree(run.workdir, ignore_errors=True)
            self._save()
            if self.options.junitxml is not None:
                write_junit(
                    self.options.junitxml,
                    f"afterclose.soak.{self.harness.settings.target}",
                    self.records,
                )
        self.status.update()

    def suite_round(self, entry: SuiteEntry) -> RoundRecord:
        number = len(self.records) + 1
        self.current = f"round {number}: {entry.name}"
        began = time.monotonic()
        name = entry.name
        self._seed(number)
        env = entry.target_env(self.harness.seed_for(name)) if entry.syscall_faults else None
        record = RoundRecord(number, name, "suite", 0, 0.0, scenario=name)

        def play(run: TargetRun) -> None:
            record.seed = run.seed
            try:
                entry.call(run)
            except AssertionError as exc:
                record.error = f"{name}: {exc or 'assertion failed'}"

        run, outcome = self._play(record, play, env)
        if run is not None and outcome is not None and record.rules:
            record.message = run.failure_message(outcome)
        self._record(record, run, began)
        return record

    def _play(
        self, record: RoundRecord, play: Callable[[TargetRun], object], env: dict[str, str] | None
    ) -> tuple[TargetRun | None, Outcome | None]:
        """Start the round's target, ``play`` the round on it and judge it into ``record``:
        the run and its outcome, or no outcome (``record.error``) if the harness could not."""
        run: TargetRun | None = None
        try:
            run = self._start(record.number, record.name, env)
            with run:
                play(run)
                outcome = run.finish()
        except AftercloseError as exc:
            self.interrupts.check()
            record.error = exc.render()
            return run, None
        self.interrupts.check()
        record.connections = sum(r.counts["connections"] for r in outcome.reports)
        record.rules = list(dict.fromkeys(v.rule for v in outcome.violations))
        return run, outcome

    def _check(self, record: RoundRecord | None = None) -> None:
        """Stop (raise :class:`_Stop`) after a failed round, or when the campaign is over."""
        self.interrupts.check()
        if record is not None and record.rules:
            self.stopped, self.finding = "violation", record
            raise _Stop
        if record is not None and record.error:
            self.broken = record
            raise _Stop
        if self.options.max_rounds and len(self.records) >= self.options.max_rounds:
            self.stopped = "rounds"
            raise _Stop
        if self.remaining() <= 0:
            self.stopped = "time"
            raise _Stop

    def next_suite_round(self) -> None:
        self._check()
        done = sum(r.kind == "suite" for r in self.records)
        self._check(self.suite_round(self.suite[done % len(self.suite)]))

    def explore_rounds(self) -> None:
        """Generated rounds (and suite rounds between them, with ``--mix=both``): one
        Hypothesis run, each example a round, until :class:`_Stop`.

        One run rather than one per round: Hypothesis' first example is always the simplest
        one, whatever the seed.  Its seed comes from the campaign's seed and the number of
        generated rounds so far, so a resumed campaign draws new scenarios.  With ``--db`` the
        run first replays the examples the workers saved.
        """
        from hypothesis import Phase as HPhase
        from hypothesis import given
        from hypothesis import seed as hypothesis_seed
        from hypothesis.errors import Flaky

        from afterclose.harness import explore

        names = list(self.options.faults) or explore.default_faults()
        strategy = explore.scenarios(names, max_phases=self.options.max_phases, name="soak")
        generated = sum(1 for r in self.records if r.kind != "suite")
        seed = random.Random(f"{self.state.seed}:generated:{generated}").getrandbits(32)
        shared = self.shared
        fetched = shared.database.fetched if shared is not None else 0
        failed: set[str] = set()
        skipped: list[str] = []
        calls = 0

        def play(s: Scenario) -> None:
            nonlocal calls
            key = explore.describe(s)
            if key in failed:  # Hypothesis replays the failure to report it: not run again
                raise _Violation(key)
            while self.options.mix == "both" and self.next_kind() == "suite":
                self.next_suite_round()
            self._check()
            calls += 1
            # What Hypothesis fetched before its first example: the shared ones it replays.
            from_store = shared is not None and calls <= shared.database.fetched - fetched
            if not from_store and not skipped and generated:
                # Hypothesis' first example is the simplest whatever the seed: a resumed
                # campaign ran it already.  A pass (a return) is not saved anywhere.
                skipped.append(key)
                return
            record = self.scenario_round(s, "shared" if from_store else "generated")
            if record.rules:
                # An Exception (not _Stop): Hypothesis saves the example for the workers.
                failed.add(key)
                self.stopped, self.finding = "violation", record
                raise _Violation(key)
            self._check(record)

        @explore.search_settings(10**9, shared, HPhase.generate)
        @hypothesis_seed(seed)
        @given(strategy)
        def soak_round(s: Scenario) -> None:
            with self.interrupts.open():
                play(s)

        while True:  # (Hypothesis returns only after max_examples)
            with contextlib.suppress(_Violation, Flaky), self.interrupts.held():
                soak_round()
            if self.finding is not None:
                raise _Stop

    def scenario_round(self, s: Scenario, kind: str) -> RoundRecord:
        from afterclose.harness import explore

        number = len(self.records) + 1
        name = f"{kind}-{number:05d}"
        self.current = f"round {number}: {kind} scenario"
        began = time.monotonic()
        record = RoundRecord(number, name, kind, s.seed or 0, 0.0, scenario=explore.describe(s))
        if kind == "shared":
            self.status.message(f"round {number}: replaying a shared example - {record.scenario}")
        run, outcome = self._play(record, lambda run: run.run_scenario(s), None)
        if run is not None and outcome is not None and record.rules:
            path = self._write_finding(s, record)
            replay = (
                f"afterclose run --target={self.harness.settings.target} {path}"
                if path is not None
                else None
            )
            record.message = run.failure_message(outcome, replay=replay)
        self._record(record, run, began)
        return record

    def _write_finding(self, s: Scenario, record: RoundRecord) -> Path | None:
        from afterclose.harness import explore

        rule = record.rules[0]
        path = self.folder / "findings" / f"round-{record.number:05d}-{rule}.toml"
        owner = self.shared.claim(explore.describe(s), str(path)) if self.shared else None
        finding: dict[str, object] = {"round": record.number, "rules": record.rules}
        if owner is not None:
            self.status.message(f"round {record.number}: another worker wrote it ({owner})")
            finding["written_by"] = owner
            self.state.findings.append(finding)
            return None
        written = dataclasses.replace(
            s,
            name=path.stem,
            description=f"found by afterclose soak against {self.harness.settings.target} "
            f"(round {record.number}): {', '.join(record.rules)}",
        )
        header = (
            f"Found by `afterclose soak` against {self.harness.settings.target} "
            f"in round {record.number}.\nViolated: {', '.join(record.rules)}."
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(written.to_toml(header), encoding="utf-8")
        finding["path"] = str(path)
        self.state.findings.append(finding)
        return path

    # ------------------------------------------------------------------ the campaign

    def announce(self) -> None:
        s = self.state
        rounds = len(self.records)
        if self.resumed:
            self.out(
                f"resuming the campaign in {self.folder} at round {rounds + 1} "
                f"(seed {s.seed}, {rounds} round(s) and {format_duration(s.spent_s)} so far, "
                f"{len(s.findings)} finding(s), {format_duration(max(0.0, self.remaining()))} "
                "remaining)"
            )
            for f in s.findings:
                self.out(f"   earlier finding: round {f.get('round')}: {f}")
        else:
            self.out(
                f"new campaign in {self.folder} against {s.target!r}: seed {s.seed}, "
                f"duration {format_duration(self.duration_s)}, "
                f"tracer {self.harness.tracer_mode}"
            )
        for name, reason in self.skipped:
            self.out(f"   not in the rotation: {name} ({reason})")

    def run(self) -> SoakResult:
        self.state.invocations += 1
        if self.options.db is not None:
            names = list(self.options.faults) or _default_faults()
            space = search_space("soak", self.state.target, names)
            self.shared = SharedExamples(
                self.options.db, f"{space}:{self.options.max_phases}", self.status.message
            )
        self.announce()
        with self.interrupts.installed():
            try:
                with self.interrupts.held():
                    self._save()
                self.status.start()
                if self.options.mix == "suite":
                    while True:
                        self.next_suite_round()
                else:
                    self.explore_rounds()
            except _Stop:
                pass
            except KeyboardInterrupt:
                self.interrupts.noted = True
            finally:
                with self.interrupts.held(then_raise=False):
                    self.status.stop()
                    self._save()
                    if self.shared is not None:
                        self.shared.close()
        if self.interrupts.noted:
            self.stopped, self.finding = "interrupted", None
        if self.broken is not None:
            raise CampaignError(
                f"round {self.broken.number} ({self.broken.name}) could not run",
                details=self.broken.error,
                hint=f"artifacts: {self.broken.workdir}; the same command continues the campaign",
            )
        return SoakResult(len(self.records), self.ran, self.resumed, self.stopped, self.finding)


def _default_faults() -> list[str]:
    from afterclose.harness import explore

    return explore.default_faults()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``afterclose soak``'s own options (the common ones, --tracer, --seed..., come from
    the command line's shared set)."""
    parser.add_argument(
        "--duration",
        default=None,
        help="how long the campaign runs in all, e.g. 90s, 10m, 8h, 1h30m "
        "(a resumed campaign keeps its own unless given)",
    )
    parser.add_argument(
        "--campaign-dir",
        default=None,
        metavar="DIR",
        help="the campaign's folder: state, findings, artifacts; run again with the same "
        "folder to continue (default: ./afterclose-campaign-TARGET)",
    )
    parser.add_argument("--junitxml", default=None, metavar="FILE", help="JUnit XML report")
    parser.add_argument(
        "--max-rounds", type=int, default=0, help="stop after this many rounds in all"
    )
    parser.add_argument(
        "--mix", default="both", choices=MIXES, help="suite tests, generated scenarios, or both"
    )
    parser.add_argument("--faults", default="", help="generated scenarios: comma-separated")
    parser.add_argument("--max-phases", type=int, default=2, help="generated scenarios")
    add_db_argument(parser)


def options_from(args: argparse.Namespace, target: str) -> SoakOptions:
    """Check every option before a target starts."""
    from afterclose.harness.campaign.shared_db import parse_db_url

    duration = parse_duration(args.duration) if args.duration is not None else None
    if args.max_rounds < 0:
        raise CampaignError(f"--max-rounds={args.max_rounds} is negative", hint="e.g. 100")
    return SoakOptions(
        folder=Path(args.campaign_dir) if args.campaign_dir else default_folder(target),
        duration_s=duration,
        junitxml=Path(args.junitxml) if args.junitxml else None,
        max_rounds=args.max_rounds,
        mix=args.mix,
        faults=tuple(f for f in args.faults.split(",") if f),
        max_phases=args.max_phases,
        db=parse_db_url(args.db) if args.db is not None else None,
    )


def command(args: argparse.Namespace, settings_: Settings) -> int:
    """``afterclose soak``: 1 if a round violated a rule, 0 if the time (or --max-rounds)
    ran out first, 130 when interrupted (the campaign continues from its folder)."""
    options = options_from(args, settings_.target)
    if options.faults:
        from afterclose import faults

        for name in options.faults:
            faults.get(name, where="--faults")
    soak = Soak(Harness(settings_), options)
    if soak.resumed and args.fault_seed is not None and args.fault_seed != soak.state.seed:
        print(
            f"note: --seed={args.fault_seed} ignored: the campaign's seed is {soak.state.seed}",
            file=sys.stderr,
        )
    result = soak.run()
    head = f"{result.ran} round(s) now, {result.rounds} in all ({format_duration(soak.spent())})"
    if soak.shared is not None:
        print(f"shared store: {soak.shared.round_trips} round trip(s) for {result.ran} round(s)")
    if result.stopped == "interrupted":
        print(
            f"interrupted after round {result.rounds}: {head}; the same command with "
            f"--campaign-dir={soak.folder} continues it"
        )
        return 130
    if result.finding is not None:
        f = result.finding
        print(f"\nviolation in round {f.number} ({f.name}): {', '.join(f.rules)}; {head}")
        print(f.message)
        return 1
    why = "--max-rounds reached" if result.stopped == "rounds" else "time is up"
    print(f"no violation: {head}; {why}")
    return 0
