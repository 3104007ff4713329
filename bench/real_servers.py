"""Run the built-in scenario suite N times against each real-server target and tabulate it.

    python bench/real_servers.py --runs 10 [--tracer preload|off] [--runner process|docker]
                                 [--targets nginx,lighttpd] [--time-cap 3600]
                                 [--output docs/real-servers.md]

Every run is an inner ``pytest --target=NAME --runner=... --tracer=... --fault-seed=S`` (a
fresh seed per run) in its own folder, so a run is exactly what a user would type.  Runs go
round-robin over the targets (run 1 of each, then run 2, ...) so a time cap leaves every
target with about the same number of runs; no run starts after the cap, and each run has its
own timeout.

The markdown table (server, version, process model, protocol, runner, tracer, runs, scenarios
per run, violations, wall time) is printed and written between the
``<!-- bench:real-servers:KEY:start/end -->`` markers of the output file, one section per
runner and tracer mode (KEY is the tracer for the process runner, ``docker-TRACER`` for
Docker; the rest of the file is kept; a missing file or missing markers get a fresh section at
the end).  With ``--runner docker`` the containers the runs left behind (label
``afterclose=1``, with a mount under the run folders: other runs' on the machine are not
counted) are counted at the end: there must be none.
Below it come the rules reported, with the replay command and artifacts of each failed test.
Passing runs' folders are deleted; failing ones are kept (``--keep`` keeps all).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "real-servers.md"
TARGETS = (
    "nginx",
    "lighttpd",
    "h2o",
    "asyncio",
    "uvloop",
    "node",
    "apache2",
    "caddy",
    "haproxy-http",
    "haproxy-tcp",
    "varnish",
    "nginx-tls",
    "redis",
    "memcached",
    "mosquitto",
)
# What each target speaks (its manifest's `protocol`, and `tls`).
PROTOCOL = {
    **{name: "HTTP" for name in TARGETS},
    "nginx-tls": "HTTPS",
    "redis": "RESP",
    "memcached": "memcached",
    "mosquitto": "MQTT",
}
# The tracer a target needs instead of the shim (its manifest's `tracer`): a Go binary makes
# its syscalls past libc, so only eBPF sees them.
NEEDS_TRACER = {"caddy": "ebpf"}
# One section per runner and tracer mode, so the tables live side by side.
MARK_START = "<!-- bench:real-servers:{key}:start -->"
MARK_END = "<!-- bench:real-servers:{key}:end -->"
RUN_TIMEOUT_S = 900
PROCESS_MODEL = {
    "nginx": "master + 2 worker processes, one epoll loop each",
    "lighttpd": "1 process, 1 epoll loop",
    "h2o": "1 process, 2 event-loop threads (+ crash-report helper process)",
    "asyncio": "1 process, 1 thread (selector loop on epoll)",
    "uvloop": "1 process, 1 thread (libuv loop on epoll)",
    "node": "1 process, 1 loop thread (libuv on epoll) + libuv and V8 helper threads",
    "apache2": "parent + 2 child processes (event MPM: listener thread + 16 workers each)",
    "caddy": "1 process, Go runtime (netpoller on epoll, goroutine per connection)",
    "haproxy-http": "1 process, 2 threads (HTTP mode, own echo backend on an abstract socket)",
    "haproxy-tcp": "1 process, 2 threads (TCP mode, own HTTP echo backend on an abstract socket)",
    "varnish": "manager + cache child (acceptor, worker pool, epoll waiter threads)",
    "nginx-tls": "master + 2 worker processes, one epoll loop each (TLS)",
    "redis": "1 process, 1 event-loop thread (ae on epoll) + background threads",
    "memcached": "1 process: listener thread + 4 worker threads (libevent)",
    "mosquitto": "1 process, 1 thread (epoll)",
}
# A closure image has no perl for h2o's crash-report helper: its launcher names /bin/cat.
PROCESS_MODEL_DOCKER = {
    **PROCESS_MODEL,
    "h2o": "1 process, 2 event-loop threads (+ crash-report helper /bin/cat: no perl in images)",
}
VIOLATED = re.compile(r"afterclose: (\d+) rule\(s\) violated by target")
RULE = re.compile(r"^\[([a-z-]+)\] ", re.MULTILINE)
REPLAY = re.compile(r"^replay: (.*)$", re.MULTILINE)
ARTIFACTS = re.compile(r"^artifacts: (.*)$", re.MULTILINE)


@dataclass
class Failure:
    test: str
    rules: list[str]
    replay: str
    artifacts: str
    first_line: str


@dataclass
class TargetStats:
    name: str
    version: str = "?"
    runs: int = 0
    tests_per_run: set[int] = field(default_factory=set)
    violations: int = 0
    errors: int = 0  # failed tests with no verdict (the target did not start, a timeout...)
    rules: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    wall_s: float = 0.0
    skipped: str | None = None
    tracer: str = "preload"
    # test -> (runs that skipped it, the reason the first of them gave)
    skips: dict[str, tuple[int, str]] = field(default_factory=dict)


def python_env() -> dict[str, str]:
    """The Python targets run ``python3`` from PATH: make it this interpreter (a venv's)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _ask(argv: list[str], pattern: str) -> str | None:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, env=python_env(), check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, proc.stdout + proc.stderr)
    return match.group(1) if match else None


# name -> (command that prints the version, pattern of it, prefix for the table)
VERSION_COMMANDS: dict[str, tuple[list[str], str, str]] = {
    "node": (["/usr/bin/node", "--version"], r"v(\S+)", "Node.js "),
    "apache2": (["/usr/sbin/apache2", "-v"], r"Server version: (Apache/\S+)", ""),
    "caddy": (["/usr/bin/caddy", "version"], r"^v?(\S+)", "Caddy "),
    "haproxy-http": (["/usr/sbin/haproxy", "-v"], r"HAProxy version (\S+)", "HAProxy "),
    "haproxy-tcp": (["/usr/sbin/haproxy", "-v"], r"HAProxy version (\S+)", "HAProxy "),
    "varnish": (["/usr/sbin/varnishd", "-V"], r"\((varnish-\S+)", ""),
    "nginx-tls": (["/usr/sbin/nginx", "-v"], r"nginx version: (nginx/\S+)", ""),
    "redis": (["/usr/bin/redis-server", "--version"], r"v=(\S+)", "Redis "),
    "memcached": (["/usr/bin/memcached", "-V"], r"memcached (\S+)", "memcached "),
    "mosquitto": (["/usr/sbin/mosquitto", "-h"], r"mosquitto version (\S+)", "mosquitto "),
}


def version_of(name: str) -> str | None:
    """The version the binary (or interpreter) reports; None if it is not installed."""
    if name in VERSION_COMMANDS:
        argv, pattern, prefix = VERSION_COMMANDS[name]
        found = _ask(argv, pattern)
        return f"{prefix}{found}" if found else None
    if name == "nginx":
        found = _ask(["/usr/sbin/nginx", "-v"], r"nginx version: (nginx/\S+)")
    elif name == "lighttpd":
        found = _ask(["/usr/sbin/lighttpd", "-v"], r"(lighttpd/\S+)")
    elif name == "h2o":
        found = _ask(["/usr/bin/h2o", "--version"], r"h2o version (\S+)")
        found = f"h2o {found}" if found else None
    elif name == "asyncio":
        found = _ask(
            ["python3", "-c", "import platform; print('CPython', platform.python_version())"],
            r"(CPython \S+)",
        )
    else:
        code = "import platform, uvloop; print(uvloop.__version__, platform.python_version())"
        found = _ask(["python3", "-c", code], r"^(\S+ \S+)$")
        if found:
            uv, py = found.split()
            found = f"uvloop {uv} (CPython {py})"
    return found


@dataclass
class RunReport:
    """What one inner pytest run's JUnit report says."""

    tests: int = 0  # tests that ran (not skipped)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (test, failure text)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (test, reason)


def parse_junit(path: Path) -> RunReport:
    """The tests run, failed and skipped of one inner pytest run."""
    root = ET.parse(path).getroot()
    report = RunReport()
    for case in root.iter("testcase"):
        skip = case.find("skipped")
        if skip is not None:
            reason = skip.get("message") or skip.text or ""
            report.skipped.append((case.get("name", "?"), reason.removeprefix("Skipped: ")))
            continue
        report.tests += 1
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                # The element's text is the whole report; its "message" attribute repeats the
                # start of it, so it is only used when there is no text.
                text = node.text or node.get("message") or ""
                report.failed.append((case.get("name", "?"), text))
    return report


def section_key(runner: str, tracer: str) -> str:
    return tracer if runner == "process" else f"{runner}-{tracer}"


def docker_problem() -> str | None:
    """Why the Docker runner cannot work here, or None."""
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
        client.close()
    except Exception as exc:
        return f"the Docker engine is not reachable ({exc}); start it (scripts/start-dockerd)"
    return None


def docker_unsupported(name: str) -> str | None:
    """The manifest's reason why the target cannot run in a container, if it gives one."""
    from afterclose.harness.manifest import load_manifest, resolve_target

    return load_manifest(resolve_target(name, None)).docker_unsupported


def leftover_containers(workdir: Path) -> list[str]:
    """Names of containers that this script's runs (their folders are under ``workdir``) left
    behind; other runs' on the machine are not counted."""
    import docker
    from afterclose.harness.runners.docker.reaper import containers_using

    client = docker.from_env(timeout=30)
    try:
        return containers_using(client, str(workdir.resolve()))
    finally:
        client.close()


def run_once(
    name: str, runner: str, tracer: str, seed: int, folder: Path, extra: list[str]
) -> tuple[RunReport, list[Failure], str]:
    """One inner pytest run; returns (its report, failures, problem text if it did not run)."""
    folder.mkdir(parents=True, exist_ok=True)
    junit = folder / "junit.xml"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--target={name}",
        f"--runner={runner}",
        f"--tracer={tracer}",
        f"--fault-seed={seed}",
        f"--basetemp={folder / 'tmp'}",
        f"--junitxml={junit}",
        "-q",
        "-rN",
        *extra,
    ]
    log = folder / "pytest.log"
    try:
        with log.open("w") as out:
            proc = subprocess.run(
                argv,
                cwd=folder,  # no ini file here: only the built-in suite is collected
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=python_env(),
                timeout=RUN_TIMEOUT_S,
                check=False,
            )
    except subprocess.TimeoutExpired:
        return RunReport(), [], f"timed out after {RUN_TIMEOUT_S} s (log: {log})"
    if not junit.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        return RunReport(), [], f"pytest exited {proc.returncode} without a report:\n{tail}"
    report = parse_junit(junit)
    failures = []
    for test, text in report.failed:
        rules = RULE.findall(text)
        replay = REPLAY.search(text)
        artifacts = ARTIFACTS.search(text)
        first = next((line for line in text.splitlines() if line.strip()), "")
        failures.append(
            Failure(
                test=test,
                rules=rules if VIOLATED.search(text) else [],
                replay=replay.group(1) if replay else shlex.join(argv[3:]),
                artifacts=artifacts.group(1) if artifacts else str(folder),
                first_line=first[:200],
            )
        )
    return report, failures, ""


def fmt_seconds(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def table(stats: list[TargetStats], runner: str) -> str:
    model = PROCESS_MODEL_DOCKER if runner == "docker" else PROCESS_MODEL
    lines = [
        "| server | version | process model | protocol | runner | tracer | runs "
        "| scenarios (tests per run) | skipped (per run) | violations (total) | wall time |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for s in stats:
        head = f"| {s.name} | {s.version if not s.skipped else '-'} | {model[s.name]} "
        head += f"| {PROTOCOL[s.name]} | {runner} | {s.tracer} "
        if s.skipped:
            lines.append(f"{head}| 0 | - | - | - | skipped: {s.skipped} |")
            continue
        per_run = "/".join(str(n) for n in sorted(s.tests_per_run)) or "-"
        violations = str(s.violations)
        if s.errors:
            violations += f" (+{s.errors} failed without a verdict)"
        skipped = ", ".join(f"`{t}`" + _unless_every(n, s.runs) for t, (n, _) in s.skips.items())
        lines.append(
            f"{head}| {s.runs} | {per_run} | {skipped or 'none'} | {violations} "
            f"| {fmt_seconds(s.wall_s)} |"
        )
    return "\n".join(lines)


def _unless_every(count: int, runs: int) -> str:
    return "" if count == runs else f" ({count} of {runs} runs)"


def skip_reasons(stats: list[TargetStats]) -> str:
    """Each skipped test's reason, once, with the targets it was given for."""
    where: dict[tuple[str, str], list[str]] = {}
    for s in stats:
        for test, (_, reason) in s.skips.items():
            where.setdefault((test, reason), []).append(s.name)
    return "\n".join(
        f"- `{test}` ({', '.join(names)}): {reason}" for (test, reason), names in where.items()
    )


def details(stats: list[TargetStats]) -> str:
    out: list[str] = []
    for s in stats:
        if not s.failures:
            continue
        rules = ", ".join(f"{rule} x{n}" for rule, n in s.rules.most_common()) or "none"
        out.append(f"- **{s.name}**: rules {rules}")
        # One line per test and verdict, with how often it came and the first replay.
        groups: dict[tuple[str, str], list[Failure]] = {}
        for f in s.failures:
            what = ", ".join(sorted(set(f.rules))) if f.rules else f"no verdict: {f.first_line}"
            groups.setdefault((f.test, what), []).append(f)
        for (test, what), fs in groups.items():
            first = fs[0]
            out.append(
                f"  - `{test}` [{what}] in {len(fs)} of {s.runs} runs; first: `{first.replay}` "
                f"(artifacts: `{first.artifacts}`)"
            )
    return "\n".join(out)


def section(
    stats: list[TargetStats],
    args: argparse.Namespace,
    elapsed: float,
    leftovers: list[str] | None = None,
) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "bench/real_servers.py", *sys.argv[1:]])
    machine = f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs"
    key = section_key(args.runner, args.tracer)
    parts = [
        MARK_START.format(key=key),
        f"### Runner `{args.runner}`, tracer `{args.tracer}`",
        "",
        f"Measured {when} on {machine} with `{command}` (runner `{args.runner}`, tracer "
        f"`{args.tracer}`, {fmt_seconds(elapsed)} in all):",
        "",
        table(stats, args.runner),
    ]
    if reasons := skip_reasons(stats):
        parts += ["", "Skipped, and why (as pytest said it):", "", reasons]
    more = details(stats)
    parts += ["", "Failed tests:", "", more] if more else ["", "No test failed."]
    if leftovers is not None:
        left = ", ".join(f"`{n}`" for n in leftovers) if leftovers else "none"
        parts += [
            "",
            "Containers these runs left behind (label `afterclose=1`, a mount under the run "
            f"folders): {left}.",
        ]
    parts.append(MARK_END.format(key=key))
    return "\n".join(parts) + "\n"


def write_doc(path: Path, text: str, key: str) -> None:
    old = path.read_text() if path.is_file() else ""
    start, end = MARK_START.format(key=key), MARK_END.format(key=key)
    if start in old and end in old:
        head, _, rest = old.partition(start)
        _, _, tail = rest.partition(end)
        new = head + text.rstrip("\n") + tail
    else:
        intro = old or "# Real servers as afterclose targets\n\n"
        new = intro.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="suite runs per target")
    parser.add_argument("--tracer", choices=("preload", "off"), default="preload")
    parser.add_argument(
        "--runner",
        choices=("process", "docker"),
        default="process",
        help="where the targets run (docker: images built offline, see docker/README.md)",
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated names")
    parser.add_argument(
        "--time-cap", type=float, default=3600, help="start no run after this many seconds"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--keep", action="store_true", help="keep the folders of passing runs")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs are kept")
    parser.add_argument(
        "--pytest-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the inner pytest (repeatable; write --pytest-arg=-x)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or args.runs < 1:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}; runs >= 1")
    if args.runner == "docker" and (problem := docker_problem()) is not None:
        parser.error(problem)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="afterclose-bench-"))
    # A target that needs another tracer than the shim gets it in the shim's table.
    stats = {
        n: TargetStats(n, tracer=NEEDS_TRACER.get(n, "preload"))
        if args.tracer == "preload"
        else TargetStats(n, tracer=args.tracer)
        for n in names
    }
    for s in stats.values():
        version = version_of(s.name)
        if version is None:
            s.skipped = "not installed" if s.name != "uvloop" else "pip install uvloop"
        elif args.runner == "docker" and (why := docker_unsupported(s.name)):
            s.skipped = f"cannot run in a container (docker.unsupported): {why}"
        else:
            s.version = version
    start = time.monotonic()
    capped = False
    for i in range(args.runs):
        for s in stats.values():
            if s.skipped:
                continue
            if time.monotonic() - start >= args.time_cap:
                capped = True
                break
            seed = random.getrandbits(32)
            folder = workdir / s.name / f"run-{i + 1}"
            t0 = time.monotonic()
            report, failures, problem = run_once(
                s.name, args.runner, s.tracer, seed, folder, args.pytest_arg
            )
            tests = report.tests
            for test, reason in report.skipped:
                seen, first = s.skips.get(test, (0, reason))
                s.skips[test] = (seen + 1, first)
            s.wall_s += time.monotonic() - t0
            s.runs += 1
            if problem:
                s.errors += 1
                s.failures.append(Failure("(whole run)", [], f"seed {seed}", str(folder), problem))
            if tests:
                s.tests_per_run.add(tests)
            for f in failures:
                s.failures.append(f)
                if f.rules:
                    s.violations += len(f.rules)
                    s.rules.update(f.rules)
                else:
                    s.errors += 1
            verdict = "ok" if not failures and not problem else f"{len(failures)} failed"
            print(
                f"{s.name} run {i + 1}/{args.runs} seed {seed}: {tests} tests, {verdict} "
                f"({time.monotonic() - t0:.1f} s)",
                flush=True,
            )
            if not failures and not problem and not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        if capped:
            print(f"time cap of {args.time_cap:g} s reached: no more runs", flush=True)
            break
    elapsed = time.monotonic() - start
    leftovers = leftover_containers(workdir) if args.runner == "docker" else None
    text = section(list(stats.values()), args, elapsed, leftovers)
    print()
    print(text)
    if not args.no_write:
        write_doc(args.output, text, section_key(args.runner, args.tracer))
        print(f"written to {args.output}")
    print(f"run folders: {workdir}")
    failed = any(s.violations or s.errors for s in stats.values())
    return 1 if failed or leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
