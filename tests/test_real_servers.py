"""The built-in real-server targets: nginx, lighttpd, h2o (Debian packages) and the Python
servers on asyncio and uvloop.  None of them may be reported for anything: a violation here is
a false positive of the harness (or a real bug in that server, to be written up).

Each target is skipped with the reason when its binary (or uvloop) is missing.  The fast tests
start each target through ``Harness`` and check its answers, logs and process model; the slow
ones run the whole built-in suite against it in an inner pytest.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from afterclose.harness import httpclient, procfs
from afterclose.harness.errors import TargetStartError
from afterclose.harness.session import Harness, Settings, TargetRun


@dataclass(frozen=True)
class Server:
    name: str
    binary: str | None = None  # a program that must exist
    module: str | None = None  # a Python module that must be importable
    processes: int = 1  # processes once ready (the main one included)
    threads: int = 1  # least threads of the main process that serve


SERVERS = {
    s.name: s
    for s in (
        # master + worker_processes 2
        Server("nginx", binary="/usr/sbin/nginx", processes=3),
        Server("lighttpd", binary="/usr/sbin/lighttpd"),
        # num-threads 2 in one process, plus the crash-report helper h2o forks at start-up
        Server("h2o", binary="/usr/bin/h2o", processes=2, threads=2),
        Server("asyncio"),
        Server("uvloop", module="uvloop"),
    )
}
NAMES = list(SERVERS)


def missing(name: str) -> str | None:
    server = SERVERS[name]
    if server.binary is not None and not os.access(server.binary, os.X_OK):
        return f"{server.binary} is not installed (Debian package {name}; see scripts/setup-system)"
    if server.module is not None and importlib.util.find_spec(server.module) is None:
        return f"the Python package {server.module} is not installed: pip install {server.module}"
    return None


def require(name: str) -> None:
    reason = missing(name)
    if reason is not None:
        pytest.skip(f"target {name}: {reason}")


@pytest.fixture(autouse=True)
def python_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python targets run ``python3`` from PATH: make it this interpreter (the venv's),
    which is the one that has uvloop, also when the venv was not activated (as in CI)."""
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join([bindir, os.environ.get("PATH", "")]))


@pytest.fixture
def started(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TargetRun]:
    name: str = request.param
    require(name)
    harness = Harness(
        Settings(target=name, rootdir=Path.cwd(), run_id=uuid.uuid4().hex, tracer="off")
    )
    with harness.start(tmp_path / "work", name) as run:
        yield run


def test_every_target_is_known() -> None:
    from afterclose.harness.manifest import available_targets

    assert set(NAMES) <= set(available_targets(None))


@pytest.mark.parametrize("started", NAMES, indirect=True)
def test_get_answers_with_the_path(started: TargetRun) -> None:
    run = started
    first = httpclient.request_path("realsrv", 1, 0)
    second = httpclient.request_path("realsrv", 1, 1)
    # Two requests on one keep-alive connection, then one that closes it.
    with socket.create_connection((run.host, run.port), timeout=5) as sock:
        reader = httpclient.ResponseReader(sock)
        for path in (first, second):
            sock.sendall(httpclient.build_get(path, run.host, run.port))
            response = reader.read_response(time.monotonic() + 5)
            assert response.status == 200, response
            assert httpclient.echoes(response.body, path), response.body
            assert response.keep_alive, f"{run.manifest.name} closed a keep-alive connection"
    answer = httpclient.get(run.host, run.port, "/any/other/path?x=1")
    assert answer.status == 200
    assert b"/any/other/path" in answer.body
    outcome = run.finish()
    assert outcome.ok, run.failure_message(outcome)
    assert run.target.exit_status() is not None, "stopped by the harness"


@pytest.mark.parametrize("started", NAMES, indirect=True)
def test_logs_and_state_stay_in_the_workdir(started: TargetRun) -> None:
    run = started
    path = httpclient.request_path("logs", 7, 0)
    assert httpclient.get(run.host, run.port, path).status == 200
    run.finish()  # stops the server: its logs are complete
    access = run.workdir / "access.log"
    assert access.is_file(), sorted(p.name for p in run.workdir.iterdir())
    assert path in access.read_text(errors="replace")
    assert (run.workdir / "error.log").is_file()


@pytest.mark.parametrize("started", NAMES, indirect=True)
def test_process_model(started: TargetRun) -> None:
    run = started
    server = SERVERS[run.manifest.name]
    pids = run.target.host_pids()
    assert len(pids) == server.processes, pids
    threads = len(os.listdir(f"/proc/{pids[0]}/task"))
    assert threads >= server.threads, f"{threads} threads in {pids[0]}"


@pytest.mark.parametrize("name", NAMES)
def test_listens_on_loopback_only(name: str, tmp_path: Path) -> None:
    require(name)
    harness = Harness(
        Settings(target=name, rootdir=Path.cwd(), run_id=uuid.uuid4().hex, tracer="off")
    )
    with harness.start(tmp_path / "work", name) as run:
        inodes: set[int] = set()
        for pid in run.target.host_pids():
            inodes.update(procfs.socket_inodes(pid).values())
        listening = [
            s
            for s in procfs.tcp_sockets(run.target.host_pids()[0])
            if s.inode in inodes and s.state == "LISTEN"
        ]
        assert [s.local_port for s in listening] == [run.port]
        run.finish()


def test_uvloop_missing_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An importable "uvloop" that fails the way a missing one does, first on the path.
    fake = tmp_path / "fake" / "uvloop"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named uvloop')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    harness = Harness(
        Settings(target="uvloop", rootdir=Path.cwd(), run_id=uuid.uuid4().hex, tracer="off")
    )
    with pytest.raises(TargetStartError) as info:
        harness.start(tmp_path / "work", "uvloop")
    text = info.value.render()
    assert "the uvloop package is not installed" in text
    assert "pip install uvloop" in text


def run_suite(pytester: pytest.Pytester, name: str, tracer: str) -> None:
    require(name)
    result = pytester.runpytest_subprocess(
        f"--target={name}", f"--tracer={tracer}", "-p", "no:cacheprovider", "-q", timeout=600
    )
    outcomes = result.parseoutcomes()
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output[-6000:]
    assert outcomes.get("passed", 0) >= 8, outcomes
    assert set(outcomes) <= {"passed"}, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_builtin_suite_passes(name: str, pytester: pytest.Pytester) -> None:
    run_suite(pytester, name, "off")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_builtin_suite_passes_traced(name: str, pytester: pytest.Pytester) -> None:
    # Every report the trace rules made on these servers was a false positive of the rules
    # (docs/real-servers.md lists them and why); none may come back.
    run_suite(pytester, name, "preload")


def test_skip_reasons_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    reason = missing("nginx")
    assert reason is not None and "/usr/sbin/nginx is not installed" in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reason = missing("uvloop")
    assert reason is not None and "pip install uvloop" in reason
