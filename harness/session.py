"""One harness session: settings, the resolved target, and each test's run of it.

The pytest plugin and the command line both drive this module, so what a test sees and what
``afterclose demo`` prints come from the same code.
"""

from __future__ import annotations

import contextlib
import random
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from afterclose.harness import launch, ports, procfs, tracers
from afterclose.harness.errors import AftercloseError
from afterclose.harness.manifest import Manifest, load_manifest, resolve_target
from afterclose.harness.oracle import blackbox, evidence, verdict
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.runners.base import Runner, RunningTarget

if TYPE_CHECKING:
    from afterclose.faults.base import Endpoint, FaultReport
    from afterclose.harness.scenario import Scenario, ScenarioReport

RUNNERS = ("process", "docker")
SANITIZERS = ("none", "address", "undefined")
FAULT_BUDGET_S = 120.0


@dataclass(frozen=True)
class Settings:
    target: str
    rootdir: Path
    run_id: str
    runner: str = "process"
    tracer: str = "auto"
    kernel: str | None = None
    chaos: str = "off"
    fault_seed: int = 0
    sanitize: str = "none"
    host: str = "127.0.0.1"

    def replay_args(self) -> list[str]:
        args = [f"--target={self.target}", f"--fault-seed={self.fault_seed}"]
        if self.runner != "process":
            args.append(f"--runner={self.runner}")
        if self.tracer != "auto":
            args.append(f"--tracer={self.tracer}")
        if self.sanitize != "none":
            args.append(f"--sanitize={self.sanitize}")
        if self.chaos != "off":
            args.append(f"--chaos={self.chaos}")
        if self.kernel:
            args.append(f"--kernel={self.kernel}")
        return args


def make_runner(name: str) -> Runner:
    if name == "process":
        from afterclose.harness.runners.process import ProcessRunner

        return ProcessRunner()
    if name == "docker":
        try:
            from afterclose.harness.runners.docker import DockerRunner  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise AftercloseError(
                "the docker runner is not available in this installation",
                hint="use --runner=process",
            ) from None
        runner: Runner = DockerRunner()
        return runner
    raise AftercloseError(f"unknown runner {name!r}", hint=f"use one of {', '.join(RUNNERS)}")


@dataclass
class Outcome:
    violations: list[Violation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reports: list[FaultReport] = field(default_factory=list)
    trace_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.violations


class Harness:
    """Session-wide state: the manifest and its build, shared by every test's run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def manifest(self) -> Manifest:
        path = resolve_target(self.settings.target, self.settings.rootdir)
        return load_manifest(path)

    @cached_property
    def artefact(self) -> Path | None:
        return launch.build_target(self.manifest, self.settings.sanitize, self.settings.run_id)

    def prebuild(self) -> None:
        """Build the target and the shim now: a guest would compile them under emulation."""
        self.artefact  # noqa: B018
        if self.tracer_mode == "preload" or self.settings.chaos != "off":
            from afterclose.harness.trace import shim

            shim.shim_path()

    @cached_property
    def runner(self) -> Runner:
        return make_runner(self.settings.runner)

    @cached_property
    def tracer_mode(self) -> str:
        return tracers.choose_tracer(self.settings.tracer, self.manifest, self.settings.runner)

    def seed_for(self, test_name: str) -> int:
        # One seed per run, mixed with the test's name: a replay with --fault-seed gives every
        # test the same client-side schedule as before, and tests differ from each other.
        return random.Random(f"{self.settings.fault_seed}:{test_name}").getrandbits(32)

    def replay_command(self, test_name: str, nodeid: str | None = None) -> str:
        if nodeid is not None:  # a scenario file's test: select it alone, by node id
            args = [*self.settings.replay_args(), "--no-builtin-suite", nodeid]
            return shlex.join(["pytest", *args])
        return shlex.join(["pytest", *self.settings.replay_args(), "-k", test_name])

    def start(
        self, workdir: Path, test_name: str, extra_env: Mapping[str, str] | None = None
    ) -> TargetRun:
        return TargetRun(self, workdir, test_name, extra_env=extra_env)


class TargetRun:
    """One started target for one test: faults run against it, then the oracle judges it."""

    def __init__(
        self,
        harness: Harness,
        workdir: Path,
        test_name: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        # extra_env: more target environment, e.g. syscall_faults.to_env() of a scenario.
        self.harness = harness
        self.test_name = test_name
        self.workdir = workdir
        self.seed = harness.seed_for(test_name)
        self.rng = random.Random(self.seed)
        self.reports: list[FaultReport] = []
        self.schedule: list[str] = []  # the client-side schedule of every fault run, in order
        self.scenarios: list[ScenarioReport] = []
        self.replay_nodeid: str | None = None  # set by scenario-file tests (replay by node id)
        self._finished: Outcome | None = None
        self._stack = contextlib.ExitStack()
        manifest = harness.manifest
        try:
            lease = self._stack.enter_context(ports.lease_port(harness.settings.host))
            self.tracer = tracers.open_tracer(
                harness.tracer_mode, workdir, harness.settings.sanitize
            )
            plan = launch.make_plan(
                manifest,
                host=harness.settings.host,
                port=lease.port,
                workdir=workdir,
                artefact=harness.artefact,
                sanitizer=harness.settings.sanitize,
                trace_dir=self.tracer.trace_dir,
                extra_env=tracers.target_env(
                    self.tracer,
                    chaos=harness.settings.chaos,
                    seed=self.seed,
                    sanitizer=harness.settings.sanitize,
                    extra=extra_env,
                ),
            )
            self.target: RunningTarget = harness.runner.start(plan)
            self._stack.callback(self.target.stop)
            self.tracer.started(self.target)
            self.baseline = procfs.settled_census(self.target.host_pids, self.target.port)
        except BaseException:
            self._stack.close()
            raise

    @property
    def host(self) -> str:
        return self.target.host

    @property
    def port(self) -> int:
        return self.target.port

    @property
    def manifest(self) -> Manifest:
        return self.harness.manifest

    def endpoint(self) -> Endpoint:
        """Where client-side faults connect; tells them when the target has died."""
        from afterclose.faults.base import Endpoint

        return Endpoint(
            self.host,
            self.port,
            echo_path=self.manifest.echo_path,
            gone=lambda: self.target.exit_status() is not None,
        )

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def run_fault(self, name: str, /, **params: object) -> FaultReport:
        """Run the fault registered as ``name`` with ``params`` (bounded by FAULT_BUDGET_S)."""
        from afterclose import faults

        where = f"{self.test_name}: fault {name!r}"
        deadline = time.monotonic() + FAULT_BUDGET_S
        if faults.kind(name, where) == "target":  # acts on the running target itself
            report = faults.create_target(name, params, where).run(self, self.rng, deadline)
        else:
            fault = faults.create(name, params, where=where)
            endpoint = self.endpoint()
            report = fault.run(endpoint, self.rng, deadline)
        self.reports.append(report)
        self.schedule.extend(f"{name}: {line}" for line in report.schedule)
        return report

    def replace_target(self, target: RunningTarget) -> None:
        """Adopt ``target``, the same plan started again (the ``kill`` fault): it is stopped
        at the end and judged instead of the one it replaces."""
        self._stack.callback(target.stop)
        self.target = target
        self.tracer.started(target)
        self.baseline = procfs.settled_census(target.host_pids, target.port)

    def run_scenario(self, scenario: Scenario) -> ScenarioReport:
        """Run ``scenario``'s phases in order (seed: its own, else this test's seed)."""
        from afterclose.harness import scenario as scenarios

        result = scenarios.run_scenario(self, scenario, FAULT_BUDGET_S)
        self.scenarios.append(result)
        return result

    def finish(self) -> Outcome:
        """Judge the run: black-box rules, then the trace; stops the target."""
        from afterclose.faults import target_base

        if self._finished is not None:
            return self._finished
        out = Outcome(reports=list(self.reports), trace_dir=self.tracer.trace_dir)
        target = self.target
        checks: list[Violation | None] = [blackbox.check_crash(target)]
        checks.append(blackbox.check_liveness(target))
        checks.append(blackbox.check_cross_talk(_findings(self.reports)))
        leak, stranded = blackbox.check_fd_leak(target, self.baseline, self.manifest.fd_grace_s)
        checks.append(leak)
        if stranded:
            out.warnings.append(stranded)
        # What target-side faults found (busy-loop, liveness while limited or restarted).
        checks.extend(target_base.violations(_findings(self.reports)))
        cutoff = self.tracer.cutoff()
        target.stop()
        traced = self.tracer.analyse(cutoff)
        crash_at_stop = blackbox.check_crash(target) if checks[0] is None else None
        out.violations = [v for v in (*checks, crash_at_stop) if v is not None]
        known = {v.rule for v in out.violations}
        out.violations.extend(v for v in traced.violations if v.rule not in known)
        out.warnings.extend(dict.fromkeys(traced.warnings))
        self._finished = out
        return out

    def failure_message(self, outcome: Outcome, replay: str | None = None) -> str:
        harness = self.harness
        lines = [
            f"afterclose: {len(outcome.violations)} rule(s) violated by target "
            f"{harness.manifest.name!r} (seed {harness.settings.fault_seed}, "
            f"test seed {self.seed})",
        ]
        lines.extend(v.render() for v in outcome.violations)
        lines.extend(result.headline() for result in self.scenarios)
        for report in outcome.reports:
            lines.append(f"fault {report.summary()}")
        lines.extend(f"WARNING: {w}" for w in outcome.warnings)
        lines.append(f"artifacts: {self.workdir}")
        replay = replay or harness.replay_command(self.test_name, self.replay_nodeid)
        lines.append(f"replay: {replay}")
        return "\n".join(lines)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TargetRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Which rule reads each kind of observation (until the rules read observations themselves).
_RULE_OF_KIND = {
    evidence.UNSOLICITED_BYTES: verdict.CROSS_TALK,
    evidence.FOREIGN_ANSWER: verdict.CROSS_TALK,
    evidence.CPU_WHILE_IDLE: verdict.BUSY_LOOP,
    evidence.STATE_LOST_ON_RESTART: verdict.LIVENESS,
}


def _findings(reports: Iterable[FaultReport]) -> list[tuple[str, str]]:
    """``(rule, detail)`` of every observation the faults recorded."""
    return [(_RULE_OF_KIND[o.kind], o.detail) for report in reports for o in report.observations]
