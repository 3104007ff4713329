"""ServerControl: what a target-side fault may do to the started server, and nothing more.

A target-side fault (``fd_limit``, ``kill``, ``pause``, ...) gets one of these from the test's
run (:meth:`~afterclose.harness.session.TargetRun.control`) instead of the run itself::

    server.endpoint()          where it listens (host, port); ``through_restarts``
    server.pids()              its host PIDs, main one first (``live_pids``: error if none)
    server.alive(), exit_status(), wait_exit(timeout_s)
    server.signal(signum)      to every process, by host PID (both runners); the run notes
                               them as ended by the harness (but for SIGSTOP/SIGCONT)
    server.restart(why)        start the same launch plan again; the run adopts the new one
    server.set_nofile(...)     prlimit on a live process; update_cgroup(...): the container's
    server.pause(), resume(), wait_paused(timeout_s)
    server.census(), baseline  its sockets now, and when it had settled after its start
    server.restart_keeps, fd_grace_s, name, runner: the manifest settings faults read
    server.run_clients(...), start_clients(...): a client fault against it, here or on a thread

The runner and tracer stay behind this handle: how a restart keeps the trace readable, how a
container is paused or limited, is the session's business, not the fault's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from afterclose.harness import procfs
from afterclose.harness.errors import ScenarioError

if TYPE_CHECKING:
    from afterclose.faults.base import Endpoint, Fault, FaultReport
    from afterclose.harness.runners.base import ExitStatus, Server
    from afterclose.harness.runners.docker import ContainerServer
    from afterclose.harness.session import TargetRun


# Signals that stop and resume a process rather than end it.
_PAUSING = frozenset({signal.SIGSTOP, signal.SIGCONT})


def wait_for(check: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> bool:
    """Whether ``check()`` came true within ``timeout_s`` (asked every ``step_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)


class ServerControl:
    """The narrow handle on one test's started server that a target-side fault acts through.

    ``fault``: the fault's name, for the errors it raises (``where``)."""

    def __init__(self, run: TargetRun, fault: str) -> None:
        self._run = run
        self.fault = fault
        # PID inside the server's PID namespace -> host PID, of every process signalled:
        # what a restart needs to keep the trace of a dead container apart from the new one.
        self._namespace_pids: dict[int, int] = {}
        self._paused: list[int] | None = None  # the SIGSTOPped PIDs, or [] for a container

    # -- where, and the manifest's settings

    @property
    def name(self) -> str:
        """The target's name (its manifest's)."""
        return self._run.manifest.name

    @property
    def host(self) -> str:
        return self._run.host

    @property
    def port(self) -> int:
        return self._run.port

    @property
    def runner(self) -> str:
        """The runner's name: ``process`` or ``docker``."""
        return self._run.harness.runner.name

    @property
    def restart_keeps(self) -> tuple[str, ...]:
        """Paths the manifest says are answered the same after a kill and restart."""
        return self._run.manifest.restart_keeps

    @property
    def fd_grace_s(self) -> float:
        """How long the manifest gives the server to close its sockets."""
        return self._run.manifest.fd_grace_s

    def endpoint(self, *, through_restarts: bool = False) -> Endpoint:
        """Where clients connect.  ``through_restarts``: clients keep going while the server
        is down (its death would otherwise stop them: a restart follows)."""
        endpoint = self._run.endpoint()
        return dataclasses.replace(endpoint, gone=None) if through_restarts else endpoint

    @property
    def where(self) -> str:
        """Where this fault's errors say they happened."""
        return f"{self._run.test_name}: fault {self.fault!r}"

    def error(self, problem: str, hint: str | None = None) -> ScenarioError:
        """A ScenarioError from the fault: ``fault 'NAME': problem``."""
        return ScenarioError(f"fault {self.fault!r}: {problem}", where=self.where, hint=hint)

    # -- its processes

    @property
    def _server(self) -> Server:
        return self._run.server

    def pids(self) -> list[int]:
        """The server's host PIDs, main one first (empty once it is gone)."""
        return self._server.host_pids()

    def live_pids(self) -> list[int]:
        """The server's host PIDs; ScenarioError if it has none (it is not running)."""
        pids = self.pids()
        if not pids:
            raise self.error("the target is not running")
        return pids

    def exit_status(self) -> ExitStatus | None:
        """None while the server runs; how it ended otherwise."""
        return self._server.exit_status()

    def alive(self) -> bool:
        return self.exit_status() is None

    def wait_exit(self, timeout_s: float) -> bool:
        """Whether the server ended within ``timeout_s``."""
        server = self._server
        return wait_for(lambda: server.exit_status() is not None, timeout_s)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the server, by host PID."""
        pids = self.pids()
        # Read now: once they die /proc no longer says which namespace PIDs they had.
        self._namespace_pids.update(procfs.namespace_pids(pids))
        if signum not in _PAUSING:
            name = signal.Signals(signum).name
            self._run.note_ended(pids, f"the harness ended it (fault {self.fault!r} sent {name})")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def restart(self, why: str) -> ExitStatus | None:
        """Stop what is left of the server and start the same launch plan again (same port,
        workdir and trace folder); from then on this handle, the run and the oracle mean the
        new one.  ``why``: what ended it, for the error if it does not come back
        (TargetStartError).  Returns how the old one ended."""
        status = self._run.restart(why, self._namespace_pids)
        self._namespace_pids = {}
        return status

    # -- its sockets

    def census(self) -> procfs.SocketCensus:
        """The server's socket fds and connections on its port, now."""
        return procfs.census(self.pids(), self.port)

    @property
    def baseline(self) -> procfs.SocketCensus:
        """The census once the server had settled after its start."""
        return self._run.baseline

    # -- limits

    def set_nofile(self, pid: int, limit: int) -> bool:
        """Set ``RLIMIT_NOFILE`` (soft and hard) of the live process ``pid``; False if it is
        gone.  Root may do that to any process, containers' included."""
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        except ProcessLookupError:
            return False
        except PermissionError:
            # Root without CAP_SYS_RESOURCE (a sandboxed host) may still lower the limits of
            # a process whose user it takes on: a container's non-root user, for one.
            done = _prlimit_as_owner(pid, limit)
            if done is not None:
                return done
            raise self.error(
                f"may not change the open-file limit of PID {pid}",
                hint="prlimit on another process needs root (CAP_SYS_RESOURCE) or the "
                "same user; run as root, or start the target with a low limit "
                "([docker] run_args = ['--ulimit', 'nofile=64'])",
            ) from None
        return True

    def _container(self) -> ContainerServer | None:
        """The server as a container (Docker runner), else None."""
        if self.runner != "docker":
            return None
        from afterclose.harness.runners.docker import ContainerServer

        server = self._server
        return server if isinstance(server, ContainerServer) else None

    def update_cgroup(self, **resources: int) -> None:
        """Change the live container's cgroup limits through the engine (``docker update``):
        ``PidsLimit``, ``Memory``, ``MemorySwap`` as the Engine API names them."""
        container = self._container()
        if container is None:
            raise self.error("cgroup limits need --runner=docker", hint="use --runner=docker")
        api = container.api
        url = f"{api.base_url}/v{api.api_version}/containers/{container.container_id}/update"
        response = api.post(url, json=resources, timeout=30)
        if response.status_code >= 300:
            raise self.error(
                f"the engine refused to update container {container.container_name}: "
                f"{response.text.strip()}",
                hint="this engine may not support live updates of that limit (docker update)",
            )

    # -- pause

    def pause(self) -> None:
        """Stop every task of the server: the cgroup freezer for a container (``docker
        pause``: no signal the server could see), SIGSTOP for processes."""
        container = self._container()
        if container is not None:
            self._paused = []
            container.api.pause(container.container_id)
            return
        self._paused = self.pids()
        self.signal(signal.SIGSTOP)

    def wait_paused(self, timeout_s: float) -> bool:
        """Whether every task of the server is stopped within ``timeout_s``."""
        container = self._container()
        if container is not None:
            api, cid = container.api, container.container_id
            return wait_for(lambda: bool(api.inspect_container(cid)["State"]["Paused"]), 2.0)
        pids = self._paused or []
        return wait_for(lambda: all(procfs.task_state(p) in "TtXZ" for p in pids), timeout_s)

    def resume(self) -> None:
        """Undo :meth:`pause` (nothing if it is not paused)."""
        paused, self._paused = self._paused, None
        if paused is None:
            return
        container = self._container()
        if container is not None:
            container.api.unpause(container.container_id)
            return
        for pid in paused:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)

    # -- clients

    def run_clients(
        self, fault: Fault, seed: int, deadline: float, *, through_restarts: bool = False
    ) -> FaultReport:
        """Run the client fault ``fault`` against the server (rng seeded by ``seed``)."""
        endpoint = self.endpoint(through_restarts=through_restarts)
        return fault.run(endpoint, random.Random(seed), deadline)

    def start_clients(
        self, fault: Fault | None, seed: int, deadline: float, *, through_restarts: bool = False
    ) -> Clients:
        """:meth:`run_clients` on a thread, so the fault can act on the server meanwhile
        (``fault`` None: no client; ``join()`` then returns None)."""

        def work() -> FaultReport | None:
            if fault is None:
                return None
            return self.run_clients(fault, seed, deadline, through_restarts=through_restarts)

        return Clients(work)


class Clients:
    """A client fault running on a thread; :meth:`join` returns its report."""

    def __init__(self, work: Callable[[], FaultReport | None]) -> None:
        self.result: FaultReport | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(
            target=self._work, args=(work,), name="server-fault-clients", daemon=True
        )
        self._thread.start()

    def _work(self, work: Callable[[], FaultReport | None]) -> None:
        try:
            self.result = work()
        except BaseException as exc:  # re-raised in join()
            self.error = exc

    def join(self, deadline: float) -> FaultReport | None:
        """The clients' report once they are done (they stop by ``deadline``); None if they
        ran nothing."""
        self._thread.join(max(deadline + 2.0 - time.monotonic(), 0.1))
        if self.error is not None:
            raise self.error
        return self.result


def _prlimit_as_owner(pid: int, limit: int) -> bool | None:
    """Lower ``pid``'s RLIMIT_NOFILE from a child that took on its user and group (the kernel
    lets a process's own user lower its limits); None when that is not possible.

    A fork, not a new program: the harness's interpreter may sit where that user may not
    look (a virtualenv under /root).  The child makes system calls only, then ``_exit``s."""
    if os.geteuid() != 0:
        return None
    ids = procfs.owner_ids(pid)
    if ids is None:
        return False
    uid, gid = ids
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
            code = 0
        except ProcessLookupError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    return {0: True, 2: False}.get(os.waitstatus_to_exitcode(status))
