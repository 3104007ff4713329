"""The Docker runner: the target as the main process of a container on the host's network.

The container shares the host's network namespace (``network_mode="host"``), so the target
binds the same ``{host}:{port}`` as under the process runner and the black-box oracle reads
its sockets from ``/proc/<host pid>/net/tcp``.  The workdir is bind-mounted read-write at its
host path; the container's stdout and stderr are copied into ``target.stdout`` and
``target.stderr`` there (``logs.py``).  Containers are labelled so that none outlives its
test process (``reaper.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import warnings
from pathlib import Path
from typing import Any

from afterclose.harness.errors import TargetStartError
from afterclose.harness.runners.base import LaunchPlan, Runner
from afterclose.harness.runners.docker import closure, images, privileges, reaper
from afterclose.harness.runners.docker.container import ContainerServer
from afterclose.harness.runners.docker.engine import Engine, connect, import_docker
from afterclose.harness.runners.docker.images import ImageChoice
from afterclose.harness.runners.docker.run_args import parse_run_args


def plan_host_files(plan: LaunchPlan) -> closure.HostFiles:
    """Host files a closure image needs besides command[0], the {build} artefact and the
    tracer shim: those the plan names by absolute path (argv, environment, rendered files) and
    a Python interpreter's module path."""
    program = closure.resolve_program(plan.argv[0], plan.env)
    if program is None:
        return closure.HostFiles()
    texts = [*plan.argv[1:], *(v for k, v in plan.env.items() if k != "LD_PRELOAD")]
    for name in plan.manifest.files:
        rendered = plan.workdir / name
        if rendered.is_file():
            texts.append(rendered.read_text(errors="replace"))
    skip = [plan.workdir, plan.manifest.folder]
    if plan.trace_dir is not None:
        skip.append(plan.trace_dir)
    return closure.host_files(program, texts, plan.env, skip=skip, where=plan.manifest.path)


# ------------------------------------------------------------------------------- runner


_COUNTER = itertools.count(1)
# run_args keys that privileges.py folds into the container's user and capabilities.
_PRIVILEGE_KEYS = ("user", "cap_add", "cap_drop", "security_opt")


class DockerRunner(Runner):
    """Starts each target as a fresh container of an image made without a registry."""

    name = "docker"

    def __init__(
        self, client: Any = None, *, session: str | None = None, sweep: bool = True
    ) -> None:
        self.client = client if client is not None else connect()
        self.session = session or reaper.session_id()
        env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("DOCKER_")))
        self._engine = Engine(environment=env, version=str(self.client.api.api_version))
        self.last_image: ImageChoice | None = None
        reaper.install_exit_handlers()
        if sweep:
            try:
                reaper.sweep_containers(client=self.client)
            except Exception as exc:  # leftovers are untidy, not a reason to fail a test
                warnings.warn(f"afterclose: sweeping old containers failed: {exc}", stacklevel=2)

    # -- image

    def image_for(self, plan: LaunchPlan) -> ImageChoice:
        spec = plan.manifest.docker
        if spec is None or (spec.image is None and spec.dockerfile is None):
            needs = self.host_files(plan)
            return images.closure_image(
                self.client,
                plan.manifest,
                [*self._programs(plan), *needs.programs],
                plan.env,
                [*needs.libraries, *needs.data],
            )
        if spec.image is not None:
            return images.local_image(self.client, plan.manifest)
        return images.dockerfile_image(self.client, plan.manifest)

    def _programs(self, plan: LaunchPlan) -> list[Path]:
        found: dict[str, Path] = {}
        program = closure.resolve_program(plan.argv[0], plan.env)
        if program is None:
            raise TargetStartError(
                f"cannot find the program {plan.argv[0]!r} on this host to put it in an image",
                where=plan.manifest.path,
                hint="name it by path in command[0], or add a [docker] table",
            )
        for path in (program, *plan.binaries, *closure.preload_paths(plan.env)):
            found.setdefault(str(path), path)
        return list(found.values())

    def host_files(self, plan: LaunchPlan) -> closure.HostFiles:
        return plan_host_files(plan)

    # -- container

    def _mounts(self, plan: LaunchPlan, image: ImageChoice) -> list[Any]:
        import docker.types

        mounts: dict[str, Any] = {}

        def bind(path: Path, read_only: bool) -> None:
            if str(path) not in mounts and path.exists():
                mounts[str(path)] = docker.types.Mount(
                    target=str(path), source=str(path), type="bind", read_only=read_only
                )

        bind(plan.workdir, read_only=False)
        if plan.trace_dir is not None and not plan.trace_dir.is_relative_to(plan.workdir):
            plan.trace_dir.mkdir(parents=True, exist_ok=True)
            bind(plan.trace_dir, read_only=False)
        bind(plan.manifest.folder, read_only=True)
        if image.kind == "closure":
            for folder in self.host_files(plan).mounts:
                bind(folder, read_only=True)
        else:
            # A user image lacks the host files the plan names: the {build} artefact and the
            # tracer shim.  They work in it if the image's libc is compatible (docker.libc).
            for path in (*plan.binaries, *closure.preload_paths(plan.env)):
                bind(path, read_only=True)
        # The engine mounts in path order, so a read-write workdir inside the read-only
        # manifest folder still ends up writable.
        return list(mounts.values())

    def _entrypoint(self, plan: LaunchPlan, image: ImageChoice) -> str:
        # The manifest's command replaces the image's ENTRYPOINT and CMD.  A bare program
        # name is found on the host; the closure image has it at the same path but maybe not
        # on the engine's default PATH.
        first = plan.argv[0]
        if image.kind == "closure" and "/" not in first:
            resolved = closure.resolve_program(first, plan.env)
            if resolved is not None:
                return str(resolved)
        return first

    def launch(self, plan: LaunchPlan) -> ContainerServer:
        docker = import_docker()
        manifest = plan.manifest
        extra = parse_run_args(manifest.docker.run_args if manifest.docker else (), manifest)
        image = self.image_for(plan)
        self.last_image = image
        plan.workdir.mkdir(parents=True, exist_ok=True)
        for path in (plan.stdout_path, plan.stderr_path):
            path.write_bytes(b"")
        rights = privileges.privileges(manifest, extra)
        if plan.trace_dir is not None:
            plan.trace_dir.mkdir(parents=True, exist_ok=True)
        privileges.hand_over((plan.workdir, plan.trace_dir), rights.user)
        slug = images.repo_name(manifest.name).removeprefix(images.IMAGE_REPO_PREFIX)
        name = f"afterclose-{slug}-{os.getpid()}-{next(_COUNTER)}-{reaper.process_token()[:6]}"
        labels = {
            **reaper.owner_labels(self.session),
            reaper.LABEL_TARGET: manifest.name,
            reaper.LABEL_TEST: os.environ.get("PYTEST_CURRENT_TEST", "")[:200],
        }
        # Registered before the create call: if Ctrl-C lands while the engine is creating
        # the container, the cleanup still knows its name.
        reaper.register(name, self._engine)
        target: ContainerServer | None = None
        try:
            started = time.monotonic()
            api = self.client.api
            try:
                host_config = api.create_host_config(
                    network_mode="host",
                    init=False,
                    mounts=self._mounts(plan, image),
                    # json-file keeps the output readable through the logs API whatever the
                    # engine's default log driver is.
                    log_config=docker.types.LogConfig(
                        type="json-file", config={"max-size": "100m", "max-file": "2"}
                    ),
                    **{k: v for k, v in extra.items() if k not in _PRIVILEGE_KEYS},
                    **rights.host_config(),
                )
                created = api.create_container(
                    image=image.tag,
                    entrypoint=[self._entrypoint(plan, image)],
                    command=list(plan.argv[1:]),
                    name=name,
                    labels=labels,
                    environment=dict(plan.env),
                    working_dir=str(plan.cwd),
                    user=rights.user,
                    host_config=host_config,
                    stop_signal=manifest.stop_signal,
                    detach=True,
                    stdin_open=False,
                    tty=False,
                )
            except docker.errors.ImageNotFound:
                raise TargetStartError(
                    f"image {image.tag!r} vanished before the container was created",
                    where=manifest.path,
                    hint="something removed it (docker image prune?); run again",
                ) from None
            except docker.errors.APIError as exc:
                raise TargetStartError(
                    f"the engine refused to create a container for {manifest.name!r}",
                    where=manifest.path,
                    details=str(exc.explanation or exc),
                    hint="check [docker] run_args",
                ) from None
            target = ContainerServer(plan, self, str(created["Id"]), name, image)
            target.timings["create_s"] = time.monotonic() - started
            target._begin()
        except BaseException:
            if target is not None:
                target.stop()
            else:
                with contextlib.suppress(Exception):
                    reaper.remove_quietly(self.client, name)
                    reaper.unregister(name)
            raise
        return target
