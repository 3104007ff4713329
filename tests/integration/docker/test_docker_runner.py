"""The Docker runner against a real engine: images without a registry, host PIDs, exit
statuses, run_args, and no container left behind (stop, crash, atexit, SIGINT, SIGTERM)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import capabilities
import pytest
from paths import ROOT_DIR, TESTS_DIR
from procs import alive

from afterclose.harness.errors import BuildError, ManifestError, TargetStartError
from afterclose.harness.launch import build_target, make_plan
from afterclose.harness.manifest import DockerSpec, Manifest, load_manifest
from afterclose.harness.ports import PortLease, lease_port
from afterclose.harness.runners.base import LaunchPlan, Server

pytestmark = pytest.mark.docker

PROGRAMS = TESTS_DIR / "docker_programs"
ECHO_MANIFEST = PROGRAMS / "target.toml"
ECHO_SOURCE = PROGRAMS / "echo_server.c"
SEED_FIXED = ROOT_DIR / "targets" / "seed-fixed" / "target.toml"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runner(docker_client: Any) -> Any:
    from afterclose.harness.runners.docker import DockerRunner

    return DockerRunner()


@pytest.fixture(scope="module")
def echo_manifest() -> Manifest:
    return load_manifest(ECHO_MANIFEST)


@pytest.fixture(scope="module")
def echo_binary(echo_manifest: Manifest) -> Path:
    artefact = build_target(echo_manifest, "none", "test-docker-runner")
    assert artefact is not None
    return artefact


@pytest.fixture
def port() -> Iterator[int]:
    with lease_port("127.0.0.1") as lease:
        yield lease.port


PlanFactory = Callable[..., LaunchPlan]


@pytest.fixture
def make(tmp_path: Path, port: int, echo_manifest: Manifest, echo_binary: Path) -> PlanFactory:
    def factory(
        manifest: Manifest | None = None,
        artefact: Path | None = echo_binary,
        extra_env: dict[str, str] | None = None,
        workdir: str = "work",
    ) -> LaunchPlan:
        return make_plan(
            manifest or echo_manifest,
            host="127.0.0.1",
            port=port,
            workdir=tmp_path / workdir,
            artefact=artefact,
            extra_env=extra_env,
        )

    return factory


def with_command(manifest: Manifest, *command: str, **changes: Any) -> Manifest:
    return dataclasses.replace(manifest, command=tuple(command), **changes)


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    """A raw-socket HTTP/1.0 GET; returns everything the server sent before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def containers_labelled(client: Any, label: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": label}, ignore_removed=True))


def own_label() -> str:
    from afterclose.harness.runners.docker.reaper import process_label

    return process_label()


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ------------------------------------------------------------------------ basic life


def test_start_answer_pids_stop(docker_client: Any, runner: Any, make: PlanFactory) -> None:
    plan = make()
    target = runner.start(plan)
    try:
        assert http_get(plan.port, "/hello").endswith(b"\r\n\r\n/hello")
        pids = target.host_pids()
        assert pids and pids[0] == target.main_pid
        main = pids[0]
        assert main != 1, "a container-namespace PID instead of the host's"
        # Host PIDs: /proc/<pid> is the container's process, its fds and TCP table readable.
        assert target.container_id in Path(f"/proc/{main}/cgroup").read_text()
        assert os.listdir(f"/proc/{main}/fd")
        assert Path(f"/proc/{main}/exe").resolve() == plan.binaries[0].resolve()
        listen = f":{plan.port:04X} 00000000:0000 0A"
        assert listen in Path(f"/proc/{main}/net/tcp").read_text()
        from afterclose.harness import procfs

        census = procfs.census(pids, plan.port)
        assert census is not None
        container = docker_client.containers.get(target.container_id)
        labels = container.labels
        assert labels["afterclose"] == "1"
        assert labels["afterclose.pid"] == str(os.getpid())
        assert labels["afterclose.session"] == runner.session
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert container.attrs["HostConfig"]["Init"] is False
        assert target.exit_status() is None
    finally:
        status = target.stop()
    assert status is not None and status.stopped_by_harness
    assert status.code == 0 and status.signal is None  # the server exits 0 on SIGTERM
    assert target.stop() == status  # idempotent
    assert target.exit_status() == status
    assert target.host_pids() == []
    assert containers_labelled(docker_client, f"afterclose.proc={labels['afterclose.proc']}") == []
    assert "READY on 127.0.0.1" in plan.stdout_path.read_text()
    assert "stderr works" in plan.stderr_path.read_text()
    assert "stderr works" not in plan.stdout_path.read_text()


def test_make_runner_gives_docker_runner(docker_client: Any) -> None:
    from afterclose.harness.runners.docker import DockerRunner
    from afterclose.harness.session import make_runner

    assert isinstance(make_runner("docker"), DockerRunner)


def test_children_are_host_pids_and_die_with_it(runner: Any, make: PlanFactory) -> None:
    plan = make()
    with runner.start(plan) as target:
        assert http_get(plan.port, "/fork").endswith(b"/fork")
        pids = wait_for(lambda: len(target.host_pids()) == 2 and target.host_pids(), 5, "child")
        child = pids[1]
        assert os.listdir(f"/proc/{child}/fd") is not None
    assert not alive(child)


def test_exec_ed_process_is_in_host_pids(
    docker_client: Any, runner: Any, make: PlanFactory, echo_binary: Path
) -> None:
    # A `docker exec`-ed process is no descendant of the target: only the container's cgroup
    # lists it.
    plan = make()
    with runner.start(plan) as target, lease_port() as other:
        if target._procs_file is None:
            capabilities.lacking("docker", "the container's cgroup.procs is not readable here")
        exec_id = docker_client.api.exec_create(
            target.container_id, [str(echo_binary), "127.0.0.1", str(other.port)]
        )["Id"]
        docker_client.api.exec_start(exec_id, detach=True)

        def exec_ed() -> list[int]:
            # runc's helper joins the cgroup before it execs the program: wait for the exec.
            return [p for p in target.host_pids()[1:] if _exe(p) == echo_binary.resolve()]

        wait_for(exec_ed, 10, "the exec-ed process")
        assert target.host_pids()[0] == target.main_pid


def _exe(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).resolve()
    except OSError:
        return None


def test_crash_is_a_signal_not_stopped_by_harness(
    docker_client: Any, runner: Any, make: PlanFactory
) -> None:
    plan = make()
    target: Server = runner.start(plan)
    try:
        with contextlib.suppress(OSError):  # EOF or a reset, never an answer
            assert b"HTTP" not in http_get(plan.port, "/crash")
        status = wait_for(target.exit_status, 10, "the crash to be noticed")
        assert status.signal == signal.SIGSEGV and status.code is None
        assert not status.stopped_by_harness
        assert status.describe() == "killed by SIGSEGV"
        assert "crashing on purpose" in target.stderr_text()
        from afterclose.harness.oracle.rules import crash

        violation = crash.check_crash(target)
        assert violation is not None and "SIGSEGV" in violation.render()
    finally:
        final = target.stop()
    assert final == status
    assert not _exists(docker_client, target.container_id)  # type: ignore[attr-defined]


def test_target_that_dies_on_start_gives_readiness_error(
    docker_client: Any, runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    manifest = with_command(echo_manifest, "{build}", "not-an-address", "{port}")
    with pytest.raises(TargetStartError) as info:
        runner.start(make(manifest))
    message = str(info.value)
    assert "did not become ready" in message, message
    assert "exited with status 2" in message
    assert "bad host not-an-address" in message  # the container's stderr, copied home
    assert containers_labelled(docker_client, own_label()) == []


def test_missing_program_in_user_image_is_a_start_error(
    docker_client: Any, runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    # The closure image of echo_server has no /bin/true; run it as a "user image".
    plan = make()
    tag = runner.image_for(plan).tag
    manifest = with_command(echo_manifest, "/no/such/program", docker=DockerSpec(image=tag))
    with pytest.raises(TargetStartError, match="could not start target") as info:
        runner.start(make(manifest))
    assert "no such file or directory" in str(info.value).lower()
    assert containers_labelled(docker_client, own_label()) == []


def test_no_sigterm_handler_is_killed_without_waiting(
    runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    # PID 1 of a namespace never receives a signal it neither handles nor blocks; waiting
    # stop_timeout_s for it would only waste time.
    manifest = with_command(
        echo_manifest, "{build}", "{host}", "{port}", "--no-sigterm", stop_timeout_s=30.0
    )
    target = runner.start(make(manifest))
    started = time.monotonic()
    status = target.stop()
    assert time.monotonic() - started < 30  # did not wait out stop_timeout_s
    assert status is not None and status.signal == signal.SIGKILL and status.stopped_by_harness


# ------------------------------------------------------------------------------ images


def test_bad_image_name_is_a_clear_error(
    docker_client: Any, runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    manifest = dataclasses.replace(
        echo_manifest, docker=DockerSpec(image="afterclose-test/no-such-image:nope")
    )
    with pytest.raises(TargetStartError) as info:
        runner.start(make(manifest))
    message = str(info.value)
    assert "'afterclose-test/no-such-image:nope' does not exist locally" in message
    assert "docker build" in message and "dockerfile =" in message
    assert "docker.image" in message


def test_closure_image_is_cached_and_labelled(
    docker_client: Any, runner: Any, make: PlanFactory
) -> None:
    plan = make()
    first = runner.image_for(plan)
    again = runner.image_for(plan)
    assert again.tag == first.tag and not again.built
    assert first.tag.startswith("afterclose/docker-echo:")
    image = docker_client.images.get(first.tag)
    assert image.labels.get("afterclose") == "1"
    assert image.attrs["Size"] < 50_000_000


def test_dockerfile_target_builds_offline(
    docker_client: Any, runner: Any, make: PlanFactory, echo_manifest: Manifest, tmp_path: Path
) -> None:
    from afterclose.harness.runners.docker import images

    folder = tmp_path / "image"
    folder.mkdir()
    static = folder / "echo_static"
    subprocess.run(
        ["cc", "-O1", "-static", "-o", str(static), str(ECHO_SOURCE)], check=True, timeout=120
    )
    (folder / "Dockerfile").write_text("FROM scratch\nCOPY echo_static /srv/echo\n")
    manifest = with_command(
        echo_manifest,
        "/srv/echo",
        "{host}",
        "{port}",
        name=f"docker-echo-df-{uuid.uuid4().hex[:6]}",
        compile=None,
        docker=DockerSpec(dockerfile=folder / "Dockerfile"),
    )
    plan = make(manifest, artefact=None)
    try:
        with runner.start(plan):
            assert runner.last_image.kind == "dockerfile" and runner.last_image.built
            assert http_get(plan.port, "/static").endswith(b"/static")
        images.forget_dockerfile_builds()
        # A broken Dockerfile: BuildError with the engine's build log.
        (folder / "Dockerfile").write_text("FROM scratch\nCOPY no-such-file /x\n")
        with pytest.raises(BuildError) as info:
            runner.start(make(manifest, artefact=None, workdir="work2"))
        message = str(info.value)
        assert "no-such-file" in message and "build output" in message
    finally:
        remove_images(docker_client, images.repo_name(manifest.name))


def remove_images(docker_client: Any, repo: str) -> None:
    """Remove a test's own images, not their parents: the engine's build cache shares a
    parent between images whose first steps are the same, and pruning it under another
    worker's build that just matched it in the cache fails that build ("unable to find
    image sha256:...")."""
    for image in docker_client.images.list(name=repo):
        docker_client.images.remove(image.id, force=True, noprune=True)


# ---------------------------------------------------------------------------- run_args


def test_ulimit_from_run_args_takes_effect(
    runner: Any, make: PlanFactory, echo_manifest: Manifest, docker_client: Any
) -> None:
    manifest = dataclasses.replace(
        echo_manifest,
        docker=DockerSpec(
            image=runner.image_for(make()).tag,
            run_args=("--ulimit", "nofile=1234:2345", "--pids-limit=64", "--memory", "256m"),
        ),
    )
    with runner.start(make(manifest)) as target:
        limits = Path(f"/proc/{target.host_pids()[0]}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["1234", "2345"]
        host_config = docker_client.containers.get(target.container_id).attrs["HostConfig"]
        assert host_config["PidsLimit"] == 64
        assert host_config["Memory"] == 256 * 1024 * 1024


def test_user_from_run_args_runs_unprivileged(
    runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    manifest = dataclasses.replace(
        echo_manifest,
        docker=DockerSpec(
            image=runner.image_for(make()).tag,
            run_args=("--user", "65534:65534", "--cap-drop", "ALL"),
        ),
    )
    plan = make(manifest)
    with runner.start(plan) as target:
        assert http_get(plan.port, "/whoami").endswith(b"uid=65534")
        status = Path(f"/proc/{target.host_pids()[0]}/status").read_text()
        assert "\nUid:\t65534\t" in status
        assert "\nCapEff:\t0000000000000000" in status
    assert "READY" in plan.stdout_path.read_text()


def _status_field(pid: int, name: str) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(
        line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith(f"{name}:")
    )


def test_a_container_holds_no_capability_and_runs_as_nobody_by_default(
    runner: Any, make: PlanFactory, docker_client: Any
) -> None:
    plan = make()
    with runner.start(plan) as target:
        assert http_get(plan.port, "/whoami").endswith(b"uid=65534")
        pid = target.host_pids()[0]
        assert _status_field(pid, "CapEff") == "0000000000000000"
        assert _status_field(pid, "CapBnd") == "0000000000000000"
        assert _status_field(pid, "NoNewPrivs") == "1"
        assert _status_field(pid, "Uid").split()[0] == "65534"
        host_config = docker_client.containers.get(target.container_id).attrs["HostConfig"]
        assert host_config["CapDrop"] == ["ALL"]
        assert "no-new-privileges:true" in host_config["SecurityOpt"]
    # The workdir is the container user's, not open to everyone.
    info = plan.workdir.stat()
    assert info.st_uid == 65534 and info.st_mode & 0o777 != 0o777


def test_a_root_container_keeps_only_the_capabilities_its_manifest_declares(
    runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    manifest = dataclasses.replace(
        echo_manifest, docker=DockerSpec(user="root", cap_add=("NET_BIND_SERVICE",))
    )
    plan = make(manifest)
    with runner.start(plan) as target:
        assert http_get(plan.port, "/whoami").endswith(b"uid=0")
        pid = target.host_pids()[0]
        net_bind_service = 1 << 10  # capability.h
        assert int(_status_field(pid, "CapEff"), 16) == net_bind_service
        assert _status_field(pid, "NoNewPrivs") == "1"


def test_oom_kill_is_sigkill_not_stopped_by_harness(
    runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    manifest = dataclasses.replace(
        echo_manifest,
        docker=DockerSpec(image=runner.image_for(make()).tag, run_args=("--memory", "32m")),
    )
    plan = make(manifest)
    with runner.start(plan) as target:
        with contextlib.suppress(OSError):
            http_get(plan.port, "/hog", timeout=30)
        status = wait_for(target.exit_status, 30, "the OOM kill")
    assert status.signal == signal.SIGKILL and not status.stopped_by_harness


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--privileged",), "unsupported option '--privileged'"),
        (("--network", "bridge"), "unsupported option '--network'"),
        (("--ulimit", "nofiles=1"), "bad --ulimit"),
        (("--pids-limit",), "--pids-limit needs a value"),
        (("--memory", "lots"), "bad --memory"),
    ],
)
def test_bad_run_args_are_manifest_errors(
    runner: Any, make: PlanFactory, echo_manifest: Manifest, args: tuple[str, ...], expected: str
) -> None:
    manifest = dataclasses.replace(echo_manifest, docker=DockerSpec(image="x", run_args=args))
    with pytest.raises(ManifestError) as info:
        runner.start(make(manifest))
    message = str(info.value)
    assert expected in message and "docker.run_args" in message
    assert "--ulimit" in message and "--cap-add" in message  # the supported list


# ----------------------------------------------------------------------------- errors


def test_engine_not_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from afterclose.harness.runners.docker import DockerRunner

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(TargetStartError) as info:
        DockerRunner()
    message = str(info.value)
    assert "not reachable" in message
    assert "start dockerd" in message and "--runner=process" in message


def test_docker_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from afterclose.harness.runners.docker import DockerRunner

    monkeypatch.setitem(sys.modules, "docker", None)
    with pytest.raises(TargetStartError) as info:
        DockerRunner()
    assert "'docker'" in str(info.value) and "--runner=process" in str(info.value)


def test_script_without_docker_table_is_refused(
    runner: Any, make: PlanFactory, echo_manifest: Manifest, tmp_path: Path
) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    manifest = with_command(echo_manifest, str(script), compile=None)
    with pytest.raises(TargetStartError, match=r"(?s)is a script .*dockerfile ="):
        runner.start(make(manifest, artefact=None))


# ---------------------------------------------------------------------------- cleanup


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_our_orphans(docker_client: Any, runner: Any, make: PlanFactory) -> None:
    from afterclose.harness.runners.docker import reaper

    tag = runner.image_for(make()).tag
    session = f"sweep-{uuid.uuid4().hex[:8]}"
    mine = reaper.owner_labels(session)
    orphan = {**mine, reaper.LABEL_PID: str(_dead_pid()), reaper.LABEL_PID_START: ""}
    foreign_ns = {**orphan, reaper.LABEL_PIDNS: "pid:[1]"}
    made = {
        "orphan": docker_client.containers.create(tag, ["/x"], labels=orphan),
        "alive": docker_client.containers.create(tag, ["/x"], labels=mine),
        "foreign": docker_client.containers.create(tag, ["/x"], labels=foreign_ns),
        "unlabelled": docker_client.containers.create(
            tag, ["/x"], labels={"afterclose.session": session}
        ),
    }
    try:
        reaper.sweep_containers(session)
        left = {c.id for c in containers_labelled(docker_client, f"afterclose.session={session}")}
        assert made["orphan"].id not in left
        assert {made[k].id for k in ("alive", "foreign", "unlabelled")} <= left
    finally:
        for container in made.values():
            if _exists(docker_client, container.id):
                container.remove(force=True)


def _exists(client: Any, ref: str) -> bool:
    import docker.errors

    try:
        client.containers.get(ref)
    except docker.errors.NotFound:
        return False
    return True


def _child_env(session: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "AFTERCLOSE_"))}
    env["AFTERCLOSE_SESSION"] = session
    env["PYTHONUNBUFFERED"] = "1"
    return env


INNER_COMMON = """
import os, sys, time
from pathlib import Path
from afterclose.harness.launch import build_target, make_plan
from afterclose.harness.manifest import load_manifest
from afterclose.harness.ports import lease_port
from afterclose.harness.runners.docker import DockerRunner

MANIFEST = Path({manifest!r})
MARKER = Path({marker!r})


def mark(text):
    # Atomic: the outer test must never read a marker that exists but is still empty.
    tmp = MARKER.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(MARKER)


def start(workdir):
    manifest = load_manifest(MANIFEST)
    artefact = build_target(manifest, "none", "inner")
    lease = lease_port()
    plan = make_plan(manifest, host="127.0.0.1", port=lease.port, workdir=workdir,
                     artefact=artefact)
    return DockerRunner().start(plan)
"""

INNER_TESTS = """
def test_with_block(tmp_path):
    with start(tmp_path / "w"):
        mark("started")
        time.sleep(120)


def test_leaked(tmp_path):
    target = start(tmp_path / "w")  # never stopped by the test: atexit must remove it
    mark("started")
    time.sleep(120)
"""


def _write_inner(tmp_path: Path, body: str) -> tuple[Path, Path]:
    marker = tmp_path / "started.marker"
    code = INNER_COMMON.format(manifest=str(ECHO_MANIFEST), marker=str(marker)) + body
    path = tmp_path / "test_inner_docker.py"
    path.write_text(textwrap.dedent(code))
    return path, marker


def _wait_for_container(client: Any, session: str, marker: Path, proc: Any) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"inner process exited early:\n{proc.stdout.read()}")
        running = client.containers.list(
            filters={"label": f"afterclose.session={session}"}, ignore_removed=True
        )
        return marker.exists() and len(running) == 1

    wait_for(ready, 90, "the inner process's container")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("case", ["test_with_block", "test_leaked"])
def test_signal_to_pytest_leaves_no_container(
    docker_client: Any, echo_binary: Path, tmp_path: Path, sig: signal.Signals, case: str
) -> None:
    session = f"sig-{uuid.uuid4().hex[:12]}"
    test_file, marker = _write_inner(tmp_path, INNER_TESTS)
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:afterclose",
        "-p", "no:xdist", f"{test_file}::{case}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=_child_env(session),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for_container(docker_client, session, marker, proc)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
        if sig == signal.SIGINT:
            assert proc.returncode == 2, output  # pytest's "interrupted"
            assert "KeyboardInterrupt" in output
        else:
            assert proc.returncode == -signal.SIGTERM, output  # still dies of SIGTERM
        left = containers_labelled(docker_client, f"afterclose.session={session}")
        assert left == [], f"containers left behind: {[c.name for c in left]}\n{output}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for container in containers_labelled(docker_client, f"afterclose.session={session}"):
            container.remove(force=True)


def test_exit_without_stop_removes_container(docker_client: Any, tmp_path: Path) -> None:
    session = f"exit-{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "started.marker"
    code = INNER_COMMON.format(manifest=str(ECHO_MANIFEST), marker=str(marker)) + textwrap.dedent(
        """
        target = start(Path(sys.argv[1]))
        mark(target.container_name)
        sys.exit(0)  # no stop(): the atexit handler removes it
        """
    )
    script = tmp_path / "inner.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "w")],
        env=_child_env(session),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert marker.read_text().startswith("afterclose-docker-echo-")
        assert containers_labelled(docker_client, f"afterclose.session={session}") == []
    finally:
        for container in containers_labelled(docker_client, f"afterclose.session={session}"):
            container.remove(force=True)


def test_container_of_a_sigkilled_process_is_swept(docker_client: Any, tmp_path: Path) -> None:
    from afterclose.harness.runners.docker.reaper import sweep_containers

    session = f"kill9-{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "started.marker"
    code = INNER_COMMON.format(manifest=str(ECHO_MANIFEST), marker=str(marker)) + textwrap.dedent(
        """
        target = start(Path(sys.argv[1]))
        mark(target.container_name)
        time.sleep(120)
        """
    )
    script = tmp_path / "inner.py"
    script.write_text(code)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "w")], env=_child_env(session)
    )
    label = f"afterclose.session={session}"
    try:
        wait_for(marker.exists, 60, "the inner process's container")
        proc.kill()  # no handler runs: the container outlives its owner
        proc.wait()
        # Under xdist another worker's new runner may sweep it first.
        assert len(containers_labelled(docker_client, label)) <= 1
        removed = sweep_containers(session)
        assert removed in ([marker.read_text()], []), (removed, marker.read_text())
        left = containers_labelled(docker_client, label)
        assert left == [], [(c.name, c.labels) for c in left]
    finally:
        if proc.poll() is None:
            proc.kill()
        for container in containers_labelled(docker_client, label):
            container.remove(force=True)


def test_container_of_a_sigkilled_process_goes_without_a_sweep(
    docker_client: Any, tmp_path: Path
) -> None:
    """The watchdog removes it: no later run is needed."""
    session = f"kill9w-{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "started.marker"
    code = INNER_COMMON.format(manifest=str(ECHO_MANIFEST), marker=str(marker)) + textwrap.dedent(
        """
        target = start(Path(sys.argv[1]))
        mark(target.container_name)
        time.sleep(120)
        """
    )
    script = tmp_path / "inner.py"
    script.write_text(code)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "w")], env=_child_env(session)
    )
    label = f"afterclose.session={session}"
    try:
        wait_for(marker.exists, 60, "the inner process's container")
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while containers_labelled(docker_client, label) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = containers_labelled(docker_client, label)
        assert left == [], [(c.name, c.labels) for c in left]
    finally:
        if proc.poll() is None:
            proc.kill()
        for container in containers_labelled(docker_client, label):
            container.remove(force=True)


# ------------------------------------------------------------------ tracer and timings


def test_preload_tracer_works_in_container(
    runner: Any, make: PlanFactory, tmp_path: Path, echo_binary: Path
) -> None:
    from afterclose.harness.trace import shim

    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    env = shim.shim_env(trace_dir, base_env={})
    plan = dataclasses.replace(make(extra_env=env), trace_dir=trace_dir)
    with runner.start(plan):
        assert http_get(plan.port, "/traced").endswith(b"/traced")
    written = sorted(p.name for p in trace_dir.iterdir())
    assert any(name.startswith("trace.") for name in written), written


def test_builtin_seed_fixed_in_container(docker_client: Any, runner: Any, tmp_path: Path) -> None:
    manifest = load_manifest(SEED_FIXED)
    artefact = build_target(manifest, "none", "test-docker-runner")
    lease: PortLease
    with lease_port() as lease:
        plan = make_plan(
            manifest, host="127.0.0.1", port=lease.port, workdir=tmp_path / "w", artefact=artefact
        )
        with runner.start(plan) as target:
            answer = http_get(plan.port, "/ac/seed/1/1")
            assert answer.startswith(b"HTTP/1."), answer[:200]
            assert os.listdir(f"/proc/{target.host_pids()[0]}/fd")
        assert target.exit_status() is not None and target.exit_status().stopped_by_harness


def test_image_is_built_once_then_cached(
    docker_client: Any, runner: Any, make: PlanFactory, echo_manifest: Manifest
) -> None:
    """The first start builds the image, later ones reuse it (bench/docker_start.py times them)."""
    from afterclose.harness.runners.docker import images

    manifest = dataclasses.replace(echo_manifest, name=f"docker-echo-time-{uuid.uuid4().hex[:6]}")
    try:
        for i in range(3):
            target = runner.start(make(manifest, workdir=f"w{i}"))
            assert runner.last_image.built == (i == 0)
            target.stop()
    finally:
        remove_images(docker_client, images.repo_name(manifest.name))
