"""The host's side of the kernel matrix: one guest run per kernel, its results as test items.

With ``--kernel=6.1,6.12`` every collected test becomes one item per kernel
(``test_x[kernel-6.1.192]``).  The first of a kernel's items to run boots that kernel once
and runs *all* of that kernel's tests in it, with the same arguments the host pytest was
given; each item then reports its own test's outcome from the guest.  Under pytest-xdist the
workers share the guest run through a lock in the session's temporary folder, so each
kernel boots once per session whichever worker gets there first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from afterclose.harness.errors import AftercloseError
from afterclose.harness.kernel import fetch, guest, vm
from afterclose.harness.kernel.fetch import KernelSource

# Options of the host run that must not reach the inner pytest: the kernel runner's own, and
# xdist's (the guest runs its tests one after another), and where outputs go.
_DROP_WITH_VALUE = (
    "--kernel", "--kernel-timeout", "-n", "--numprocesses", "--maxprocesses", "--dist",
    "--basetemp", "--junitxml", "--junit-xml", "--tx",
)  # fmt: skip
_DROP_ENV_PREFIXES = ("PYTEST_XDIST_", "PYTEST_CURRENT_TEST")
BASE_TIMEOUT_S = 600.0
PER_TEST_TIMEOUT_S = 120.0


def inner_args(args: Sequence[str], *, xdist: bool, fault_seed: int | None) -> list[str]:
    """The host's pytest arguments without the options that only make sense on the host."""
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in _DROP_WITH_VALUE:
            next(it, None)
            continue
        if arg == "-p":
            value = next(it, "")
            if "xdist" not in value:
                out += [arg, value]
            continue
        if arg.split("=", 1)[0] in _DROP_WITH_VALUE and arg.startswith("--"):
            continue
        if arg.startswith("-n") and not arg.startswith("--"):
            continue  # -n2, -nauto
        out.append(arg)
    if xdist:
        # `addopts = -n 2` in an ini file would still spread the guest's tests over workers.
        out += ["-n", "0"]
    if fault_seed is not None and not any(a.startswith("--fault-seed") for a in out):
        # The guest draws the same client-side schedules as a host run would have.
        out.append(f"--fault-seed={fault_seed}")
    return out


def guest_env(spec: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_ENV_PREFIXES)}
    env[guest.GUEST_KERNEL_ENV] = spec
    return env


@dataclass(frozen=True)
class TestResult:
    nodeid: str
    outcome: str  # passed, failed, skipped, xfailed, missing
    when: str = "call"
    longrepr: str = ""
    reason: str = ""
    sections: tuple[tuple[str, str], ...] = ()
    duration: float = 0.0

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TestResult:
        return cls(
            nodeid=record["nodeid"],
            outcome=record["outcome"],
            when=record.get("when", "call"),
            longrepr=record.get("longrepr", ""),
            reason=record.get("reason", ""),
            sections=tuple((str(a), str(b)) for a, b in record.get("sections", [])),
            duration=float(record.get("duration", 0.0)),
        )


@dataclass
class KernelOutcome:
    """What one kernel's guest run brought back."""

    source: KernelSource
    run: vm.GuestRun | None = None
    info: dict[str, Any] = field(default_factory=dict)
    results: dict[str, TestResult] = field(default_factory=dict)
    collect_errors: list[str] = field(default_factory=list)
    error: str | None = None

    def header(self) -> str:
        if self.run is None:
            return f"kernel {self.source.label} ({self.source.describe()})"
        release = self.info.get("release", self.run.kernel.release)
        return (
            f"kernel {release} ({self.source.describe()}), qemu {self.run.accel}, "
            f"guest run {self.run.elapsed_s:.0f} s"
        )

    def rewrite(self, text: str) -> str:
        """Guest paths of test folders → their copies on the host."""
        if self.run is None:
            return text
        return text.replace(guest.GUEST_BASETEMP, str(self.run.results / guest.BASETEMP_COPY))

    def why_missing(self) -> str:
        """Why a test has no result: the guest's own account, for the failure message."""
        lines = [f"the test did not run in the guest ({self.header()})"]
        if self.error:
            lines.append(self.error)
        if self.run is not None:
            lines.append(self.run.describe())
            lines.extend(self.collect_errors)
            log = self.run.results / guest.PYTEST_LOG
            if log.is_file():
                tail = log.read_text(errors="replace").rstrip().splitlines()[-25:]
                lines.append(f"--- end of the guest's pytest output ({log}):")
                lines.extend(tail)
            lines.append(f"--- end of the guest's console ({self.run.console}):")
            lines.append(self.run.console_tail(25))
            qemu_log = self.run.results / "qemu.log"
            if qemu_log.is_file() and qemu_log.stat().st_size:
                lines.append(f"--- qemu's own messages ({qemu_log}):")
                lines.extend(qemu_log.read_text(errors="replace").rstrip().splitlines()[-10:])
        return "\n".join(lines)


class KernelMatrix:
    def __init__(
        self,
        sources: list[KernelSource],
        *,
        args: Sequence[str],
        cwd: Path,
        timeout_s: float | None,
    ) -> None:
        self.sources = sources
        self.args = list(args)
        self.cwd = cwd
        self.timeout_s = timeout_s
        self.nodeids: dict[str, list[str]] = {s.label: [] for s in sources}
        self._outcomes: dict[str, KernelOutcome] = {}

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> KernelMatrix:
        """``6.1,6.12`` → a matrix of two kernels; raises AftercloseError naming what failed."""
        sources: list[KernelSource] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            source = fetch.resolve(part)
            if any(s.label == source.label for s in sources):
                continue
            sources.append(source)
        if not sources:
            raise AftercloseError("--kernel names no kernel", hint="e.g. --kernel=6.1,6.12")
        return cls(sources, **kwargs)

    def wrap(self, items: list[pytest.Item]) -> list[pytest.Item]:
        wrapped: list[pytest.Item] = []
        # Test by test, each on every kernel in turn: a failure shows next to its twins.
        for item in items:
            assert item.parent is not None  # every collected test item has one
            for source in self.sources:
                self.nodeids[source.label].append(item.nodeid)
                wrapped.append(
                    KernelItem.from_parent(
                        item.parent,
                        name=kernel_item_name(item.name, source.label),
                        matrix=self,
                        source=source,
                        inner_nodeid=item.nodeid,
                        location_of=item,
                    )
                )
        return wrapped

    def outcome(
        self, source: KernelSource, shared: Path, prepare: Callable[[], None]
    ) -> KernelOutcome:
        """This kernel's guest run: done once per session, shared by every xdist worker.

        A worker that finds the kernel it needs already booting elsewhere boots another
        kernel nobody has started yet before it waits: xdist hands out items in consecutive
        chunks, so without this two workers would queue on the same kernel in turn."""
        if source.label in self._outcomes:
            return self._outcomes[source.label]
        if not self._run_if_free(source, shared, prepare):
            for other in self.sources:
                if other.label != source.label and other.label not in self._outcomes:
                    self._run_if_free(other, shared, prepare)
        folder = shared / f"kernel-{source.label}"
        with self._lock(shared, source, blocking=True):
            done = folder / "done.json"
            if not done.exists():  # the worker that held the lock died before finishing
                self._run_and_mark(source, folder, prepare)
            outcome = self._load(source, folder, json.loads(done.read_text()).get("error"))
        self._outcomes[source.label] = outcome
        return outcome

    def _run_if_free(self, source: KernelSource, shared: Path, prepare: Callable[[], None]) -> bool:
        """Run this kernel's guest unless it is done or running; False if another has it."""
        folder = shared / f"kernel-{source.label}"
        try:
            with self._lock(shared, source, blocking=False):
                if not (folder / "done.json").exists():
                    self._run_and_mark(source, folder, prepare)
        except BlockingIOError:
            return False
        return True

    @contextlib.contextmanager
    def _lock(self, shared: Path, source: KernelSource, *, blocking: bool) -> Iterator[None]:
        shared.mkdir(parents=True, exist_ok=True)
        with (shared / f"kernel-{source.label}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield

    def _run_and_mark(
        self, source: KernelSource, folder: Path, prepare: Callable[[], None]
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        error = self._run_guest(source, folder, prepare)
        (folder / "done.json").write_text(json.dumps({"error": error}))

    def _run_guest(
        self, source: KernelSource, folder: Path, prepare: Callable[[], None]
    ) -> str | None:
        try:
            kernel = fetch.fetch(source)
            prepare()
            nodeids = self.nodeids[source.label]
            (folder / guest.SELECT).write_text("".join(n + "\n" for n in nodeids))
            (folder / guest.REQUEST).write_text(
                json.dumps({"cwd": str(self.cwd), "args": self.args, "env": guest_env(source.spec)})
            )
            timeout = self.timeout_s or BASE_TIMEOUT_S + PER_TEST_TIMEOUT_S * len(nodeids)
            run = vm.run(
                kernel,
                [sys.executable, "-m", "afterclose.harness.kernel.guest",
                 vm.GUEST_RESULTS],
                folder,
                timeout_s=timeout,
            )  # fmt: skip
            (folder / "run.json").write_text(
                json.dumps({"accel": run.accel, "elapsed_s": run.elapsed_s,
                            "timed_out": run.timed_out, "status": run.status})
            )  # fmt: skip
        except AftercloseError as exc:
            return exc.render()
        return None

    def _load(self, source: KernelSource, folder: Path, error: str | None) -> KernelOutcome:
        outcome = KernelOutcome(source, error=error)
        run_file = folder / "run.json"
        if run_file.is_file():
            r = json.loads(run_file.read_text())
            kernel = fetch.fetch(source)
            outcome.run = vm.GuestRun(
                kernel, r["accel"], folder, folder / "console.log", r["status"],
                r["elapsed_s"], r["timed_out"],
            )  # fmt: skip
        info = folder / guest.GUEST_INFO
        if info.is_file():
            outcome.info = json.loads(info.read_text())
        report = folder / guest.REPORT
        if report.is_file():
            for line in report.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a guest that died mid-write
                if record.get("outcome") == "collect-error":
                    outcome.collect_errors.append(
                        f"collection error in the guest: {record['nodeid']}\n{record['longrepr']}"
                    )
                else:
                    outcome.results[record["nodeid"]] = TestResult.from_record(record)
        return outcome


def kernel_item_name(name: str, label: str) -> str:
    """``test_x`` → ``test_x[kernel-6.1.192]``; ``test_x[a]`` → ``test_x[a-kernel-6.1.192]``."""
    if name.endswith("]") and "[" in name:
        return f"{name[:-1]}-kernel-{label}]"
    return f"{name}[kernel-{label}]"


class KernelItem(pytest.Item):
    """One test on one kernel; runs nothing itself, reports what the guest saw."""

    def __init__(
        self,
        *,
        matrix: KernelMatrix,
        source: KernelSource,
        inner_nodeid: str,
        location_of: pytest.Item,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.matrix = matrix
        self.source = source
        self.inner_nodeid = inner_nodeid
        self._location = location_of.location
        # skip/skipif/xfail were judged on the host's kernel: the guest judges them again on
        # its own (a scenario skipped here for want of netem runs in a guest that has it).
        self.own_markers.extend(
            m for m in location_of.own_markers if m.name not in ("skip", "skipif", "xfail")
        )

    def reportinfo(self) -> tuple[Any, int | None, str]:
        path, lineno, name = self._location
        return path, lineno, kernel_item_name(name, self.source.label)

    def runtest(self) -> None:
        from afterclose.harness import plugin

        outcome = self.matrix.outcome(
            self.source, _shared_folder(self.config), lambda: plugin.prepare_for_guest(self.config)
        )
        result = outcome.results.get(self.inner_nodeid)
        header = outcome.header()
        self.add_report_section("call", "kernel", header)
        if result is None or result.outcome == "missing":
            pytest.fail(outcome.why_missing(), pytrace=False)
        for title, content in result.sections:
            # "Captured afterclose call" → shown as "Captured afterclose (guest) call".
            key = title.removeprefix("Captured ").rsplit(" ", 1)[0]
            self.add_report_section("call", f"{key} (guest)", outcome.rewrite(content))
        if result.outcome == "failed":
            where = "" if result.when == "call" else f" (in {result.when})"
            pytest.fail(f"on {header}{where}:\n{outcome.rewrite(result.longrepr)}", pytrace=False)
        if result.outcome in ("skipped", "xfailed"):
            pytest.skip(f"on kernel {self.source.label}: {result.reason}")


def _shared_folder(config: pytest.Config) -> Path:
    """A folder this session's xdist workers share (the basetemp's parent under xdist)."""
    factory = config._tmp_path_factory  # type: ignore[attr-defined]
    base: Path = factory.getbasetemp()
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return base.parent / f"kernels-{workerinput['testrunuid'][:12]}"
    return base / "kernels"
