"""SIGKILL of pytest in the middle of a storm: nothing the run started remains."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from paths import TESTS_DIR
from procs import alive

from afterclose.harness import procfs

ECHO = TESTS_DIR / "programs" / "http_echo.py"


def _ours(tmp_path: Path) -> list[int]:
    """Live processes running the test program from our folder."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(ECHO).encode() in cmdline and cwd == str(tmp_path) and alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def _port_sockets(port: int) -> list[procfs.TcpSocket]:
    return [s for s in procfs.tcp_sockets(os.getpid()) if s.local_port == port]


def _tool_output(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return done.stdout


@pytest.mark.slow
def test_sigkill_mid_storm_leaves_nothing(tmp_path: Path) -> None:
    manifest = tmp_path / "target.toml"
    # The shell forks the server and waits; the server double-forks a daemon in a session of
    # its own, which PDEATHSIG of the harness's child never reaches.
    manifest.write_text(
        textwrap.dedent(
            f"""\
            name = "double-fork"
            command = ["sh", "-c", "{sys.executable} {ECHO} {{host}} {{port}} daemon & wait"]
            [ready]
            port = true
            timeout_s = 20
            """
        )
    )
    session = f"sigkill-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            f"--target={manifest}",
            "--tracer=off",
            "-k",
            "connection_storm",
        ],
        cwd=tmp_path,
        env={**os.environ, "AFTERCLOSE_SESSION": session},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port = 0
    try:
        deadline = time.monotonic() + 120
        # Mid-storm: the daemon serves and the storm's connections show on its port.
        while time.monotonic() < deadline and proc.poll() is None:
            daemons = [p for p in _ours(tmp_path) if procfs.parent_pid(p) != proc.pid]
            cmd = [
                (Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0"), p)
                for p in daemons
                if procfs.exists(p)
            ]
            ports = {int(c[3]) for c, _ in cmd if len(c) > 4 and c[4] == b"daemon"}
            if ports:
                port = ports.pop()
                if len([s for s in _port_sockets(port) if s.state != "LISTEN"]) > 10:
                    break
            time.sleep(0.05)
        assert port and proc.poll() is None, "the storm never started"
        assert len(_ours(tmp_path)) >= 2  # the shell's child and its daemon
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (_ours(tmp_path) or _listening(port)):
        time.sleep(0.05)
    survivors = _ours(tmp_path)
    for pid in survivors:  # leave nothing behind, even when the check fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "a process of the killed run survived"
    assert not _listening(port), f"something still listens on port {port}"
    assert str(port) not in _tool_output("tc", "filter", "show", "dev", "lo")
    assert f"--dport {port}" not in _tool_output("iptables-save")
    if shutil.which("docker"):
        containers = _tool_output(
            "docker", "ps", "-aq", "--filter", f"label=afterclose.session={session}"
        )
        assert containers.strip() == ""


def _listening(port: int) -> bool:
    return any(s.state == "LISTEN" for s in _port_sockets(port))
