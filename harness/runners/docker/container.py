"""A started container seen as a running target: its host pids, exit status and stop."""

from __future__ import annotations

import signal
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afterclose.harness import procfs
from afterclose.harness.errors import TargetStartError
from afterclose.harness.runners.base import ExitStatus, LaunchPlan, Server
from afterclose.harness.runners.docker import reaper
from afterclose.harness.runners.docker.images import ImageChoice
from afterclose.harness.runners.docker.logs import LogPump

if TYPE_CHECKING:
    from afterclose.harness.runners.docker.runner import DockerRunner

LOG_DRAIN_S = 5.0
KILL_WAIT_S = 10.0


def status_from_state(state: Mapping[str, Any], by_harness: bool) -> ExitStatus:
    """The engine reports a death by signal N as exit code 128+N (as a shell does): a target
    that calls exit(139) is indistinguishable from a segfault."""
    code = int(state.get("ExitCode") or 0)
    if state.get("OOMKilled"):
        return ExitStatus(code=None, signal=signal.SIGKILL.value, stopped_by_harness=by_harness)
    if 128 < code < 128 + 65:
        return ExitStatus(code=None, signal=code - 128, stopped_by_harness=by_harness)
    return ExitStatus(code=code, signal=None, stopped_by_harness=by_harness)


class ContainerServer(Server):
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
        self._pumps: list[LogPump] = []
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
                hint=start_hint(self.image),
            ) from None
        self.timings["start_s"] = time.monotonic() - started
        self._pumps = [
            LogPump(self.api, self.container_id, (self.plan.stdout_path, self.plan.stderr_path))
        ]
        for pump in self._pumps:
            pump.start()
        state = self._state()
        pid = int((state or {}).get("Pid") or 0)
        if pid <= 0:
            return  # already gone: exit_status() reports how, wait_ready() the log tail
        start_time = procfs.start_time(pid)
        if not self._visible(pid):
            return  # it exited at once: exit_status() says how
        self.main_pid = pid
        self._main_start = start_time
        self._procs_file = procfs.cgroup_procs_file(pid, self.container_id)

    def _visible(self, pid: int) -> bool:
        """True if the engine's ``pid`` for our container is that process in our /proc.

        A missing /proc entry means either that the target exited at once (the engine may
        still report it running for a moment) or that the engine lives in another PID
        namespace; only the latter is an error."""
        deadline = time.monotonic() + 2.0
        while True:
            if procfs.in_cgroup(pid, self.container_id):
                return True
            state = self._state()
            if not state or not state.get("Running"):
                return False
            if procfs.alive(pid) or time.monotonic() > deadline:
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

    # -- Server

    def host_pids(self) -> list[int]:
        pid = self.main_pid
        if pid is None or self._removed or not procfs.alive(pid, self._main_start):
            return []
        pids = procfs.pids_in(self._procs_file) if self._procs_file is not None else []
        if not pids:
            pids = procfs.process_tree(pid)
        rest = sorted({p for p in pids if p != pid})
        return [pid, *rest]

    def exit_status(self) -> ExitStatus | None:
        if self._final is not None:
            return self._final
        if self.main_pid is not None and procfs.alive(self.main_pid, self._main_start):
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
        # The target is PID 1 of its container (no --init), and the kernel drops a signal
        # sent to a namespace's init unless it handles or blocks it: a server without a
        # SIGTERM handler would sit out the whole stop timeout, so it gets SIGKILL at once.
        polite = sig != signal.SIGKILL and not (
            self.main_pid is not None and procfs.signal_dropped_by_init(self.main_pid, sig.value)
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
            reaper.remove_quietly(self.runner.client, self.container_id)
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
        reaper.unregister(self.container_name)


def start_hint(image: ImageChoice) -> str:
    if image.kind == "closure":
        return (
            "the image holds only the target's binaries and libraries and the files its "
            "command, environment and rendered files name by absolute path; name what else it "
            "execs or reads outside the workdir and manifest folder, or use "
            "[docker] dockerfile = ..."
        )
    return f"command[0] must exist and be executable inside {image.tag}"
