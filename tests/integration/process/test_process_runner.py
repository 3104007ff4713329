"""The process runner: readiness strategies, start-up errors and cleanup of every process."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from paths import TESTS_DIR
from procs import alive

from afterclose.harness import launch, ports, procfs
from afterclose.harness.errors import TargetStartError
from afterclose.harness.manifest import load_manifest
from afterclose.harness.procfs import process_tree
from afterclose.harness.runners.process import ProcessRunner, ProcessServer

ECHO = TESTS_DIR / "programs" / "http_echo.py"


def manifest_file(
    tmp_path: Path, mode: str = "ok", ready: str = 'log = "READY"', extra: str = ""
) -> Path:
    path = tmp_path / "target.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "echo-{mode}"
            command = ["{sys.executable}", "{ECHO}", "{{host}}", "{{port}}", "{mode}"]
            {extra}
            [ready]
            {ready}
            timeout_s = 5
            """
        )
    )
    return path


def start(tmp_path: Path, **kwargs: str) -> ProcessServer:
    manifest = load_manifest(manifest_file(tmp_path, **kwargs))
    lease = ports.lease_port()
    plan = launch.make_plan(
        manifest, host="127.0.0.1", port=lease.port, workdir=tmp_path / "run", artefact=None
    )
    target = ProcessRunner().start(plan)
    assert isinstance(target, ProcessServer)
    return target


@pytest.mark.parametrize("ready", ['log = "READY"', "port = true", 'http = "/"'])
def test_readiness_strategies(tmp_path: Path, ready: str) -> None:
    from afterclose.harness.protocols import http

    with start(tmp_path, ready=ready) as target:
        response = http.get(target.host, target.port, "/hello", timeout_s=2)
        assert response.status == 200 and b"/hello" in response.body
        assert target.exit_status() is None
    status = target.exit_status()
    assert status is not None and status.stopped_by_harness


def test_target_that_dies_reports_log_tail_and_hint(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TargetStartError) as info:
        start(tmp_path, mode="die")
    message = str(info.value)
    # At once, not after the [ready] timeout_s of 5 s.
    assert time.monotonic() - started < 5, "a dead target must be reported at once"
    assert "did not become ready" in message and "exited with status 3" in message
    assert "cannot open config /etc/nowhere.conf" in message  # the log tail
    assert "Hint:" in message and str(tmp_path / "target.toml") in message


def test_target_never_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(
        TargetStartError, match=r"the line 'READY' did not appear in the target's output within 5 s"
    ) as info:
        start(tmp_path, mode="silent")
    assert "must print 'READY'" in str(info.value)
    leftovers = [
        p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, tmp_path)
    ]
    assert leftovers == []


def _cmdline_has(proc: Path, tmp_path: Path) -> bool:
    try:
        return str(ECHO).encode() in (proc / "cmdline").read_bytes() and _cwd_is_ours(
            proc, tmp_path
        )
    except OSError:
        return False


def _cwd_is_ours(proc: Path, tmp_path: Path) -> bool:
    try:
        return Path(os.readlink(proc / "cwd")) == tmp_path
    except OSError:
        return False


def test_a_server_that_ignores_its_port_is_told_where_it_listens(tmp_path: Path) -> None:
    with pytest.raises(TargetStartError) as info:
        start(tmp_path, mode="elsewhere", ready="port = true")
    message = str(info.value)
    assert re.search(r"nothing listened on 127\.0\.0\.1:\d+ within 5 s", message), message
    assert re.search(r"it listens on 127\.0\.0\.1:\d+", message), message
    assert "put {port}" in message


def test_an_http_probe_that_gets_500_says_so(tmp_path: Path) -> None:
    with pytest.raises(TargetStartError) as info:
        start(tmp_path, mode="error500", ready='http = "/"')
    message = str(info.value)
    assert "GET / on 127.0.0.1:" in message and "the last answer was HTTP 500" in message
    assert "no an HTTP" not in message


def test_missing_program(tmp_path: Path) -> None:
    path = tmp_path / "target.toml"
    path.write_text('name = "nope"\ncommand = ["./bin/no-such-server", "{port}"]\n')
    manifest = load_manifest(path)
    plan = launch.make_plan(manifest, host="127.0.0.1", port=1, workdir=tmp_path, artefact=None)
    with pytest.raises(TargetStartError) as info:
        ProcessRunner().start(plan)
    message = str(info.value)
    assert "cannot start target 'nope'" in message and "no-such-server" in message
    assert "Hint:" in message


def test_stop_ends_children_and_grandchildren(tmp_path: Path) -> None:
    target = start(tmp_path, mode="forker")
    deadline = time.monotonic() + 5
    while len(target.host_pids()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = target.host_pids()
    assert len(pids) >= 3, pids
    target.stop()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p for p in pids if alive(p)] == []


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    target = start(tmp_path, mode="ignore-term", extra="stop_timeout_s = 0.5")
    status = target.stop()
    assert status is not None and status.signal == signal.SIGKILL


def test_crash_is_not_marked_as_stopped_by_harness(tmp_path: Path) -> None:
    target = start(tmp_path)
    os.kill(target.pid, signal.SIGSEGV)
    deadline = time.monotonic() + 5
    while target.exit_status() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    status = target.exit_status()
    assert status is not None and status.signal == signal.SIGSEGV
    assert not status.stopped_by_harness
    target.stop()


def test_process_tree_of_missing_pid_is_empty() -> None:
    assert process_tree(2**22 + 12345) == []


def test_procfs_tells_a_process_from_a_later_one_with_its_number() -> None:
    me = os.getpid()
    started = procfs.start_time(me)
    assert started is not None and procfs.alive(me, started)
    assert not procfs.alive(me, str(int(started) + 1))  # another process, same number
    assert procfs.parent_pid(me) == os.getppid()
    assert procfs.exe(me) == os.path.realpath(sys.executable)
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert procfs.alive(child.pid) and child.pid in process_tree(me)
    finally:
        child.kill()
        child.wait()
    assert not procfs.alive(child.pid) and procfs.stat_fields(child.pid) is None


def test_procfs_reads_fds_and_epoll_registrations() -> None:
    with socket.socket() as sock, select.epoll() as ep:
        ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        links = procfs.fd_links(os.getpid())
        assert links is not None
        link, inode = links[sock.fileno()]
        assert link == f"socket:[{inode}]"
        assert links[ep.fileno()][0] == "anon_inode:[eventpoll]"
        items = procfs.epoll_items(os.getpid(), ep.fileno())
        assert items is not None
        assert [(fd, ino) for fd, _, _, ino in items] == [(sock.fileno(), inode)]
        assert items[0][1] & select.EPOLLIN and items[0][1] & select.EPOLLOUT
    assert procfs.epoll_items(2**22 + 12345, 3) is None


@pytest.mark.slow
def test_interrupted_pytest_leaves_no_target(tmp_path: Path) -> None:
    """SIGINT to pytest in the middle of a test: the fixture's teardown stops the target."""
    manifest = manifest_file(tmp_path, mode="forker")
    (tmp_path / "test_sleep.py").write_text(
        "import time\n\n"
        "def test_sleep(target):\n"
        "    print('PIDS', target.server.host_pids(), flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-s",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--target={manifest}",
            "--no-builtin-suite",
            "--tracer=off",
            str(tmp_path / "test_sleep.py"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        pids: list[int] = []
        deadline = time.monotonic() + 30
        for line in proc.stdout:
            if line.startswith("PIDS"):
                pids = [int(p) for p in line[5:].strip(" []\n").split(",")]
                break
            assert time.monotonic() < deadline
        assert len(pids) >= 3
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if alive(p)] == []
