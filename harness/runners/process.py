"""The default runner: the target as a local process group on loopback, under a subreaper
supervisor (``harness/subreaper.py``) so that nothing it starts outlives the harness."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import threading
import time

from afterclose.harness import orphans, procfs
from afterclose.harness.errors import TargetStartError
from afterclose.harness.runners.base import ExitStatus, LaunchPlan, Runner, Server

SPAWN_TIMEOUT_S = 30.0


class ProcessServer(Server):
    def __init__(
        self, plan: LaunchPlan, proc: subprocess.Popen[bytes], link: socket.socket, pid: int
    ) -> None:
        super().__init__(plan)
        self.proc = proc  # the supervisor
        self._link = link
        self._pid = pid
        self._buffer = b""
        self._final: ExitStatus | None = None
        self._stopping = False  # stop() has signalled the target
        self._main_status: tuple[int | None, int | None] | None = None
        self._lock = threading.Lock()  # exit_status() is also polled from tracer threads

    @property
    def pid(self) -> int:
        """The target's main process (the supervisor's child)."""
        return self._pid

    @property
    def supervisor_pid(self) -> int:
        return self.proc.pid

    def host_pids(self) -> list[int]:
        tree = [p for p in procfs.process_tree(self.proc.pid) if p != self.proc.pid]
        if self._pid in tree:
            tree.remove(self._pid)
            tree.insert(0, self._pid)
        return tree

    def _read_link(self) -> None:
        with self._lock:
            self._read_link_locked()

    def _read_link_locked(self) -> None:
        if self._main_status is not None or self._link.fileno() < 0:
            return
        # Polled before the read: a supervisor that reported and then exited is read whole.
        supervisor_gone = self.proc.poll() is not None
        with contextlib.suppress(BlockingIOError, OSError):
            while True:
                data = self._link.recv(4096, socket.MSG_DONTWAIT)
                if not data:
                    break
                self._buffer += data
        for line in self._buffer.decode(errors="replace").splitlines():
            word, _, value = line.partition(" ")
            if word == "exited":
                self._main_status = (int(value), None)
            elif word == "signaled":
                self._main_status = (None, int(value))
        if self._main_status is None and supervisor_gone:
            # The supervisor itself was killed: the target went with it.
            self._main_status = (None, signal.SIGKILL)

    def exit_status(self) -> ExitStatus | None:
        if self._final is not None:
            return self._final
        self._read_link()
        if self._main_status is None:
            return None
        code, sig = self._main_status
        # Asked from another thread (the eBPF tracer's watchdog) while stop() is under way: the
        # exit is the harness's doing, and stop() records the final word.
        status = ExitStatus(code=code, signal=sig, stopped_by_harness=self._stopping)
        if not self._stopping:
            self._final = status
        return status

    def _wait_main(self, timeout_s: float) -> bool:
        # The link stays a blocking socket: with a timeout set, Python waits for readability
        # before every recv, MSG_DONTWAIT or not, and _read_link's last read (the one that
        # finds nothing more) would sleep that whole timeout.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._read_link()
            if self._main_status is not None:
                return True
            with contextlib.suppress(OSError, ValueError):
                left = max(0.0, deadline - time.monotonic())
                if select.select([self._link], [], [], min(0.1, left))[0]:
                    peek = self._link.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    if not peek:  # the supervisor closed its end: it is gone or going
                        if self.proc.poll() is not None:
                            self._read_link()
                            return True
                        time.sleep(0.005)
        self._read_link()
        return self._main_status is not None

    def stop(self) -> ExitStatus | None:
        status = self.exit_status()
        if status is None:
            self._stopping = True
            sig = signal.Signals[self.plan.manifest.stop_signal]
            self._signal_tree(sig)
            if not self._wait_main(self.plan.manifest.stop_timeout_s):
                self._signal_tree(signal.SIGKILL)
                self._wait_main(10)
            self._read_link()
            code, signum = self._main_status or (None, signal.SIGKILL)
            self._final = ExitStatus(code=code, signal=signum, stopped_by_harness=True)
            status = self._final
        # Children that outlived the main process (or ignored the stop signal) go too: the
        # supervisor kills its whole subtree once the harness lets go of it.
        rest = self.host_pids()
        with contextlib.suppress(OSError):
            self._link.shutdown(socket.SHUT_RDWR)
        self._link.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(procfs.alive(p) for p in rest):
            time.sleep(0.01)
        return status

    def _signal_tree(self, sig: signal.Signals) -> None:
        # The supervisor leads the target's process group and handles the stop signals, so
        # one killpg reaches the group; processes that left it (setsid) get their own copy.
        # A second copy to a group member could kill a server in the middle of its graceful
        # stop (after it restored the default action).
        group = self.proc.pid
        if sig == signal.SIGKILL:
            pids = self.host_pids()
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
            pids = [p for p in self.host_pids() if _pgid(p) != group]
        for pid in pids:
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
        plan.workdir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair()
        argv = orphans.supervised(list(plan.argv), theirs.fileno(), plan.env)
        with plan.stdout_path.open("wb") as out, plan.stderr_path.open("wb") as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=plan.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    pass_fds=(theirs.fileno(),),
                )
            except OSError as exc:
                ours.close()
                theirs.close()
                raise self._start_error(plan, exc.errno) from None
        theirs.close()
        line = _first_line(ours, proc)
        word, _, value = line.partition(" ")
        if word != "started":
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            ours.close()
            errno_ = int(value) if word == "failed" and value.isdigit() else None
            raise self._start_error(plan, errno_)
        return ProcessServer(plan, proc, ours, int(value))

    @staticmethod
    def _start_error(plan: LaunchPlan, errno_: int | None) -> TargetStartError:
        program = plan.argv[0]
        why = os.strerror(errno_) if errno_ is not None else "the supervisor did not start it"
        if "/" in program:
            hint = (
                "a command[0] with a '/' is resolved relative to the manifest's folder "
                f"({plan.cwd}); check that it exists and is executable (or add a build step)"
            )
        else:
            hint = (
                f"{program!r} is looked up on PATH; install it, or give its path "
                "(relative to the manifest's folder, e.g. './bin/server')"
            )
        return TargetStartError(
            f"cannot start target {plan.manifest.name!r}: {why}",
            where=plan.manifest.path,
            details=f"command: {' '.join(plan.argv)}\ncwd: {plan.cwd}",
            hint=hint,
        )


def _first_line(link: socket.socket, proc: subprocess.Popen[bytes]) -> str:
    """The supervisor's first report: ``started PID`` or ``failed ERRNO``."""
    data = b""
    link.settimeout(SPAWN_TIMEOUT_S)
    with contextlib.suppress(OSError):
        while not data.endswith(b"\n"):
            byte = link.recv(1)  # byte by byte: what follows the line is the exit status
            if not byte:
                break
            data += byte
    link.settimeout(None)
    return data.decode(errors="replace").strip()
