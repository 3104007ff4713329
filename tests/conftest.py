from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

# capabilities: the `requires` marker and AFTERCLOSE_REQUIRE.
pytest_plugins = ["pytester", "capabilities"]


@pytest.fixture(scope="module")
def docker_client() -> Iterator[Any]:
    import capabilities  # after pytest_plugins loaded it, so its asserts are rewritten

    import docker

    capabilities.need("docker")

    client = docker.from_env(timeout=60)
    yield client
    client.close()
