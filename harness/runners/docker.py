"""The Docker runner: the target as the main process of a container on the host's network.

The container shares the host's network namespace (``network_mode="host"``), so the target
binds the same ``{host}:{port}`` as under the process runner and the black-box oracle reads
its sockets from ``/proc/<host pid>/net/tcp``.  The workdir is bind-mounted read-write at its
host path; the container's stdout and stderr are copied into ``target.stdout`` and
``target.stderr`` there by two threads following the engine's log stream.

Every container carries labels naming the process that started it.  It is removed when the
test stops it, at interpreter exit (``atexit``), on SIGTERM (a handler removes this process's
containers, then lets the signal kill the process as before), and otherwise by
:func:`sweep_containers` the next time a runner is created, once its owner is dead.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from afterclose.harness import images
from afterclose.harness.errors import ManifestError, TargetStartError
from afterclose.harness.images import ImageChoice
from afterclose.harness.manifest import Manifest
from afterclose.harness.runners.base import ExitStatus, LaunchPlan, Runner, RunningTarget
from afterclose.harness.runners.process import process_tree

LABEL = "afterclose"
LABEL_SESSION = "afterclose.session"
LABEL_PID = "afterclose.pid"
LABEL_PID_START = "afterclose.pidstart"
LABEL_PIDNS = "afterclose.pidns"
LABEL_BOOT = "afterclose.boot"
LABEL_PROC = "afterclose.proc"
LABEL_TARGET = "afterclose.target"
LABEL_TEST = "afterclose.test"

ENGINE_TIMEOUT_S = 60
LOG_DRAIN_S = 5.0
KILL_WAIT_S = 10.0
ENGINE_HINT = (
    "start dockerd (as root: `dockerd &`, or `systemctl start docker`) and check "
    "`docker info`, or use --runner=process"
)


# ------------------------------------------------------------------- identity and labels


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _alive(pid: int, start_time: str | None = None) -> bool:
    """``pid`` runs (not a zombie) and, if given, is the process that started at
    ``start_time`` (clock ticks after boot), not a later one that reused its number."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or fields[19] == start_time


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"


def _boot_id() -> str:
    return (_read("/proc/sys/kernel/random/boot_id") or "unknown").strip()


_PROC_TOKEN = uuid.uuid4().hex
_SESSION: str | None = None


def session_id() -> str:
    """One id per test run: ``AFTERCLOSE_SESSION`` if set, else the id pytest-xdist gives all
    workers of one run, else one generated for this process."""
    global _SESSION
    for var in ("AFTERCLOSE_SESSION", "PYTEST_XDIST_TESTRUNUID"):
        value = os.environ.get(var)
        if value:
            return value
    if _SESSION is None:
        _SESSION = uuid.uuid4().hex[:16]
    return _SESSION


def process_label() -> str:
    """The label filter that matches exactly the containers this process started."""
    return f"{LABEL_PROC}={_PROC_TOKEN}"


def owner_labels(session: str) -> dict[str, str]:
    pid = os.getpid()
    return {
        LABEL: "1",
        LABEL_SESSION: session,
        LABEL_PID: str(pid),
        LABEL_PID_START: _start_time(pid) or "",
        LABEL_PIDNS: _pid_namespace(),
        LABEL_BOOT: _boot_id(),
        LABEL_PROC: _PROC_TOKEN,
    }


def owner_alive(labels: Mapping[str, str]) -> bool | None:
    """Whether the process that started a container still runs; None if we cannot tell
    (it lives in another PID namespace, e.g. a pytest inside another container)."""
    if labels.get(LABEL_BOOT) not in (None, "", _boot_id()):
        return False  # the machine rebooted since: that process is gone
    if labels.get(LABEL_PIDNS, _pid_namespace()) != _pid_namespace():
        return None
    try:
        pid = int(labels[LABEL_PID])
    except (KeyError, ValueError):
        return None
    return _alive(pid, labels.get(LABEL_PID_START) or None)


# ---------------------------------------------------------------------- engine connection


@dataclass(frozen=True)
class _Engine:
    """How to reach the engine again from an exit or signal handler, with a fresh client
    whose connection pool is not in the middle of a request of the interrupted code."""

    environment: tuple[tuple[str, str], ...]  # the DOCKER_* variables (hashable)
    version: str

    def client(self, timeout: int = 30) -> Any:
        import docker

        return docker.DockerClient.from_env(
            environment=dict(self.environment), version=self.version, timeout=timeout
        )


def _import_docker() -> Any:
    try:
        import docker
    except ImportError:
        raise TargetStartError(
            "the Docker runner needs the Python package 'docker', which is not installed",
            hint="pip install 'docker>=7' (or the afterclose[docker] extra), or use "
            "--runner=process",
        ) from None
    return docker


def connect(timeout: int = ENGINE_TIMEOUT_S) -> Any:
    """A docker client for the engine named by DOCKER_HOST (default: the local socket)."""
    docker = _import_docker()
    import requests

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        message = str(exc)
        hint = ENGINE_HINT
        if "Permission denied" in message:
            hint = "run as root or add your user to the docker group; or use --runner=process"
        raise TargetStartError(
            f"the Docker engine at {where} is not reachable",
            details=message,
            hint=hint,
        ) from None
    return client


# ----------------------------------------------------------------- cleanup of leftovers


_REGISTRY_LOCK = threading.RLock()
_LIVE: dict[str, _Engine] = {}  # container name -> engine, for every container not removed
_ENGINES: dict[_Engine, None] = {}  # engines this process created containers on
_ATEXIT_INSTALLED = False
_SIGTERM_INSTALLED = False


def _register(name: str, engine: _Engine) -> None:
    with _REGISTRY_LOCK:
        _LIVE[name] = engine
        _ENGINES[engine] = None


def _unregister(name: str) -> None:
    with _REGISTRY_LOCK:
        _LIVE.pop(name, None)


def _remove_quietly(client: Any, ref: str) -> bool:
    """Force-remove a container (SIGKILL + delete); False if it was not there."""
    import docker.errors

    try:
        client.api.remove_container(ref, force=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        # 409: a removal is already in progress (another cleanup path got there first).
        if exc.status_code != 409:
            raise
    return True


def remove_own_containers() -> list[str]:
    """Remove every container this process started and has not removed yet; best effort."""
    with _REGISTRY_LOCK:
        names = dict(_LIVE)
        engines = list(_ENGINES)
    removed: list[str] = []
    for engine in engines:
        try:
            client = engine.client()
            for name, owner in names.items():
                if owner == engine and _remove_quietly(client, name):
                    removed.append(name)
                _unregister(name)
            # A container whose create call was interrupted before we learnt its name is
            # found by this process's label.
            for item in client.api.containers(all=True, filters={"label": process_label()}):
                if _remove_quietly(client, item["Id"]):
                    removed.append(str(item.get("Names", [item["Id"]])[0]).lstrip("/"))
            client.close()
        except Exception as exc:  # an exit handler must not raise
            warnings.warn(f"afterclose: could not remove containers: {exc}", stacklevel=1)
    return removed


def sweep_containers(session_id: str | None = None, *, client: Any = None) -> list[str]:
    """Remove containers labelled ``afterclose=1`` whose starting process is dead (pytest was
    SIGKILLed, or the machine lost power).  Containers without our owner labels, and those
    whose owner lives in another PID namespace, are never touched.  Returns removed names."""
    own = client is None
    if client is None:
        client = connect()
    label_filter = [f"{LABEL}=1"]
    if session_id is not None:
        label_filter.append(f"{LABEL_SESSION}={session_id}")
    removed: list[str] = []
    try:
        for item in client.api.containers(all=True, filters={"label": label_filter}):
            labels: dict[str, str] = item.get("Labels") or {}
            if LABEL_PID not in labels or LABEL_PROC not in labels:
                continue
            if owner_alive(labels) is not False:
                continue
            if _remove_quietly(client, item["Id"]):
                removed.append(str((item.get("Names") or [item["Id"]])[0]).lstrip("/"))
    finally:
        if own:
            client.close()
    return removed


def _on_sigterm_factory(previous: Any) -> Callable[[int, FrameType | None], None]:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        try:
            remove_own_containers()
        finally:
            if callable(previous):
                previous(signum, frame)
            else:
                # Die of SIGTERM as before, so whoever sent it sees the usual status.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

    on_sigterm.afterclose = True  # type: ignore[attr-defined]
    return on_sigterm


def _install_exit_handlers() -> None:
    """``atexit`` covers normal exits and Ctrl-C (KeyboardInterrupt unwinds to it).  SIGTERM
    kills Python without running atexit, so it gets a handler: only from the main thread (the
    only one allowed to set handlers; retried on the next runner otherwise) and only over the
    default or a Python handler (an ignored SIGTERM stays ignored)."""
    global _ATEXIT_INSTALLED, _SIGTERM_INSTALLED
    with _REGISTRY_LOCK:
        if not _ATEXIT_INSTALLED:
            atexit.register(remove_own_containers)
            _ATEXIT_INSTALLED = True
        if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
            return
        _SIGTERM_INSTALLED = True
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None or getattr(previous, "afterclose", False):
        return
    signal.signal(signal.SIGTERM, _on_sigterm_factory(previous))


def _after_fork_in_child() -> None:
    # A forked child must not remove its parent's containers at its own exit, and must not
    # inherit a lock some other thread of the parent held at the fork.
    global _PROC_TOKEN, _REGISTRY_LOCK
    _PROC_TOKEN = uuid.uuid4().hex
    _REGISTRY_LOCK = threading.RLock()
    _LIVE.clear()
    _ENGINES.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------------------ run_args

ULIMIT_NAMES = (
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc",
    "rss", "rtprio", "rttime", "sigpending", "stack",
)  # fmt: skip
SUPPORTED_RUN_ARGS = (
    "--ulimit NAME=SOFT[:HARD]",
    "--pids-limit N",
    "--memory/-m SIZE",
    "--cap-add CAP",
    "--cap-drop CAP",
    "--user/-u USER[:GROUP]",
    "--cpus N",
    "--shm-size SIZE",
    "--security-opt OPT",
)
_ALIASES = {"-m": "--memory", "-u": "--user"}
_FLAGS = frozenset(option.split()[0].split("/")[0] for option in SUPPORTED_RUN_ARGS)
_SIZE = re.compile(r"^[0-9]+[bkmg]?$", re.IGNORECASE)


def parse_run_args(args: Sequence[str], manifest: Manifest) -> dict[str, Any]:
    """``[docker] run_args`` (docker run flags) as docker-py ``containers.create`` keywords.
    Network, mounts, env and init are the harness's to set; other flags are rejected."""
    import docker.types

    where = manifest.path
    key = "docker.run_args"

    def fail(message: str) -> ManifestError:
        return ManifestError(
            f"key {key!r}: {message}",
            where=where,
            hint=f"supported: {', '.join(SUPPORTED_RUN_ARGS)}; put anything else in the image "
            "(a Dockerfile)",
        )

    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        flag = _ALIASES.get(flag, flag)
        if not flag.startswith("--"):
            raise fail(f"expected an option, got {arg!r}")
        if flag not in _FLAGS:
            raise fail(f"unsupported option {flag!r}")
        if not eq:
            if i + 1 >= len(args):
                raise fail(f"{flag} needs a value")
            i += 1
            value = args[i]
        i += 1
        if flag == "--ulimit":
            name, _, limits = value.partition("=")
            soft, _, hard = limits.partition(":")
            if name not in ULIMIT_NAMES or not re.fullmatch(r"-?[0-9]+", soft or "x"):
                raise fail(f"bad --ulimit {value!r}: write NAME=SOFT[:HARD], e.g. nofile=1024:4096")
            if hard and not re.fullmatch(r"-?[0-9]+", hard):
                raise fail(f"bad --ulimit {value!r}: the hard limit is not a number")
            out.setdefault("ulimits", []).append(
                docker.types.Ulimit(name=name, soft=int(soft), hard=int(hard or soft))
            )
        elif flag == "--pids-limit":
            if not re.fullmatch(r"-?[0-9]+", value):
                raise fail(f"bad --pids-limit {value!r}: a whole number")
            out["pids_limit"] = int(value)
        elif flag in ("--memory", "--shm-size"):
            if not _SIZE.match(value):
                raise fail(f"bad {flag} {value!r}: a size such as 512m or 2g")
            out["mem_limit" if flag == "--memory" else "shm_size"] = value
        elif flag in ("--cap-add", "--cap-drop"):
            out.setdefault(flag[2:].replace("-", "_"), []).append(value)
        elif flag == "--user":
            out["user"] = value
        elif flag == "--cpus":
            try:
                cpus = float(value)
            except ValueError:
                cpus = -1.0
            if cpus <= 0:
                raise fail(f"bad --cpus {value!r}: a number > 0")
            out["nano_cpus"] = int(cpus * 1e9)
        else:  # --security-opt
            out.setdefault("security_opt", []).append(value)
    return out


# ------------------------------------------------------------------------------ targets


class _LogPump(threading.Thread):
    """Copies a container's stdout and stderr into two files as they are written.

    One follow-mode request to the engine's logs endpoint carries both streams, framed as
    the Engine API documents for a container without a TTY: an 8-byte header (stream type,
    three zero bytes, big-endian payload size), then the payload.  Reading it here saves the
    two container inspections docker-py's ``logs()`` makes per call.  The request is sent
    before the thread starts, so nothing is lost; it ends once the container has stopped."""

    STREAMS = {1: 0, 2: 1}  # stream type -> index in ``paths`` (stdout, stderr)

    def __init__(self, api: Any, container_id: str, paths: tuple[Path, Path]) -> None:
        super().__init__(name=f"afterclose-logs-{container_id[:12]}", daemon=True)
        self.paths = paths
        url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/logs"
        params = {"stdout": 1, "stderr": 1, "follow": 1}
        # No read timeout: a quiet target may write nothing for minutes.
        self._response = api.get(url, params=params, stream=True, timeout=None)
        self._response.raise_for_status()
        self.error: BaseException | None = None

    def _read_exactly(self, size: int) -> bytes:
        raw = self._response.raw
        data = b""
        while len(data) < size:
            chunk = raw.read(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def run(self) -> None:
        try:
            with self.paths[0].open("ab") as out, self.paths[1].open("ab") as err:
                files = (out, err)
                while len(header := self._read_exactly(8)) == 8:
                    payload = self._read_exactly(int.from_bytes(header[4:8], "big"))
                    sink = files[self.STREAMS.get(header[0], 1)]
                    sink.write(payload)
                    sink.flush()
        except Exception as exc:  # the engine went away, or close() below
            self.error = exc
        finally:
            self._response.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._response.close()


def _signal_dropped_by_init(pid: int, signum: int) -> bool:
    """Whether the kernel would discard ``signum`` sent to ``pid``, a PID namespace's init.

    The target is PID 1 of its container (no --init), and init only receives signals it
    handles or blocks (a signalfd loop blocks them); SIGKILL is forced through.  A server
    without a SIGTERM handler would sit out the whole stop timeout, so we SIGKILL at once."""
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return False
    masks: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigBlk", "SigIgn", "SigCgt"):
            masks[name] = int(value.strip(), 16)
    if len(masks) != 3:
        return False
    bit = 1 << (signum - 1)
    if masks["SigIgn"] & bit:
        return True
    return not (masks["SigBlk"] & bit or masks["SigCgt"] & bit)


def status_from_state(state: Mapping[str, Any], by_harness: bool) -> ExitStatus:
    """The engine reports a death by signal N as exit code 128+N (as a shell does): a target
    that calls exit(139) is indistinguishable from a segfault."""
    code = int(state.get("ExitCode") or 0)
    if state.get("OOMKilled"):
        return ExitStatus(code=None, signal=signal.SIGKILL.value, stopped_by_harness=by_harness)
    if 128 < code < 128 + 65:
        return ExitStatus(code=None, signal=code - 128, stopped_by_harness=by_harness)
    return ExitStatus(code=code, signal=None, stopped_by_harness=by_harness)


def _find_cgroup_procs(pid: int, container_id: str) -> Path | None:
    """The ``cgroup.procs`` file of the container's cgroup, which lists every process in it
    (also ``docker exec``-ed ones that are no descendants of the main process)."""
    text = _read(f"/proc/{pid}/cgroup")
    if text is None:
        return None
    root = Path("/sys/fs/cgroup")
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if container_id not in rel:
            continue
        rel = rel.lstrip("/")
        if hierarchy == "0" and not controllers:
            candidates = [root / rel, root / "unified" / rel]
        else:
            names = [c.removeprefix("name=") for c in controllers.split(",")]
            candidates = [root / controllers / rel, *(root / n / rel for n in names)]
        for candidate in candidates:
            procs = candidate / "cgroup.procs"
            content = _read(str(procs))
            if content is not None and str(pid) in content.split():
                return procs
    return None


class ContainerTarget(RunningTarget):
    def __init__(
        self,
        plan: LaunchPlan,
        runner: DockerRunner,
        container_id: str,
        name: str,
        image: ImageChoice,
    ) -> None:
        super().__init__(plan)
        self.runner = runner
        self.api = runner.client.api
        self.container_id = container_id
        self.container_name = name
        self.image = image
        self.main_pid: int | None = None
        self._main_start: str | None = None
        self._procs_file: Path | None = None
        self._pumps: list[_LogPump] = []
        self._final: ExitStatus | None = None
        self._stopped_by_harness = False
        self._removed = False
        self.timings: dict[str, float] = {"image_s": image.seconds}

    @property
    def stopped_by_harness(self) -> bool:
        return self._stopped_by_harness

    # -- start

    def _begin(self) -> None:
        import docker.errors

        started = time.monotonic()
        try:
            self.api.start(self.container_id)
        except docker.errors.APIError as exc:
            # The container stays in state "created" with exit code 126/127: nothing to wait
            # for, stop() only removes it.
            self._final = ExitStatus(code=127, signal=None, stopped_by_harness=False)
            raise TargetStartError(
                f"the engine could not start target {self.name!r}",
                where=self.plan.manifest.path,
                details=f"command: {' '.join(self.plan.argv)}\nimage: {self.image.tag}\n"
                f"{exc.explanation or exc}",
                hint=_start_hint(self.image),
            ) from None
        self.timings["start_s"] = time.monotonic() - started
        self._pumps = [
            _LogPump(self.api, self.container_id, (self.plan.stdout_path, self.plan.stderr_path))
        ]
        for pump in self._pumps:
            pump.start()
        state = self._state()
        pid = int((state or {}).get("Pid") or 0)
        if pid <= 0:
            return  # already gone: exit_status() reports how, wait_ready() the log tail
        start_time = _start_time(pid)
        if not self._visible(pid):
            return  # it exited at once: exit_status() says how
        self.main_pid = pid
        self._main_start = start_time
        self._procs_file = _find_cgroup_procs(pid, self.container_id)

    def _visible(self, pid: int) -> bool:
        """True if the engine's ``pid`` for our container is that process in our /proc.

        A missing /proc entry means either that the target exited at once (the engine may
        still report it running for a moment) or that the engine lives in another PID
        namespace; only the latter is an error."""
        deadline = time.monotonic() + 2.0
        while True:
            if self.container_id in (_read(f"/proc/{pid}/cgroup") or ""):
                return True
            state = self._state()
            if not state or not state.get("Running"):
                return False
            if _alive(pid) or time.monotonic() > deadline:
                raise TargetStartError(
                    "the Docker engine's processes are not visible from here: PID "
                    f"{pid} of container {self.container_name} is not in this PID namespace",
                    where=self.plan.manifest.path,
                    hint="the fd-leak checks read /proc/<pid>; run the engine on this host "
                    "(not a remote DOCKER_HOST, not rootless Docker with its own PID "
                    "namespace), or use --runner=process",
                )
            time.sleep(0.01)

    def _state(self) -> dict[str, Any] | None:
        import docker.errors

        try:
            attrs = self.api.inspect_container(self.container_id)
        except docker.errors.NotFound:
            return None
        return dict(attrs.get("State") or {})

    # -- RunningTarget

    def host_pids(self) -> list[int]:
        pid = self.main_pid
        if pid is None or self._removed or not _alive(pid, self._main_start):
            return []
        pids: list[int] = []
        if self._procs_file is not None:
            content = _read(str(self._procs_file))
            if content is not None:
                pids = [int(p) for p in content.split()]
        if not pids:
            pids = process_tree(pid)
        rest = sorted({p for p in pids if p != pid})
        return [pid, *rest]

    def exit_status(self) -> ExitStatus | None:
        if self._final is not None:
            return self._final
        if self.main_pid is not None and _alive(self.main_pid, self._main_start):
            return None  # cheap: no engine round trip while the process runs
        deadline = time.monotonic() + 2.0
        while True:
            state = self._state()
            if state is None:
                # Removed behind our back (docker rm -f): its exit status is lost.
                self._final = ExitStatus(
                    code=None, signal=None, stopped_by_harness=self._stopped_by_harness
                )
                return self._final
            if not state.get("Running") and state.get("Status") != "created":
                break
            if self.main_pid is None and state.get("Running"):
                return None
            # The process is gone but the engine has not processed its exit yet.
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        self._drain_logs()
        self._final = status_from_state(state, self._stopped_by_harness)
        return self._final

    def stop(self) -> ExitStatus | None:
        import docker.errors
        import requests

        if self._removed:
            return self._final
        status: ExitStatus | None = None
        try:
            status = self.exit_status()
            if status is None:
                self._stopped_by_harness = True
                status = self._terminate()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            warnings.warn(
                f"afterclose: stopping {self.container_name} failed ({exc}); removing it",
                stacklevel=2,
            )
        finally:
            self._remove()
        return status

    # -- helpers

    def _kill(self, sig: str) -> bool:
        """Send ``sig``; False if the container had already stopped."""
        import docker.errors

        try:
            self.api.kill(self.container_id, signal=sig)
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # "is not running"
                return False
            raise
        return True

    def _wait_exit(self, timeout_s: float) -> ExitStatus | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.exit_status()
            if status is not None:
                return status
            time.sleep(0.01)
        return self.exit_status()

    def _terminate(self) -> ExitStatus | None:
        manifest = self.plan.manifest
        sig = signal.Signals[manifest.stop_signal]
        polite = sig != signal.SIGKILL and not (
            self.main_pid is not None and _signal_dropped_by_init(self.main_pid, sig.value)
        )
        if polite:
            if not self._kill(sig.name):
                self._stopped_by_harness = False
                return self._wait_exit(KILL_WAIT_S)
            status = self._wait_exit(manifest.stop_timeout_s)
            if status is not None:
                return status
        self._kill("SIGKILL")
        return self._wait_exit(KILL_WAIT_S)

    def _drain_logs(self) -> None:
        """Wait for the log threads to copy the last output (the stream ends once the engine
        has recorded the exit), so a crash report shows what the target wrote last."""
        deadline = time.monotonic() + LOG_DRAIN_S
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        for pump in self._pumps:
            if pump.is_alive():
                pump.close()

    def _remove(self) -> None:
        import docker.errors
        import requests

        try:
            self._drain_logs()
            _remove_quietly(self.runner.client, self.container_id)
        except (
            docker.errors.DockerException,
            requests.exceptions.RequestException,
            OSError,
        ) as exc:
            warnings.warn(
                f"afterclose: could not remove container {self.container_name}: {exc} "
                "(retried at exit)",
                stacklevel=3,
            )
            return
        self._removed = True
        _unregister(self.container_name)


def plan_host_files(plan: LaunchPlan) -> images.HostFiles:
    """Host files a closure image needs besides command[0], the {build} artefact and the
    tracer shim: those the plan names by absolute path (argv, environment, rendered files) and
    a Python interpreter's module path."""
    program = images.resolve_program(plan.argv[0], plan.env)
    if program is None:
        return images.HostFiles()
    texts = [*plan.argv[1:], *(v for k, v in plan.env.items() if k != "LD_PRELOAD")]
    for name in plan.manifest.files:
        rendered = plan.workdir / name
        if rendered.is_file():
            texts.append(rendered.read_text(errors="replace"))
    skip = [plan.workdir, plan.manifest.folder]
    if plan.trace_dir is not None:
        skip.append(plan.trace_dir)
    return images.host_files(program, texts, plan.env, skip=skip, where=plan.manifest.path)


def _start_hint(image: ImageChoice) -> str:
    if image.kind == "closure":
        return (
            "the image holds only the target's binaries and libraries and the files its "
            "command, environment and rendered files name by absolute path; name what else it "
            "execs or reads outside the workdir and manifest folder, or use "
            "[docker] dockerfile = ..."
        )
    return f"command[0] must exist and be executable inside {image.tag}"


# ------------------------------------------------------------------------------- runner


_COUNTER = itertools.count(1)


class DockerRunner(Runner):
    """Starts each target as a fresh container of an image made without a registry."""

    name = "docker"

    def __init__(
        self, client: Any = None, *, session: str | None = None, sweep: bool = True
    ) -> None:
        self.client = client if client is not None else connect()
        self.session = session or session_id()
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("DOCKER_")))
        self._engine = _Engine(environment=env, version=str(self.client.api.api_version))
        self.last_image: ImageChoice | None = None
        _install_exit_handlers()
        if sweep:
            try:
                sweep_containers(client=self.client)
            except Exception as exc:  # leftovers are untidy, not a reason to fail a test
                warnings.warn(f"afterclose: sweeping old containers failed: {exc}", stacklevel=2)

    # -- image

    def image_for(self, plan: LaunchPlan) -> ImageChoice:
        spec = plan.manifest.docker
        if spec is None:
            needs = self.host_files(plan)
            return images.closure_image(
                self.client,
                plan.manifest,
                [*self._programs(plan), *needs.programs],
                plan.env,
                [*needs.libraries, *needs.data],
            )
        if spec.image is not None:
            return images.local_image(self.client, plan.manifest)
        return images.dockerfile_image(self.client, plan.manifest)

    def _programs(self, plan: LaunchPlan) -> list[Path]:
        found: dict[str, Path] = {}
        program = images.resolve_program(plan.argv[0], plan.env)
        if program is None:
            raise TargetStartError(
                f"cannot find the program {plan.argv[0]!r} on this host to put it in an image",
                where=plan.manifest.path,
                hint="name it by path in command[0], or add a [docker] table",
            )
        for path in (program, *plan.binaries, *images.preload_paths(plan.env)):
            found.setdefault(str(path), path)
        return list(found.values())

    def host_files(self, plan: LaunchPlan) -> images.HostFiles:
        return plan_host_files(plan)

    # -- container

    def _mounts(self, plan: LaunchPlan, image: ImageChoice) -> list[Any]:
        import docker.types

        mounts: dict[str, Any] = {}

        def bind(path: Path, read_only: bool) -> None:
            if str(path) not in mounts and path.exists():
                mounts[str(path)] = docker.types.Mount(
                    target=str(path), source=str(path), type="bind", read_only=read_only
                )

        bind(plan.workdir, read_only=False)
        if plan.trace_dir is not None and not plan.trace_dir.is_relative_to(plan.workdir):
            plan.trace_dir.mkdir(parents=True, exist_ok=True)
            bind(plan.trace_dir, read_only=False)
        bind(plan.manifest.folder, read_only=True)
        if image.kind == "closure":
            for folder in self.host_files(plan).mounts:
                bind(folder, read_only=True)
        else:
            # A user image lacks the host files the plan names: the {build} artefact and the
            # tracer shim.  They work in it if the image's libc is compatible (docker.libc).
            for path in (*plan.binaries, *images.preload_paths(plan.env)):
                bind(path, read_only=True)
        # The engine mounts in path order, so a read-write workdir inside the read-only
        # manifest folder still ends up writable.
        return list(mounts.values())

    def _entrypoint(self, plan: LaunchPlan, image: ImageChoice) -> str:
        # The manifest's command replaces the image's ENTRYPOINT and CMD.  A bare program
        # name is found on the host; the closure image has it at the same path but maybe not
        # on the engine's default PATH.
        first = plan.argv[0]
        if image.kind == "closure" and "/" not in first:
            resolved = images.resolve_program(first, plan.env)
            if resolved is not None:
                return str(resolved)
        return first

    def launch(self, plan: LaunchPlan) -> ContainerTarget:
        docker = _import_docker()
        manifest = plan.manifest
        extra = parse_run_args(manifest.docker.run_args if manifest.docker else (), manifest)
        image = self.image_for(plan)
        self.last_image = image
        plan.workdir.mkdir(parents=True, exist_ok=True)
        for path in (plan.stdout_path, plan.stderr_path):
            path.write_bytes(b"")
        if extra.get("user") not in (None, "root", "0", "0:0"):
            # Another user in the container must be able to write the bind-mounted folders.
            for folder in (plan.workdir, plan.trace_dir):
                if folder is not None:
                    folder.chmod(0o777)
        slug = images.repo_name(manifest.name).removeprefix(images.IMAGE_REPO_PREFIX)
        name = f"afterclose-{slug}-{os.getpid()}-{next(_COUNTER)}-{_PROC_TOKEN[:6]}"
        labels = {
            **owner_labels(self.session),
            LABEL_TARGET: manifest.name,
            LABEL_TEST: os.environ.get("PYTEST_CURRENT_TEST", "")[:200],
        }
        # Registered before the create call: if Ctrl-C lands while the engine is creating
        # the container, the cleanup still knows its name.
        _register(name, self._engine)
        target: ContainerTarget | None = None
        try:
            started = time.monotonic()
            api = self.client.api
            try:
                host_config = api.create_host_config(
                    network_mode="host",
                    init=False,
                    mounts=self._mounts(plan, image),
                    # json-file keeps the output readable through the logs API whatever the
                    # engine's default log driver is.
                    log_config=docker.types.LogConfig(
                        type="json-file", config={"max-size": "100m", "max-file": "2"}
                    ),
                    **{k: v for k, v in extra.items() if k != "user"},
                )
                created = api.create_container(
                    image=image.tag,
                    entrypoint=[self._entrypoint(plan, image)],
                    command=list(plan.argv[1:]),
                    name=name,
                    labels=labels,
                    environment=dict(plan.env),
                    working_dir=str(plan.cwd),
                    user=extra.get("user"),
                    host_config=host_config,
                    stop_signal=manifest.stop_signal,
                    detach=True,
                    stdin_open=False,
                    tty=False,
                )
            except docker.errors.ImageNotFound:
                raise TargetStartError(
                    f"image {image.tag!r} vanished before the container was created",
                    where=manifest.path,
                    hint="something removed it (docker image prune?); run again",
                ) from None
            except docker.errors.APIError as exc:
                raise TargetStartError(
                    f"the engine refused to create a container for {manifest.name!r}",
                    where=manifest.path,
                    details=str(exc.explanation or exc),
                    hint="check [docker] run_args",
                ) from None
            target = ContainerTarget(plan, self, str(created["Id"]), name, image)
            target.timings["create_s"] = time.monotonic() - started
            target._begin()
        except BaseException:
            if target is not None:
                target.stop()
            else:
                with contextlib.suppress(Exception):
                    _remove_quietly(self.client, name)
                    _unregister(name)
            raise
        return target
