from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# A shell starts a background command (`cmd &` in a script, nohup) with SIGINT ignored, and
# every child inherits that: the tests that press Ctrl-C on a pytest, a storm or a target
# would wait for a signal nobody acts on.  Python installs its KeyboardInterrupt handler only
# when SIGINT is not ignored at start; with this one set, children begin with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# capabilities: the `requires` marker and AFTERCLOSE_REQUIRE.
pytest_plugins = ["pytester", "capabilities"]

# tests/unit: fast, no server.  tests/integration/<part>: what each part needs from the machine
# (a test may ask for more with its own `requires` marker).
_INTEGRATION = Path(__file__).resolve().parent / "integration"
PART_NEEDS = {
    "process": (),
    "docker": ("docker",),
    "packets": ("root", "packets"),
    "ebpf": ("root", "ebpf"),
    "kernel": ("apt-cache",),
    "hosts": ("root",),  # network namespaces, an SSH server on loopback
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        try:
            part = item.path.resolve().relative_to(_INTEGRATION).parts[0]
        except ValueError:
            continue
        if PART_NEEDS[part]:
            item.add_marker(pytest.mark.requires(*PART_NEEDS[part]))


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    import capabilities  # after pytest_plugins loaded it, so its asserts are rewritten

    import docker

    capabilities.need("docker")

    client = docker.from_env(timeout=60)
    yield client
    client.close()
