"""The target's TCP sockets by sock_diag, and the settle before the baseline census."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from afterclose.harness import procfs, sockdiag


def table_for(port: int) -> set[procfs.TcpSocket]:
    """The /proc table's sockets with ``port`` at either end (no port: the text table)."""
    return {s for s in procfs.tcp_sockets(os.getpid()) if port in (s.local_port, s.remote_port)}


@contextlib.contextmanager
def connections(family: socket.AddressFamily, host: str) -> Iterator[int]:
    """A listener with one open connection, one the client half-closed (the server's end in
    CLOSE_WAIT) and one waiting in the accept queue; yields the port."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(family))
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        for n in range(3):
            client = stack.enter_context(socket.create_connection((host, port)))
            if n == 2:
                break  # left in the accept queue
            server, _ = listener.accept()
            stack.enter_context(server)
            if n == 1:
                client.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while not any(s.state == "CLOSE_WAIT" for s in table_for(port)):
            assert time.monotonic() < deadline, "the FIN never arrived"
            time.sleep(0.01)
        yield port


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("family", "host"),
    [
        (socket.AF_INET, "127.0.0.1"),
        pytest.param(
            socket.AF_INET6,
            "::1",
            marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback"),
        ),
    ],
)
def test_sock_diag_finds_what_the_proc_table_lists(family: socket.AddressFamily, host: str) -> None:
    with connections(family, host) as port, connections(family, host) as other:
        found = set(procfs.tcp_sockets(os.getpid(), port))
        assert found == table_for(port)
        states = sorted(s.state for s in found)
        # Each connection twice (both ends are ours), the listener once.
        assert states.count("LISTEN") == 1
        assert states.count("CLOSE_WAIT") == states.count("FIN_WAIT2") == 1
        assert states.count("ESTABLISHED") == 4
        assert all(other not in (s.local_port, s.remote_port) for s in found)
        # The census reads the same sockets: the server's end, not the client's.
        census = procfs.census([os.getpid()], port)
        assert census.close_wait == 1
        assert census.stranded == 0


def test_sock_diag_answers_for_its_own_network_namespace_only() -> None:
    assert procfs.same_netns(os.getpid())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not procfs.same_netns(gone.pid)
    # A port nobody uses: an empty answer, not an error.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert sockdiag.port_sockets(free) == []


def test_a_spinning_thread_is_never_asleep_and_a_sleeping_one_adds_no_run_time() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = procfs.thread_activity([sleeper.pid])
        if first is None:
            pytest.skip("this kernel keeps no schedstats")
        deadline = time.monotonic() + 30
        while first is None or not procfs.asleep(first):  # the interpreter starting up
            assert time.monotonic() < deadline
            time.sleep(0.05)
            first = procfs.thread_activity([sleeper.pid])
        time.sleep(0.05)
        assert procfs.thread_activity([sleeper.pid]) == first
        assert procfs.asleep(first)
        looks = [procfs.thread_activity([spinner.pid]) for _ in range(2)]
        assert looks[0] is not None and looks[1] is not None
        ran = looks[0] != looks[1]
        assert ran or not procfs.asleep(looks[1])
    finally:
        for proc in (sleeper, spinner):
            proc.kill()
            proc.wait()


def test_the_baseline_of_a_quiet_server_is_its_census() -> None:
    with connections(socket.AF_INET, "127.0.0.1") as port:
        settled = procfs.settled_census(lambda: [os.getpid()], port)
        assert settled == procfs.census([os.getpid()], port)
