"""What the tests need from the machine, checked in one place, and what happens when it lacks it.

A test that needs a capability says so with ``@pytest.mark.requires("docker", ...)`` (or calls
:func:`need` from a fixture, or :func:`lacking` when only running the thing tells).  Without
the capability the test is skipped, with the reason; with the capability named in
``AFTERCLOSE_REQUIRE`` (a comma-separated list, ``.ci/run`` names them all) it fails instead,
with the reason and the command that provides it: a broken eBPF tracer or a missing scapy cannot
leave CI green.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

REQUIRE_ENV = "AFTERCLOSE_REQUIRE"


@dataclass(frozen=True)
class Capability:
    name: str
    means: str
    enable: str  # the command (or step) that gives the machine this capability
    # Why it is missing here, or None; None for what only trying tells (the test calls lacking).
    check: Callable[[], str | None] | None = None


def _docker() -> str | None:
    try:
        import docker

        client = docker.from_env(timeout=30)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # the docker library raises several unrelated types
        return f"the Docker engine does not answer (`docker info` fails): {exc}"
    return None


def _root() -> str | None:
    return None if os.geteuid() == 0 else f"runs as uid {os.geteuid()}, not root"


def _ebpf() -> str | None:
    from afterclose.harness.trace import ebpf

    missing = ebpf.unavailable()
    if missing is not None:
        return missing[0]
    # Installed is not usable: a libbpf or clang too old for the program, or a kernel that
    # refuses it, fails only when it builds, loads and attaches.  Traced: this process.
    from afterclose.harness.errors import AftercloseError

    try:
        with tempfile.TemporaryDirectory(prefix="afterclose-ebpf-check-") as tmp:
            run = ebpf.EbpfRun(Path(tmp), [os.getpid()])
            status = run.stop()
            if status != 0:
                return f"the eBPF loader exited with status {status}: {run.log_text()[-300:]}"
    except AftercloseError as exc:
        return f"the eBPF tracer cannot attach here: {exc}"
    return None


def _packets() -> str | None:
    if importlib.util.find_spec("scapy") is None:
        return "scapy is not importable"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError as exc:
        return f"no raw socket (CAP_NET_RAW): {exc}"
    return None


def _kernel() -> str | None:
    if platform.machine() != "x86_64":
        return f"guests boot on x86_64 only (this machine is {platform.machine()})"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    from afterclose.harness.kernel import fetch

    # A kernel boots from a Debian package (fetched with apt) or from the cache of earlier ones.
    if shutil.which("apt-cache") is None and not fetch.cached_kernels():
        return "no kernel to boot: neither apt (Debian kernel packages) nor a cached kernel"
    return None


def _tool(name: str, package: str) -> Capability:
    def check() -> str | None:
        return None if shutil.which(name) else f"{name} is not on PATH"

    return Capability(name, f"the {name} tool", f"apt-get install -y {package}", check)


CAPABILITIES = {
    c.name: c
    for c in (
        Capability("docker", "a Docker engine that answers", "bash scripts/start-dockerd", _docker),
        Capability("root", "root (raw sockets, TCP_REPAIR, netem, eBPF)", "run as root", _root),
        Capability(
            "ebpf",
            "a usable eBPF tracer (root, x86_64, clang, libbpf, kernel BTF)",
            "apt-get install -y clang libbpf-dev (bash scripts/setup-system), as root",
            _ebpf,
        ),
        Capability(
            "packets",
            "scapy and raw sockets (packet faults)",
            ".venv/bin/pip install scapy, as root",
            _packets,
        ),
        Capability(
            "kernel",
            "qemu and a bootable kernel (--kernel)",
            "apt-get install -y qemu-system-x86 (kernels come from Debian packages)",
            _kernel,
        ),
        Capability(
            "asan",
            "an AddressSanitizer toolchain and runtime",
            "apt-get install -y gcc libasan8",
        ),
        Capability(
            "servers",
            "the real servers the suite is checked on",
            "bash scripts/setup-system (Debian packages), .venv/bin/pip install the Python ones",
        ),
        _tool("go", "golang-go"),
        _tool("cpio", "cpio"),
        _tool("apt-cache", "apt"),
        _tool("redis-server", "redis-server"),
        _tool("ip", "iproute2"),
        _tool("sshd", "openssh-server"),
        _tool("gpg", "gnupg"),
        _tool("dpkg-scanpackages", "dpkg-dev"),
    )
}


def required() -> set[str]:
    """The capabilities ``AFTERCLOSE_REQUIRE`` names; an unknown name is a usage error."""
    names = {n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()}
    unknown = names - set(CAPABILITIES)
    if unknown:
        raise pytest.UsageError(
            f"{REQUIRE_ENV}: unknown capability {', '.join(sorted(unknown))} "
            f"(known: {', '.join(CAPABILITIES)})"
        )
    return names


@functools.cache
def missing(name: str) -> str | None:
    """Why this machine lacks capability ``name`` (checked once per process), or None."""
    check = CAPABILITIES[name].check
    if check is None:
        raise ValueError(f"{name}: only a test that tries it can tell; it calls lacking()")
    return check()


def lacking(name: str, why: str) -> NoReturn:
    """Skip the running test for lack of ``name``, or fail it if ``AFTERCLOSE_REQUIRE`` names it."""
    cap = CAPABILITIES[name]
    text = f"needs {cap.name} ({cap.means}): {why}"
    if name in required():
        pytest.fail(f"{text}. {REQUIRE_ENV} names {name}; to provide it: {cap.enable}")
    pytest.skip(f"{text} (to provide it: {cap.enable})")


def need(*names: str) -> None:
    for name in names:
        why = missing(name)
        if why is not None:
            lacking(name, why)


def requires(*names: str) -> pytest.MarkDecorator:
    """The marker: the test runs only where every capability named is there."""
    for name in names:
        if name not in CAPABILITIES:
            raise ValueError(f"unknown capability {name!r}")
    return pytest.mark.requires(*names)


# The plugin hooks (tests/conftest.py loads this module as a plugin).


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(*capabilities): skipped without them, failed if AFTERCLOSE_REQUIRE names them "
        f"({', '.join(CAPABILITIES)}; tests/capabilities.py)",
    )
    required()  # an unknown name stops the run before any test


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        need(*mark.args)


_SKIP_REASON = re.compile(r"(?:Skipped: )?needs ([\w-]+) \(.*?\): (.*) \(to provide it: ")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Which parts of the run were skipped for a missing capability, and the command that
    enables each (the terminal reporter holds every skip, the xdist workers' too)."""
    skipped: dict[str, tuple[str, int]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if not isinstance(report.longrepr, tuple):
            continue
        match = _SKIP_REASON.match(str(report.longrepr[2]))
        if match is None or match[1] not in CAPABILITIES:
            continue
        why, count = skipped.get(match[1], (match[2], 0))
        skipped[match[1]] = (why, count + 1)
    if not skipped:
        return
    terminalreporter.section("skipped for a missing capability", sep="=", yellow=True)
    for name, (why, count) in sorted(skipped.items()):
        cap = CAPABILITIES[name]
        terminalreporter.line(f"{name}: {count} test(s) skipped ({cap.means}): {why}")
        terminalreporter.line(f"    to enable them: {cap.enable}")
