"""What every runner (process, Docker, VM) shares: the launch plan, exit status, readiness."""

from __future__ import annotations

import abc
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from afterclose.harness import procfs, readiness
from afterclose.harness.errors import TargetStartError
from afterclose.harness.manifest import Manifest


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start one target once, independent of where it runs."""

    manifest: Manifest
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    workdir: Path
    host: str
    port: int
    trace_dir: Path | None = None
    binaries: tuple[Path, ...] = field(default=())  # host files the target needs (containers)

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "target.stdout"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "target.stderr"


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    signal: int | None
    stopped_by_harness: bool

    def describe(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with status {self.code}"


class Server(abc.ABC):
    """A started target; a context manager that always stops it."""

    def __init__(self, plan: LaunchPlan) -> None:
        self.plan = plan
        self.host = plan.host
        self.port = plan.port
        self.name = plan.manifest.name
        self.crashed_status: ExitStatus | None = None

    @abc.abstractmethod
    def host_pids(self) -> list[int]:
        """PIDs (in the host's PID namespace) of the target's processes, main one first."""

    @abc.abstractmethod
    def exit_status(self) -> ExitStatus | None:
        """None while the target runs; how it ended otherwise."""

    @abc.abstractmethod
    def stop(self) -> ExitStatus | None:
        """Stop the target and everything it started; idempotent."""

    def output(self) -> str:
        parts = []
        for path in (self.plan.stdout_path, self.plan.stderr_path):
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                continue
        return "".join(parts)

    def stderr_text(self) -> str:
        try:
            return self.plan.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        out: list[str] = []
        for label, path in (("stdout", self.plan.stdout_path), ("stderr", self.plan.stderr_path)):
            try:
                text = path.read_text(errors="replace").rstrip().splitlines()
            except FileNotFoundError:
                continue
            if text:
                out.append(f"--- {label} (last {min(lines, len(text))} lines): {path}")
                out.extend(text[-lines:])
        return "\n".join(out) if out else "(the target wrote nothing)"

    def wait_ready(self) -> float:
        spec = self.plan.manifest.ready
        manifest = self.plan.manifest
        logs = (self.plan.stdout_path, self.plan.stderr_path)
        probe = readiness.probe_for(spec, self.host, self.port, logs, manifest.speaks, manifest.tls)

        def gone() -> str | None:
            status = self.exit_status()
            return status.describe() if status else None

        try:
            return readiness.wait_until(probe, spec.timeout_s, gone)
        except readiness.NotReady as exc:
            elsewhere = self._listening_elsewhere()
            raise TargetStartError(
                f"target {self.name!r} did not become ready: {exc.reason}"
                + (f"; it listens on {', '.join(elsewhere)}" if elsewhere else ""),
                where=self.plan.manifest.path,
                details=f"command: {' '.join(self.plan.argv)}\n{self.log_tail()}",
                hint="put {port} (and {host}) in its command or environment, so that it "
                f"listens on the port the harness leased, {self.host}:{self.port}"
                if elsewhere
                else _ready_hint(self.plan.manifest),
            ) from None

    def _listening_elsewhere(self) -> list[str]:
        """Where the target listens, when that is not the leased port (it ignored {port})."""
        try:
            pids = self.host_pids()
        except Exception:
            return []
        found = procfs.listening_addresses(pids)
        return [a for a in found if not a.endswith(f":{self.port}")]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready_hint(manifest: Manifest) -> str:
    spec = manifest.ready
    if spec.log is not None:
        return (
            f"the target must print {spec.log!r} (and flush its output) once it listens; "
            "or set [ready] port = true"
        )
    if spec.http is not None:
        return (
            f"the target must answer GET {spec.http} on {{host}}:{{port}} with a status below 500"
        )
    if spec.protocol:
        return f"the target must answer a {manifest.protocol} request on {{host}}:{{port}}"
    return (
        "the target must listen on the {host} and {port} it is given on its command line "
        "or in its environment; raise [ready] timeout_s if it starts slowly"
    )


class Runner(abc.ABC):
    """Starts targets somewhere.  ``start`` returns a ready target or raises and leaves
    nothing running."""

    name: str

    @abc.abstractmethod
    def launch(self, plan: LaunchPlan) -> Server:
        """Start the target's processes; no readiness wait."""

    def start(self, plan: LaunchPlan) -> Server:
        target = self.launch(plan)
        try:
            target.wait_ready()
        except BaseException:
            target.stop()
            raise
        return target
