"""The default runner: the target as a local process group on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from afterclose.harness import procfs
from afterclose.harness.errors import TargetStartError
from afterclose.harness.orphans import die_with_parent
from afterclose.harness.runners.base import ExitStatus, LaunchPlan, Runner, Server


class ProcessServer(Server):
    def __init__(self, plan: LaunchPlan, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(plan)
        self.proc = proc
        self._final: ExitStatus | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def host_pids(self) -> list[int]:
        if self.proc.poll() is not None:
            return [p for p in procfs.process_tree(self.proc.pid) if p != self.proc.pid]
        return procfs.process_tree(self.proc.pid)

    def _status(self, code: int, by_harness: bool) -> ExitStatus:
        if code < 0:
            return ExitStatus(code=None, signal=-code, stopped_by_harness=by_harness)
        return ExitStatus(code=code, signal=None, stopped_by_harness=by_harness)

    def exit_status(self) -> ExitStatus | None:
        if self._final is not None:
            return self._final
        code = self.proc.poll()
        if code is None:
            return None
        self._final = self._status(code, by_harness=False)
        return self._final

    def stop(self) -> ExitStatus | None:
        status = self.exit_status()
        leftovers = procfs.process_tree(self.proc.pid)
        if status is None:
            sig = signal.Signals[self.plan.manifest.stop_signal]
            self._signal_group(sig, leftovers)
            try:
                code = self.proc.wait(timeout=self.plan.manifest.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL, procfs.process_tree(self.proc.pid))
                code = self.proc.wait(timeout=10)
            self._final = self._status(code, by_harness=True)
            status = self._final
        # Children that outlived the main process (or ignored the stop signal) go too.
        rest = [p for p in procfs.process_tree(self.proc.pid) if p != self.proc.pid] or [
            p for p in leftovers if p != self.proc.pid and procfs.exists(p)
        ]
        if rest:
            self._signal_group(signal.SIGKILL, rest)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(procfs.alive(p) for p in rest):
                time.sleep(0.01)
        return status

    def _signal_group(self, sig: signal.Signals, pids: list[int]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
        # Members of the group got it already; a second copy can kill a server that is in
        # the middle of its graceful stop (and has restored the default action).
        for pid in pids:
            if _pgid(pid) == self.proc.pid:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class ProcessRunner(Runner):
    name = "process"

    def launch(self, plan: LaunchPlan) -> ProcessServer:
        env = {**os.environ, **plan.env}
        plan.workdir.mkdir(parents=True, exist_ok=True)
        with plan.stdout_path.open("wb") as out, plan.stderr_path.open("wb") as err:
            try:
                proc = subprocess.Popen(
                    list(plan.argv),
                    cwd=plan.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            except OSError as exc:
                raise TargetStartError(
                    f"cannot start target {plan.manifest.name!r}: {exc.strerror}",
                    where=plan.manifest.path,
                    details=f"command: {' '.join(plan.argv)}\ncwd: {plan.cwd}",
                    hint="command[0] is resolved relative to the manifest's folder; "
                    "check that it exists and is executable (or add a build step)",
                ) from None
        return ProcessServer(plan, proc)
