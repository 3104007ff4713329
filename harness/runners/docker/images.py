"""Container images for the Docker runner, made without a registry.

Three sources, chosen by the manifest's ``[docker]`` table:

* no table: a ``FROM scratch`` image holding the target's binaries, the shared libraries they
  load (``ldd``), the dynamic loader and a few ``/etc`` files, each *at its host path*, so the
  plan's argv and environment (``LD_PRELOAD`` included) work unchanged inside the container.
  It is tagged ``afterclose/<name>:<hash of the files>`` and reused while that tag exists;
* ``image = "..."``: an image that must already exist locally (never pulled);
* ``dockerfile = "..."``: built with the engine's builder, once per process.

Builds run under an ``flock`` so several pytest-xdist workers build an image only once.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import re
import stat
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afterclose.harness import compile as cbuild
from afterclose.harness.errors import BuildError, TargetStartError
from afterclose.harness.manifest import Manifest
from afterclose.harness.runners.docker.closure import closure_files, file_digest
from afterclose.harness.runners.docker.reaper import LABEL

IMAGE_REPO_PREFIX = "afterclose/"
BUILD_TIMEOUT_S = 600.0
KEEP_IMAGES = 4  # closure images kept per target (sanitizer variants, recent rebuilds)
# Bump when the layout of generated images changes: old tags are then never reused.
IMAGE_FORMAT = "1"

SCRATCH_DOCKERFILE = f"""\
FROM scratch
COPY rootfs/ /
LABEL {LABEL}=1 {LABEL}.kind=closure
"""

# The loader resolves sonames through this cache first; with it the container finds every
# library at the path the host loader chose (also outside the default search folders).
LD_SO_CACHE = Path("/etc/ld.so.cache")

GENERATED_FILES: dict[str, bytes] = {
    # Docker resolves `--user name` with the image's /etc/passwd; scratch has none.
    "etc/passwd": b"root:x:0:0:root:/root:/sbin/nologin\n"
    b"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files dns\n",
}


@dataclass(frozen=True)
class ImageChoice:
    """The image to run and how it came about (for messages and the report)."""

    tag: str
    kind: str  # "closure", "image" or "dockerfile"
    built: bool  # False when an existing image was reused
    seconds: float = 0.0


def repo_name(name: str) -> str:
    """A Docker repository name (lowercase, [a-z0-9] runs joined by . _ -) for a target."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower())
    cleaned = re.sub(r"[._-]{2,}", "-", cleaned).strip("._-")
    return IMAGE_REPO_PREFIX + (cleaned or "target")


def closure_key(files: Sequence[Path]) -> str:
    h = hashlib.sha256(f"afterclose-image-format {IMAGE_FORMAT}\n".encode())
    h.update(SCRATCH_DOCKERFILE.encode())
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        h.update(f"{path}\0{mode:o}\0{file_digest(path)}\n".encode())
    extras = [LD_SO_CACHE] if LD_SO_CACHE.is_file() else []
    for path in extras:
        h.update(f"{path}\0{file_digest(path)}\n".encode())
    for rel, data in sorted(GENERATED_FILES.items()):
        h.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()[:20]


def closure_context(files: Sequence[Path]) -> bytes:
    """A build context (a tar) of the Dockerfile and ``rootfs/`` holding each file at its
    absolute path.  Symlinks on the way are resolved: the host's /lib may be a link to usr/lib,
    in the image it is a plain folder holding exactly the files the target needs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_bytes(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))

        add_bytes("Dockerfile", SCRATCH_DOCKERFILE.encode())
        tmp = tarfile.TarInfo("rootfs/tmp")
        tmp.type = tarfile.DIRTYPE
        tmp.mode = 0o1777
        tar.addfile(tmp)
        for rel, data in GENERATED_FILES.items():
            add_bytes(f"rootfs/{rel}", data)
        if LD_SO_CACHE.is_file():
            add_bytes(f"rootfs{LD_SO_CACHE}", LD_SO_CACHE.read_bytes())
        for path in files:
            mode = stat.S_IMODE(path.stat().st_mode)
            add_bytes(f"rootfs{path}", path.read_bytes(), mode)
    return buf.getvalue()


# ---------------------------------------------------------------------------- engine calls


@contextmanager
def build_lock(tag: str) -> Iterator[None]:
    folder = cbuild.cache_root() / "docker-locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / (re.sub(r"[^A-Za-z0-9_.-]", "_", tag) + ".lock")
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def image_exists(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _run_build(
    client: Any,
    *,
    tag: str,
    labels: Mapping[str, str],
    timeout_s: float,
    where: str | Path | None,
    context: bytes | None = None,
    path: Path | None = None,
    dockerfile: str | None = None,
) -> None:
    """Run a build through the engine API; raise BuildError with the log tail on failure.

    The HTTP read timeout doubles as the overall limit: the legacy builder aborts a build
    when its client goes away, so nothing keeps running after we give up."""
    import docker.errors
    import requests

    log: list[str] = []
    deadline = time.monotonic() + timeout_s
    kwargs: dict[str, Any] = {
        "tag": tag,
        "labels": dict(labels),
        "rm": True,
        "forcerm": True,
        "pull": False,
        "decode": True,
        "timeout": max(1, int(timeout_s)),
    }
    if context is not None:
        kwargs.update(fileobj=io.BytesIO(context), custom_context=True)
    else:
        kwargs.update(path=str(path), dockerfile=dockerfile)
    error: str | None = None
    try:
        for chunk in client.api.build(**kwargs):
            if "stream" in chunk:
                log.extend(str(chunk["stream"]).rstrip("\n").splitlines())
            if "error" in chunk:
                error = str(chunk["error"]).strip()
                log.append(error)
            if time.monotonic() > deadline:
                error = f"timed out after {timeout_s:.0f} s"
                break
    except requests.exceptions.ReadTimeout:
        error = f"timed out after {timeout_s:.0f} s"
    except (docker.errors.APIError, docker.errors.DockerException, OSError) as exc:
        error = str(exc)
    if error is None and not image_exists(client, tag):
        error = "the engine reported no error but produced no image"
    if error is not None:
        tail = "\n".join(log[-30:]) or "(no build output)"
        raise BuildError(
            f"docker build of {tag} failed: {error}",
            where=where,
            details=f"--- build output (last 30 lines)\n{tail}",
            hint="no registry is reachable here: FROM must name an image that exists locally "
            "(docker images) or scratch",
        )


def closure_image(
    client: Any,
    manifest: Manifest,
    programs: Sequence[Path],
    env: Mapping[str, str],
    extra: Sequence[Path] = (),
) -> ImageChoice:
    """``extra``: files copied as they are, after the programs' closure (data files, the
    libraries of extension modules that ``python_runtime`` found)."""
    files = closure_files(programs, env, where=manifest.path)
    seen = {str(f) for f in files}
    for path in extra:
        if str(path) not in seen:
            seen.add(str(path))
            files.append(path)
    tag = f"{repo_name(manifest.name)}:{closure_key(files)}"
    if image_exists(client, tag):
        return ImageChoice(tag, "closure", built=False)
    started = time.monotonic()
    with build_lock(tag):
        if image_exists(client, tag):  # another xdist worker built it while we waited
            return ImageChoice(tag, "closure", built=False)
        _run_build(
            client,
            tag=tag,
            labels={LABEL: "1", f"{LABEL}.target": manifest.name},
            timeout_s=BUILD_TIMEOUT_S,
            where=manifest.path,
            context=closure_context(files),
        )
        prune_images(client, tag.rsplit(":", 1)[0], keep=KEEP_IMAGES)
    return ImageChoice(tag, "closure", built=True, seconds=time.monotonic() - started)


def prune_images(client: Any, repo: str, keep: int) -> list[str]:
    """Remove all but the ``keep`` newest images of ``repo`` that the harness built (label
    ``afterclose=1``); an image a container still uses stays.  Returns the removed tags."""
    import docker.errors

    found = client.api.images(name=repo, filters={"label": f"{LABEL}=1"})
    found.sort(key=lambda item: int(item.get("Created") or 0), reverse=True)
    removed: list[str] = []
    for item in found[keep:]:
        for tag in item.get("RepoTags") or []:
            if not tag.startswith(f"{repo}:"):
                continue
            try:
                client.api.remove_image(tag, noprune=False)
            except docker.errors.APIError:
                continue  # in use (409) or already gone
            removed.append(tag)
    return removed


def local_image(client: Any, manifest: Manifest) -> ImageChoice:
    assert manifest.docker is not None and manifest.docker.image is not None
    name = manifest.docker.image
    if not image_exists(client, name):
        raise TargetStartError(
            f"image {name!r} does not exist locally (the harness never pulls images)",
            where=f"{manifest.path}: key 'docker.image'",
            hint=f"build it with `docker build -t {name} <folder>` (or `docker load`/"
            '`docker pull` it yourself), or use dockerfile = "Dockerfile" in [docker] to '
            "have the harness build it",
        )
    return ImageChoice(name, "image", built=False)


_DOCKERFILE_BUILT: dict[str, str] = {}
_DOCKERFILE_LOCK = threading.Lock()


def dockerfile_image(client: Any, manifest: Manifest) -> ImageChoice:
    """Build the manifest's Dockerfile once per process (the engine's layer cache makes the
    builds of other xdist workers quick)."""
    spec = manifest.docker
    assert spec is not None and spec.dockerfile is not None
    dockerfile = spec.dockerfile
    context = spec.context or dockerfile.parent
    where = f"{manifest.path}: key 'docker.dockerfile'"
    if not dockerfile.is_file():
        raise BuildError(f"Dockerfile not found: {dockerfile}", where=where)
    if not context.is_dir():
        raise BuildError(
            f"build context folder not found: {context}",
            where=f"{manifest.path}: key 'docker.context'",
        )
    key = hashlib.sha256(
        f"{dockerfile}\0{context}\0".encode() + dockerfile.read_bytes()
    ).hexdigest()[:16]
    tag = f"{repo_name(manifest.name)}:df-{key}"
    with _DOCKERFILE_LOCK:
        if _DOCKERFILE_BUILT.get(key) == tag and image_exists(client, tag):
            return ImageChoice(tag, "dockerfile", built=False)
    started = time.monotonic()
    try:
        rel = str(dockerfile.relative_to(context))
    except ValueError:
        rel = str(dockerfile)  # docker-py adds a Dockerfile from outside the context itself
    with build_lock(tag):
        _run_build(
            client,
            tag=tag,
            labels={LABEL: "1", f"{LABEL}.target": manifest.name},
            timeout_s=BUILD_TIMEOUT_S,
            where=where,
            path=context,
            dockerfile=rel,
        )
        prune_images(client, repo_name(manifest.name), keep=KEEP_IMAGES)
    with _DOCKERFILE_LOCK:
        _DOCKERFILE_BUILT[key] = tag
    return ImageChoice(tag, "dockerfile", built=True, seconds=time.monotonic() - started)


def forget_dockerfile_builds() -> None:
    """Make the next start rebuild Dockerfiles (tests use it)."""
    with _DOCKERFILE_LOCK:
        _DOCKERFILE_BUILT.clear()
