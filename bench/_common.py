"""What the benchmark scripts share: machine facts, bounded external tools, started targets,
small statistics and the row each script appends to ``docs/benchmarks.md``.

Every script prints its ratio as its last line and appends one row (date, machine, load,
the exact command, the numbers) to its own table in ``docs/benchmarks.md``.  Nothing here is
part of CI: numbers depend on the machine and on whatever else runs on it, which is why every
figure is a ratio of two things measured in the same run, interleaved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


def _reexec_under_venv() -> None:
    """Run the script again under the repository's ``.venv`` python when ``afterclose`` is
    not importable here (``python3 bench/x.py`` outside the virtual environment)."""
    try:
        import afterclose  # noqa: F401
    except ModuleNotFoundError:
        venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
        if not venv_python.exists() or Path(sys.executable) == venv_python:
            raise SystemExit(
                "afterclose is not importable and there is no .venv: run "
                "`python3 -m venv .venv && .venv/bin/pip install -e '.[test]'` in the "
                "repository first"
            ) from None
        os.execv(str(venv_python), [str(venv_python), *sys.argv])


_reexec_under_venv()

from afterclose.harness import launch, ports  # noqa: E402
from afterclose.harness.manifest import Manifest, ReadySpec, load_manifest, resolve_target  # noqa: E402
from afterclose.harness.runners.base import Server  # noqa: E402
from afterclose.harness.runners.process import ProcessRunner  # noqa: E402
from afterclose.harness.trace import format as trace_format  # noqa: E402
from afterclose.harness.trace import shim  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# AFTERCLOSE_BENCH_DOC writes the rows elsewhere (trial runs).
DOC = Path(os.environ.get("AFTERCLOSE_BENCH_DOC", ROOT / "docs" / "benchmarks.md"))
HOST = "127.0.0.1"
# How the target runs: alone, traced by the LD_PRELOAD shim, or under strace (the classic
# "trace every syscall" alternative, output thrown away).
MODES = ("off", "preload", "strace")
STRACE_ARGS = ("-f", "-qq", "-o", "/dev/null")
KILL_GRACE_S = 5.0
DOC_LOCK = Path(tempfile.gettempdir()) / "afterclose-bench-doc.lock"


# --------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    nproc: int
    kernel: str
    cpu: str

    def describe(self) -> str:
        return f"{self.nproc} x {self.cpu}, Linux {self.kernel}"


def machine() -> Machine:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return Machine(nproc=os.cpu_count() or 0, kernel=platform.release(), cpu=cpu)


def load() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` shows them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def tcp_passive_opens() -> int:
    """The kernel's count of accepted TCP connections (system-wide, all processes)."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()]
    tcp = [ln for ln in lines if ln and ln[0] == "Tcp:"]
    header, values = tcp[0], tcp[1]
    return int(values[header.index("PassiveOpens")])


class KernelWindow:
    """Accepted TCP connections per second over ``[start + lead, start + seconds - tail]``,
    counted by the kernel (``PassiveOpens``) on a thread: the steady state of a load generator,
    without its start-up and tear-down.  System-wide, so other work adds to it."""

    def __init__(self, seconds: float, lead: float = 1.0, tail: float = 0.5) -> None:
        self.lead = lead
        self.span = max(seconds - lead - tail, 0.1)
        self.rate = float("nan")
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        time.sleep(self.lead)
        before = tcp_passive_opens()
        time.sleep(self.span)
        self.rate = (tcp_passive_opens() - before) / self.span

    def result(self) -> float:
        self._thread.join()
        return self.rate


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes ``pids`` used so far (gone ones count 0)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def require(*tools: str) -> dict[str, str]:
    """Absolute paths of external tools; exits with a clear message when one is missing."""
    found: dict[str, str] = {}
    for tool in tools:
        path = shutil.which(tool) or (
            f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
        )
        if path is None:
            sys.exit(f"bench: {tool!r} is not installed (apt-get install -y {tool})")
        found[tool] = path
    return found


# --------------------------------------------------------------------------- external tools


@dataclass
class ToolResult:
    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool
    stopped_early: bool

    def check(self, what: str) -> ToolResult:
        if self.returncode not in (0, None) and not self.stopped_early:
            tail = (self.stderr or self.stdout).strip().splitlines()[-5:]
            raise RuntimeError(
                f"{what} failed ({self.returncode}): {shlex.join(self.argv)}\n" + "\n".join(tail)
            )
        return self


def run_tool(
    argv: Sequence[str],
    *,
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stop_when: Callable[[], bool] | None = None,
    poll_s: float = 0.02,
    stop_signal: signal.Signals = signal.SIGINT,
) -> ToolResult:
    """Run ``argv`` in its own process group, bounded by ``timeout_s``.

    ``stop_when`` is polled every ``poll_s``; once true (or at the timeout) the group gets
    ``stop_signal`` (siege and wrk print their statistics on SIGINT), then SIGKILL after a
    grace period.  Only the group this call started is ever signalled.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        timed_out = stopped_early = False
        try:
            while proc.poll() is None:
                if time.monotonic() - start >= timeout_s:
                    timed_out = True
                    break
                if stop_when is not None and stop_when():
                    stopped_early = True
                    break
                time.sleep(poll_s)
            wall = time.monotonic() - start
            if proc.poll() is None:
                _stop_group(proc, stop_signal)
        finally:
            if proc.poll() is None:
                _stop_group(proc, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return ToolResult(
            argv=list(argv),
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            wall_s=wall,
            timed_out=timed_out,
            stopped_early=stopped_early,
        )


def run_streaming(argv: Sequence[str], *, timeout_s: float, cwd: Path | None = None) -> ToolResult:
    """Like :func:`run_tool`, but echo the output (stderr merged into stdout) line by line as
    it comes, and keep it."""
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        errors="replace",
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            _stop_group(proc, signal.SIGKILL)
    reader.join(timeout=KILL_GRACE_S)
    return ToolResult(
        argv=list(argv),
        returncode=proc.returncode,
        stdout="".join(lines),
        stderr="",
        wall_s=time.monotonic() - start,
        timed_out=timed_out,
        stopped_early=False,
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=KILL_GRACE_S)


# --------------------------------------------------------------------------- load generators


def siege_rc(folder: Path, *, limit: int = 4096) -> Path:
    """A private siegerc: benchmark mode, ``Connection: close``, JSON summary, no log file,
    and a concurrency limit above the Debian default of 255 (which refuses ``-c 1000``)."""
    rc = folder / "siegerc"
    rc.write_text(
        "\n".join(
            [
                "verbose = false",
                "color = off",
                "quiet = true",
                "json_output = true",
                "show-logfile = false",
                "logging = false",
                "protocol = HTTP/1.1",
                "chunked = true",
                "cache = false",
                "connection = close",
                "delay = 0.0",
                "internet = false",
                "benchmark = true",
                "accept-encoding = identity",
                "url-escaping = true",
                "parser = false",
                f"limit = {limit}",
                "",
            ]
        )
    )
    return rc


def siege_env(rc: Path) -> dict[str, str]:
    """siege writes ``$HOME/.siege`` (a config template, cookies) even with ``-R``: give it a
    home inside the benchmark's scratch folder, next to its rc file."""
    home = rc.parent / "siege-home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home)}


def siege_argv(
    rc: Path, url: str, *, concurrency: int, seconds: float, close: bool = True
) -> list[str]:
    argv = [
        require("siege")["siege"],
        "-R",
        str(rc),
        "-b",
        "-c",
        str(concurrency),
        "-t",
        f"{max(1, round(seconds))}S",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


def siege_stats(result: ToolResult) -> dict[str, float]:
    """siege's JSON summary (printed at the end of a run, also after SIGINT); {} if none."""
    text = result.stdout
    start = text.rfind("{")
    if start < 0:
        return {}
    with contextlib.suppress(json.JSONDecodeError):
        data = json.loads(text[start : text.rfind("}") + 1])
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}
    return {}


def wrk_argv(
    url: str, *, threads: int, connections: int, seconds: float, close: bool = False
) -> list[str]:
    argv = [
        require("wrk")["wrk"],
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


@dataclass(frozen=True)
class WrkStats:
    requests: int
    seconds: float
    rps: float
    socket_errors: str
    non_2xx: int


_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_ERRORS = re.compile(r"Socket errors: (.*)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk_stats(result: ToolResult) -> WrkStats:
    text = result.stdout
    total = _WRK_TOTAL.search(text)
    rps = _WRK_RPS.search(text)
    if total is None or rps is None:
        raise RuntimeError(
            f"wrk printed no summary: {shlex.join(result.argv)}\n{text}\n{result.stderr}"
        )
    errors = _WRK_ERRORS.search(text)
    non2xx = _WRK_NON2XX.search(text)
    return WrkStats(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNIT_S[total.group(3)],
        rps=float(rps.group(1)),
        socket_errors=errors.group(1).strip() if errors else "none",
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
    )


# --------------------------------------------------------------------------- targets


def seed_manifest(name: str) -> Manifest:
    """A built-in target's manifest (``seed-buggy``, ``seed-fixed``)."""
    return load_manifest(resolve_target(name, ROOT))


# In the manifest's template syntax: {host} {port} {workdir} are filled in per start, literal
# braces are doubled; @WORKERS@ is replaced first.
NGINX_CONF = """
daemon off;
master_process on;
worker_processes @WORKERS@;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body_temp;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    default_type text/plain;
    keepalive_requests 1000000;
    server {{
        listen {host}:{port};
        location / {{ return 200 "$uri\\n"; }}
    }}
}}
"""


def nginx_manifest(folder: Path, *, workers: int = 1) -> Manifest:
    """A minimal nginx (Debian ``/usr/sbin/nginx``) with ``workers`` worker processes.

    The bench generates its own config rather than using ``targets/nginx`` (2 workers, access
    log on): one worker and no access log make it a like-for-like opponent of a one-loop
    server, and keep the figure independent of that target's evolution.
    """
    nginx = require("nginx")["nginx"]
    path = folder / "nginx-bench.toml"  # never written: only names the manifest in messages
    return Manifest(
        name=f"nginx-{workers}w",
        path=path,
        command=(
            nginx,
            "-p",
            "{workdir}",
            "-c",
            "{workdir}/nginx.conf",
            "-e",
            "{workdir}/error.log",
        ),
        description=f"nginx, {workers} worker(s), return 200 $uri",
        files={"nginx.conf": NGINX_CONF.replace("@WORKERS@", str(workers))},
        echo_path=True,
        stop_signal="SIGQUIT",
        stop_timeout_s=5.0,
        ready=ReadySpec(http="/ready", timeout_s=10.0),
    )


def build(manifest: Manifest) -> Path | None:
    """Build the target (cached by the harness) outside any timed section."""
    return launch.build_target(manifest, "none", uuid.uuid4().hex)


def warm_shim() -> Path:
    """Build the tracer shim (cached) outside any timed section."""
    return shim.shim_path()


@dataclass
class Started:
    target: Server
    mode: str
    trace_dir: Path | None

    @property
    def url(self) -> str:
        return f"http://{self.target.host}:{self.target.port}/"

    def alive(self) -> bool:
        return self.target.exit_status() is None


@contextlib.contextmanager
def started(
    manifest: Manifest, artefact: Path | None, mode: str, workdir: Path
) -> Iterator[Started]:
    """Start ``manifest`` on a leased loopback port: untraced (``off``), traced by the shim
    (``preload``: ``shim_env``'s LD_PRELOAD) or under ``strace -f``.  Always stopped after."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    workdir.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    trace_dir: Path | None = None
    if mode == "preload":
        trace_dir = workdir / "trace"
        trace_dir.mkdir(parents=True, exist_ok=True)
        env = shim.shim_env(trace_dir)
    elif mode == "strace":
        first = manifest.command[0]
        if "/" in first and not os.path.isabs(first):
            first = str((manifest.folder / first).resolve())
        command = (require("strace")["strace"], *STRACE_ARGS, first, *manifest.command[1:])
        manifest = dataclasses.replace(manifest, command=command)
    with ports.lease_port(HOST) as lease:
        plan = launch.make_plan(
            manifest,
            host=HOST,
            port=lease.port,
            workdir=workdir,
            artefact=artefact,
            trace_dir=trace_dir,
            extra_env=env,
        )
        target = ProcessRunner().start(plan)
        try:
            yield Started(target, mode, trace_dir)
        finally:
            target.stop()


@dataclass(frozen=True)
class TraceFill:
    processes: int
    records_max: int  # chunks taken x records per chunk: an upper bound of records written
    lost: int


def trace_fill(trace_dir: Path) -> TraceFill:
    """How full the shim's trace files are, from their headers only (cheap)."""
    procs = records = lost = 0
    for path in trace_dir.glob("trace.*.bin"):
        with path.open("rb") as f:
            raw = f.read(trace_format.HEADER_STRUCT.size)
        if len(raw) < trace_format.HEADER_STRUCT.size:
            continue
        fields = trace_format.HEADER_STRUCT.unpack(raw)
        chunk_records, n_chunks, next_chunk, lost_records = (
            fields[4],
            fields[5],
            fields[9],
            fields[10],
        )
        procs += 1
        records += min(next_chunk, n_chunks) * chunk_records
        lost += lost_records
    return TraceFill(procs, records, lost)


@contextlib.contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A private temporary folder for one benchmark, removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=f"afterclose-bench-{prefix}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (the spread of noisy per-cycle ratios)."""
    if len(xs) < 2:
        x = xs[0] if xs else float("nan")
        return x, x
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def interleave(a: int, b: int) -> list[str]:
    """An order for ``a`` runs of "a" and ``b`` runs of "b" that spreads the b runs evenly."""
    order: list[str] = []
    done_b = 0
    for i in range(a):
        order.append("a")
        while done_b < b and (done_b + 1) * a <= (i + 1) * b + b // 2:
            order.append("b")
            done_b += 1
    order.extend("b" * (b - done_b))
    return order


def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` rotated by ``k``: round k starts with a different one (no fixed first slot)."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def fmt_s(x: float) -> str:
    return f"{x:.1f} s"


# --------------------------------------------------------------------------- the report


def command_line(script: str, args: Sequence[str]) -> str:
    """The command that reproduces this run (every option spelled out)."""
    return shlex.join(["python3", f"bench/{script}", *args])


def append_row(
    section: str, columns: Sequence[str], row: Sequence[str], *, title: str, doc: Path = DOC
) -> None:
    """Append ``row`` to the table between ``<!-- bench:SECTION:start/end -->`` in ``doc``.

    A missing file or section gets a fresh section (title and header row) at the end; the rest
    of the file is kept.  A lock (outside the repository) serialises concurrent writers.
    """
    start, end = f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"
    line = "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
    doc.parent.mkdir(parents=True, exist_ok=True)
    with DOC_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        if start not in text or end not in text:
            header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
            text = text.rstrip("\n") + f"\n\n## {title}\n\n{start}\n{header}\n{end}\n"
        head, _, tail = text.partition(end)
        doc.write_text(head.rstrip("\n") + "\n" + line + "\n" + end + tail)
    print(
        f"row appended to {doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc} [{section}]"
    )


def context_cells(command: str, load_before: str) -> list[str]:
    """The cells every row starts with: date, machine, load (start → end), command."""
    return [today(), machine().describe(), f"{load_before} → {load()}", f"`{command}`"]


CONTEXT_COLUMNS = ("date", "machine", "load (1/5/15 min, start → end)", "command")
