"""The Docker runner, in parts: ``runner`` (DockerRunner: plan -> container), ``container``
(a started container as a running target), ``images`` and ``closure`` (images made without a
registry, from the host's files), ``run_args`` (the manifest's ``docker run`` flags), ``logs``
(the container's output into two files), ``engine`` (reaching dockerd) and ``reaper``
(labels, and removing containers whose test process is gone)."""

from afterclose.harness.runners.docker.container import ContainerServer
from afterclose.harness.runners.docker.runner import DockerRunner

__all__ = ["ContainerServer", "DockerRunner"]
