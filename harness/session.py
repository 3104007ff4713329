"""One harness session: settings, the resolved target, and each test's run of it.

The pytest plugin and the command line both drive this module, so what a test sees and what
``afterclose demo`` prints come from the same code.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from afterclose.harness import launch, options, ports, procfs, replay, syscall_faults, tracers
from afterclose.harness.errors import (
    AftercloseError,
    FaultNotApplied,
    ManifestError,
    TargetStartError,
)
from afterclose.harness.manifest import Manifest, load_manifest, resolve_target
from afterclose.harness.oracle import judge
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.runners.base import ExitStatus, Runner, Server
from afterclose.harness.trace.facts import Running

if TYPE_CHECKING:
    from afterclose.faults.base import Endpoint, FaultReport
    from afterclose.harness.control import ServerControl
    from afterclose.harness.scenario import Scenario, ScenarioReport

FAULT_BUDGET_S = 120.0


@dataclass(frozen=True)
class Settings:
    """One session's options (defaults: :mod:`afterclose.harness.options`)."""

    target: str
    rootdir: Path
    run_id: str
    runner: str = options.RUNNER.default
    tracer: str = options.TRACER.default
    kernel: str | None = options.KERNEL.default
    chaos: str = options.CHAOS.default
    fault_seed: int = 0
    sanitize: str = options.SANITIZE.default
    host: str = "127.0.0.1"
    storm_duration: float | None = options.STORM_DURATION.default


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
    raise AftercloseError(
        f"unknown runner {name!r}", hint=f"use one of {', '.join(options.RUNNER_CHOICES)}"
    )


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
        self.check_runner()
        return make_runner(self.settings.runner)

    def check_runner(self) -> None:
        """Stop before any test when the manifest says the target cannot run on the runner."""
        why = self.manifest.docker_unsupported
        if self.settings.runner == "docker" and why:
            raise ManifestError(
                f"target {self.manifest.name!r} cannot run under the Docker runner: {why}",
                where=f"{self.manifest.path}: docker.unsupported",
                hint="run it with --runner=process",
            )

    @cached_property
    def tracer_mode(self) -> str:
        return tracers.choose_tracer(self.settings.tracer, self.manifest, self.settings.runner)

    def seed_for(self, test_name: str) -> int:
        # One seed per run, mixed with the test's name: a replay with --fault-seed gives every
        # test the same client-side schedule as before, and tests differ from each other.
        return random.Random(f"{self.settings.fault_seed}:{test_name}").getrandbits(32)

    def replay_command(self, test_name: str, nodeid: str | None = None) -> str:
        """The pytest command that runs this test again (a scenario file's test: by node id)."""
        if nodeid is not None:
            return replay.command(self.settings, "pytest", ["--no-builtin-suite", nodeid])
        return replay.command(self.settings, "pytest", ["-k", test_name])

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
        self._restarts = 0
        # Host PID -> how the harness ended that process on purpose (a fault's signal, the
        # stop before a restart): the kernel, not the server, released its fds.
        self.ended: dict[int, str] = {}
        self._stack = contextlib.ExitStack()
        manifest = harness.manifest
        try:
            lease = self._stack.enter_context(ports.lease_port(harness.settings.host))
            self.tracer = tracers.open_tracer(
                harness.tracer_mode, workdir, harness.settings.sanitize
            )
            env = tracers.target_env(
                self.tracer,
                chaos=harness.settings.chaos,
                seed=self.seed,
                sanitizer=harness.settings.sanitize,
                extra=extra_env,
            )
            # The server's calls are perturbed (syscall faults, chaos): see Evidence.perturbed.
            self.perturbed = syscall_faults.ENV_FAULTS in env or syscall_faults.ENV_CHAOS in env
            plan = launch.make_plan(
                manifest,
                host=harness.settings.host,
                port=lease.port,
                workdir=workdir,
                artefact=harness.artefact,
                sanitizer=harness.settings.sanitize,
                trace_dir=self.tracer.trace_dir,
                extra_env=env,
            )
            self.server: Server = harness.runner.start(plan)
            self._stack.callback(self.server.stop)
            self.tracer.started(self.server)
            self.baseline = procfs.settled_census(self.server.host_pids, self.server.port)
        except BaseException:
            self._stack.close()
            raise

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

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
            request_headers=tuple(self.manifest.request_headers.items()),
            large_path=self.manifest.large_path,
            gone=lambda: self.server.exit_status() is not None,
            protocol=self.manifest.speaks,
            tls=self.manifest.tls,
        )

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def run_fault(self, name: str, /, **params: object) -> FaultReport:
        """Run the fault registered as ``name`` with ``params`` (bounded by FAULT_BUDGET_S)."""
        from afterclose import faults

        where = f"{self.test_name}: fault {name!r}"
        deadline = time.monotonic() + FAULT_BUDGET_S
        kind = faults.get_any(name, where)
        stretch = self.harness.settings.storm_duration
        if stretch is not None:  # --storm-duration: every storm lasts at least this long
            params = kind.stretched(params, stretch)
        fault = kind.from_params(params, where)
        report = fault.run_on(self.control(name), self.rng, deadline)
        self.reports.append(report)
        self.schedule.extend(f"{name}: {line}" for line in report.schedule)
        if fault.check_applied(report):
            raise FaultNotApplied(report.unapplied, where=where)
        return report

    def control(self, fault: str) -> ServerControl:
        """The handle a fault acts on the server through (``fault``: its name, for errors)."""
        from afterclose.harness.control import ServerControl

        return ServerControl(self, fault)

    def restart(self, why: str, namespace_pids: Mapping[int, int]) -> ExitStatus | None:
        """Stop what is left of the server, keep its output as ``target.stdout.killed-N``,
        and start the same plan again; the new server replaces it (:meth:`replace_server`).

        ``namespace_pids``: PID in its namespace -> host PID of the old server's processes,
        read before they died.  A container's processes get the same namespace PIDs again
        (PID 1): read as they are, the new one's trace files would look like an exec of the
        old PID 1, so the dead ones' files are relabelled with their host PIDs first."""
        old = self.server
        self.note_ended(old.host_pids(), f"the harness stopped it to restart the target ({why})")
        status = old.stop()
        self._restarts += 1
        for path in (old.plan.stdout_path, old.plan.stderr_path):
            with contextlib.suppress(OSError):
                path.rename(path.with_name(f"{path.name}.killed-{self._restarts}"))
        trace_dir = self.tracer.trace_dir
        if trace_dir is not None and namespace_pids:
            from afterclose.harness.trace import shim

            for inner, host in namespace_pids.items():
                shim.relabel_pid(trace_dir, inner, host)
        try:
            new = self.harness.runner.start(old.plan)
        except AftercloseError as exc:
            raise TargetStartError(
                f"target {self.manifest.name!r} did not come back after {why}: {exc.message}",
                where=exc.where,
                details=exc.details,
                hint=exc.hint,
            ) from None
        self.replace_server(new)
        return status

    def note_ended(self, pids: Iterable[int], how: str) -> None:
        """Record that the harness ends the processes ``pids`` (host PIDs) on purpose, and
        ``how``; the first word on a process stands."""
        for pid in pids:
            self.ended.setdefault(pid, how)

    def running(self) -> frozenset[int]:
        """The server's live processes: their host PIDs and, in a container, their PIDs
        there too (a trace names a process by either)."""
        pids = [p for p in self.server.host_pids() if procfs.alive(p)]
        return frozenset({*pids, *procfs.namespace_pids(pids)})

    @property
    def target(self) -> Server:
        """The started server: the older name of :attr:`server`, kept for existing tests."""
        return self.server

    def replace_server(self, server: Server) -> None:
        """Adopt ``server``, the same plan started again (the ``kill`` fault): it is stopped
        at the end and judged instead of the one it replaces."""
        self._stack.callback(server.stop)
        self.server = server
        self.tracer.started(server)
        # Clients that go on through the restart (the kill fault's storm) are connected while
        # it settles, and a leak among them would count as the new server's own sockets.
        self.baseline = procfs.settled_census(server.host_pids, server.port).without_clients()

    def run_scenario(self, scenario: Scenario) -> ScenarioReport:
        """Run ``scenario``'s phases in order (seed: its own, else this test's seed)."""
        from afterclose.harness import scenario as scenarios

        result = scenarios.run_scenario(self, scenario, FAULT_BUDGET_S)
        self.scenarios.append(result)
        return result

    def finish(self) -> Outcome:
        """Judge the run with every rule; stops the target."""
        if self._finished is not None:
            return self._finished
        out = Outcome(reports=list(self.reports), trace_dir=self.tracer.trace_dir)
        evidence = judge.Evidence(
            reports=self.reports,
            server=self.server,
            baseline=self.baseline,
            fd_grace_s=self.manifest.fd_grace_s,
            perturbed=self.perturbed,
        )

        def stop() -> tracers.TraceOutcome:
            # Looked at on both sides of the cut-off: a process seen running either time is
            # judged (one that dies unmarked in between would be judged too: never excused).
            seen = self.running()
            cutoff = self.tracer.cutoff()
            seen |= self.running()
            self.server.stop()
            return self.tracer.analyse(cutoff, Running(seen, dict(self.ended)))

        judged = judge.judge(evidence, stop)
        out.violations = judged.violations
        out.warnings.extend(judged.warnings)
        self._finished = out
        return out

    def schedule_line(self) -> str:
        """The client-side schedule in short: equal digests, equal schedules (for replays)."""
        from afterclose.harness.scenario import schedule_digest

        return f"{schedule_digest(self.schedule)}, {len(self.schedule)} connection(s) planned"

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
        if self.schedule:
            lines.append(f"schedule: {self.schedule_line()}")
        lines.append(f"artifacts: {self.workdir}")
        replay = replay or harness.replay_command(self.test_name, self.replay_nodeid)
        lines.append(f"replay: {replay}")
        return "\n".join(lines)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TargetRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
