"""The pytest plugin: options, hooks and fixtures only; the work lives in other modules."""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import pytest

from afterclose.harness import options
from afterclose.harness.errors import AftercloseError, FaultNotApplied, OptionError

if TYPE_CHECKING:
    from afterclose.harness.kernel.matrix import KernelMatrix
    from afterclose.harness.session import Harness, TargetRun

SUITE_MODULE = "afterclose.harness.suite.scenarios"
SUITE_NODEID = "afterclose/scenarios.py"
HARNESS_KEY = pytest.StashKey["Harness | None"]()
RUN_KEY = pytest.StashKey["TargetRun"]()
MATRIX_KEY = pytest.StashKey["KernelMatrix"]()
T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("afterclose", "afterclose: fd-lifecycle testing of servers")
    for option in options.OPTIONS:
        group.addoption(option.flag, type=_checker(option), default=None, help=option.help)
        parser.addini(option.ini, f"default for {option.flag}: {option.help}", default=None)
    group.addoption(
        "--no-builtin-suite",
        action="store_true",
        default=False,
        help="with --target, run only your own tests, not the built-in scenario suite "
        "(the suite is left out anyway when test paths are given)",
    )


def _checker(option: options.Option[T]) -> Callable[[str], T]:
    def check(value: str) -> T:
        try:
            return option.check(value)
        except OptionError as exc:
            raise pytest.UsageError(exc.message) from None

    check.__name__ = option.dest
    return check


def _setting(config: pytest.Config, option: options.Option[T]) -> T:
    """The option's value: the command line's, else the ini file's, else its default."""
    value = config.getoption(option.dest)
    if value is None:
        raw = config.getini(option.ini)
        if raw in (None, "", []):
            return option.default
        return _checker(option)(str(raw))
    return cast(T, value)


def _suite_path() -> Path:
    spec = importlib.util.find_spec(SUITE_MODULE)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "afterclose_scenario: a built-in afterclose scenario")
    config.addinivalue_line(
        "markers",
        "syscall_faults(**calls): syscall faults the shim injects into the target, e.g. "
        "read={'eagain': 0.05}, write={'short': 0.1} (see afterclose.harness.syscall_faults)",
    )
    harness = _make_harness(config)
    config.stash[HARNESS_KEY] = harness
    kernel = _setting(config, options.KERNEL)
    if kernel is not None:
        config.stash[MATRIX_KEY] = _make_matrix(config, kernel, harness)
    if harness is None:
        return
    # Paths on the command line mean "run these": the suite joins only a plain `pytest
    # --target=X` (testpaths or the current folder), unless --no-builtin-suite says otherwise.
    explicit = config.args_source == pytest.Config.ArgsSource.ARGS
    if not explicit and not config.getoption("no_builtin_suite"):
        suite = str(_suite_path())
        if suite not in config.args:
            config.args.append(suite)


def _make_harness(config: pytest.Config) -> Harness | None:
    target = _setting(config, options.TARGET)
    if target is None:
        return None
    from afterclose.harness.kernel.guest import GUEST_KERNEL_ENV
    from afterclose.harness.session import Harness, Settings

    seed = _setting(config, options.FAULT_SEED)
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if seed is None:
        # Under xdist every worker must draw the same seed: the controller's run id is shared.
        base = workerinput["testrunuid"] if workerinput else uuid.uuid4().hex
        seed = int(base[:8], 16)
    run_id = workerinput["testrunuid"] if workerinput else uuid.uuid4().hex
    settings = Settings(
        target=target,
        rootdir=Path(config.rootpath),
        run_id=run_id,
        runner=_setting(config, options.RUNNER),
        tracer=_setting(config, options.TRACER),
        # Inside a kernel-matrix guest: replay commands name the guest's kernel.
        kernel=_setting(config, options.KERNEL) or os.environ.get(GUEST_KERNEL_ENV),
        fault_seed=seed,
        sanitize=_setting(config, options.SANITIZE),
        # Chaos is done by the shim; with --tracer=off the shim is preloaded just to perturb.
        chaos=_setting(config, options.CHAOS),
        storm_duration=_setting(config, options.STORM_DURATION),
    )
    harness = Harness(settings)
    try:
        harness.manifest  # noqa: B018 - validate the manifest before any test runs
        harness.check_runner()
        harness.tracer_mode  # noqa: B018
    except AftercloseError as exc:
        raise pytest.UsageError(exc.render()) from None
    return harness


def _make_matrix(config: pytest.Config, spec: str, harness: Harness | None) -> KernelMatrix:
    from afterclose.harness.kernel.matrix import KernelMatrix, inner_args

    if harness is not None and harness.settings.runner != "process":
        raise pytest.UsageError(
            f"--kernel={spec} with --runner={harness.settings.runner}: inside a kernel guest "
            "targets run as processes\nHint: drop --runner, or drop --kernel"
        )
    timeout = _setting(config, options.KERNEL_TIMEOUT)
    try:
        return KernelMatrix.from_spec(
            spec,
            args=inner_args(
                config.invocation_params.args,
                xdist=config.pluginmanager.hasplugin("xdist"),
                fault_seed=harness.settings.fault_seed if harness else None,
            ),
            cwd=config.invocation_params.dir,
            timeout_s=timeout,
        )
    except AftercloseError as exc:
        raise pytest.UsageError(exc.render()) from None


def prepare_for_guest(config: pytest.Config) -> None:
    """Called on the host before a kernel guest boots: build what the guest will run."""
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None:
        return

    try:
        harness.prebuild()
    except AftercloseError as exc:
        _fail_once(exc)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    matrix = config.stash.get(MATRIX_KEY, None)
    if matrix is not None:
        # Every test becomes one item per kernel, run inside that kernel's guest.
        items[:] = matrix.wrap(items)


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    lines = []
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is not None:
        s = harness.settings
        lines.append(
            f"afterclose: target {harness.manifest.name} ({harness.manifest.path}), runner "
            f"{s.runner}, tracer {harness.tracer_mode}, sanitizer {s.sanitize}, fault seed "
            f"{s.fault_seed}, chaos {s.chaos}"
        )
        if harness.tracer_mode == "ebpf":
            lines.append(f"afterclose: {_ebpf_unchecked()}")
    matrix = config.stash.get(MATRIX_KEY, None)
    if matrix is not None:
        lines.append(
            "afterclose: kernels "
            + ", ".join(f"{k.label} ({k.describe()})" for k in matrix.sources)
            + ", each test run inside a qemu guest"
        )
    return lines or None


def _ebpf_unchecked() -> str:
    from afterclose.harness.trace.ebpf import UNCHECKED_RULES

    return (
        f"the eBPF tracer does not see free(): {' and '.join(UNCHECKED_RULES)} are not "
        "checked (--tracer=preload checks them)"
    )


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """A PASS under the eBPF tracer says nothing about the rules it cannot check: say so where
    the passes are counted, not only in each test's captured warnings."""
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None or harness.tracer_mode != "ebpf":
        return
    passed = len(terminalreporter.stats.get("passed", []))
    if passed:
        terminalreporter.write_line(f"afterclose: {passed} passed, but {_ebpf_unchecked()}")


class BuiltinSuite(pytest.Module):
    """The scenario suite shipped in the package, imported under its package name."""

    def _getobj(self) -> ModuleType:
        return importlib.import_module(SUITE_MODULE)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> Any:
    if module_path == _suite_path():
        # The file lives in site-packages, outside the rootdir: give it a short stable node id
        # instead of the empty relative path pytest would compute.
        return BuiltinSuite.from_parent(parent, path=module_path, nodeid=SUITE_NODEID)
    return None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    # Scenario files (scenarios/*.toml) are tests only when there is a target to run them on.
    if file_path.suffix != ".toml" or parent.config.stash.get(HARNESS_KEY, None) is None:
        return None
    from afterclose.harness import scenario_file

    return scenario_file.collect_file(file_path, parent)


@pytest.fixture(scope="session")
def afterclose_harness(request: pytest.FixtureRequest) -> Harness:
    """The session's harness: settings, the resolved manifest and its build."""
    harness = request.config.stash.get(HARNESS_KEY, None)
    if harness is None:
        pytest.skip("no target: run with --target=NAME or --target=path/to/target.toml")

    try:
        harness.artefact  # noqa: B018 - build once per session, report errors cleanly
    except AftercloseError as exc:
        _fail_once(exc)
    return harness


def _fail_once(exc: AftercloseError) -> NoReturn:
    """Fail the test with ``exc``'s message alone.  ``pytest.fail`` raised inside the
    ``except`` would carry ``exc`` as its context, and pytest would print both, joined by
    "During handling of the above exception"."""
    exc.__traceback__ = None
    failure = pytest.fail.Exception(exc.render(), pytrace=False)
    failure.__suppress_context__ = True
    raise failure from None


@pytest.fixture
def target(
    request: pytest.FixtureRequest, afterclose_harness: Harness, tmp_path: Path
) -> Iterator[TargetRun]:
    """A started target for this test; judged by the oracle after the test body."""

    try:
        extra_env: dict[str, str] = {}
        marker = request.node.get_closest_marker("syscall_faults")
        if marker is not None:
            from afterclose.harness import syscall_faults

            specs = syscall_faults.from_marker(
                marker.args, marker.kwargs, where=f"{request.node.nodeid}: syscall_faults"
            )
            seed = afterclose_harness.seed_for(request.node.name)  # = the run's test seed
            extra_env = syscall_faults.to_env(specs, seed)
        run = afterclose_harness.start(tmp_path, request.node.name, extra_env=extra_env)
    except AftercloseError as exc:
        _fail_once(exc)
    request.node.stash[RUN_KEY] = run
    with run:
        yield run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        yield
    except FaultNotApplied as exc:
        # Judge first: a violation seen while trying still fails the test; else the run
        # proves nothing either way and is skipped with what was missing.
        run = item.stash.get(RUN_KEY, None)
        if run is not None:
            outcome = run.finish()
            if not outcome.ok:
                pytest.fail(run.failure_message(outcome), pytrace=False)
        pytest.skip(exc.render())
    except BaseException:
        # The test body failed on its own: still judge the run, and show the verdict beside
        # the original error instead of replacing it.
        run = item.stash.get(RUN_KEY, None)
        if run is not None:
            outcome = run.finish()
            if not outcome.ok:
                item.add_report_section("call", "afterclose", run.failure_message(outcome))
        raise
    run = item.stash.get(RUN_KEY, None)
    if run is None:
        return
    outcome = run.finish()
    for warning in outcome.warnings:
        item.add_report_section("call", "afterclose", f"WARNING: {warning}")
    if not outcome.ok:
        pytest.fail(run.failure_message(outcome), pytrace=False)


HARNESS_ERROR = ("afterclose", "harness-error")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    exc = call.excinfo.value if call.excinfo is not None else None
    if report.failed and isinstance(exc, AftercloseError):
        # The harness's own trouble (EMFILE in the client, a bad fault parameter...) is no
        # verdict on the target: an ERROR of the test, with the hint and no traceback.
        report.longrepr = f"afterclose: harness error, not a verdict on the target\n{exc.render()}"
        report.user_properties = [*report.user_properties, HARNESS_ERROR]
    return report


def pytest_report_teststatus(
    report: pytest.TestReport | pytest.CollectReport, config: pytest.Config
) -> tuple[str, str, str] | None:
    # Collection reports come here too, and have no user properties.
    if report.failed and HARNESS_ERROR in getattr(report, "user_properties", ()):
        return "error", "E", "ERROR"
    return None
