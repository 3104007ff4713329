"""Reaching the Docker engine: a client for DOCKER_HOST, and the recipe to make another."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from afterclose.harness.errors import TargetStartError

ENGINE_TIMEOUT_S = 60
ENGINE_HINT = (
    "start dockerd (as root: `dockerd &`, or `systemctl start docker`) and check "
    "`docker info`, or use --runner=process"
)


@dataclass(frozen=True)
class Engine:
    """How to reach the engine again from an exit or signal handler, with a fresh client
    whose connection pool is not in the middle of a request of the interrupted code."""

    environment: tuple[tuple[str, str], ...]  # the DOCKER_* variables (hashable)
    version: str

    def client(self, timeout: int = 30) -> Any:
        import docker

        return docker.DockerClient.from_env(
            environment=dict(self.environment), version=self.version, timeout=timeout
        )


def import_docker() -> Any:
    try:
        import docker
    except ImportError:
        raise TargetStartError(
            "the Docker runner needs the Python package 'docker', which is not installed",
            hint="pip install 'docker>=7' (or the afterclose[docker] extra), or use "
            "--runner=process",
        ) from None
    return docker


def connect(timeout: int = ENGINE_TIMEOUT_S) -> Any:
    """A docker client for the engine named by DOCKER_HOST (default: the local socket)."""
    docker = import_docker()
    import requests

    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        message = str(exc)
        hint = ENGINE_HINT
        if "Permission denied" in message:
            hint = "run as root or add your user to the docker group; or use --runner=process"
        raise TargetStartError(
            f"the Docker engine at {where} is not reachable",
            details=message,
            hint=hint,
        ) from None
    return client


# ----------------------------------------------------------------- cleanup of leftovers
