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
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afterclose.harness import compile as cbuild
from afterclose.harness.errors import BuildError, TargetStartError
from afterclose.harness.manifest import Manifest

IMAGE_REPO_PREFIX = "afterclose/"
LABEL = "afterclose"
BUILD_TIMEOUT_S = 600.0
KEEP_IMAGES = 4  # closure images kept per target (sanitizer variants, recent rebuilds)
LDD_TIMEOUT_S = 30.0
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
# glibc dlopen()s libgcc_s for pthread_cancel/pthread_exit unwinding and backtrace(); a binary
# does not list it, so ldd cannot find it, and without it such a call aborts the target.
DLOPENED_SONAMES = ("libgcc_s.so.1",)

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


# ------------------------------------------------------------------- shared-library closure


class _StatMemo:
    """Per-process memo keyed by a file's identity, so a cached start does not re-run ldd or
    re-hash megabytes of libraries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple[str, int, int, int, int], Any] = {}

    @staticmethod
    def key(path: Path) -> tuple[str, int, int, int, int]:
        st = path.stat()
        return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self, path: Path) -> Any:
        with self._lock:
            return self._data.get(self.key(path))

    def put(self, path: Path, value: Any) -> None:
        with self._lock:
            self._data[self.key(path)] = value


_LDD_MEMO = _StatMemo()
_HASH_MEMO = _StatMemo()

_LDD_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)\s*$")
_LDD_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found\s*$")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def parse_ldd(output: str) -> tuple[list[Path], list[str]]:
    """Paths ldd resolved (loader included) and sonames it could not find."""
    found: list[Path] = []
    missing: list[str] = []
    for line in output.splitlines():
        if m := _LDD_ARROW.match(line):
            if m.group(2).startswith("/"):
                found.append(Path(m.group(2)))
        elif m := _LDD_NOT_FOUND.match(line):
            missing.append(m.group(1))
        elif m := _LDD_PLAIN.match(line):
            found.append(Path(m.group(1)))
        # linux-vdso.so.1 has no file: the kernel maps it into every process.
    return found, missing


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def shared_libraries(path: Path, env: Mapping[str, str] | None = None) -> list[Path]:
    """The shared objects ``path`` loads at start (its own dependencies, the loader too)."""
    cached = _LDD_MEMO.get(path)
    if cached is not None:
        return list(cached)
    ldd = shutil.which("ldd")
    if ldd is None:
        raise TargetStartError(
            "ldd not found: cannot work out which libraries the target needs in its image",
            hint="install libc-bin (glibc's ldd), or give the manifest a [docker] table with "
            "image = or dockerfile =",
        )
    run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    if env and env.get("LD_LIBRARY_PATH"):
        run_env["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"]
    try:
        proc = subprocess.run(
            [ldd, str(path)],
            capture_output=True,
            text=True,
            env=run_env,
            timeout=LDD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TargetStartError(f"ldd {path} did not finish within {LDD_TIMEOUT_S:.0f} s") from None
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if "not a dynamic executable" in text or "statically linked" in text:
            libs: list[Path] = []
            _LDD_MEMO.put(path, libs)
            return libs
        raise TargetStartError(
            f"ldd {path} failed (exit {proc.returncode})",
            details=text.strip()[-2000:],
            hint="the Docker runner builds images for native ELF programs; give the manifest "
            "a [docker] table with image = or dockerfile = for anything else",
        )
    libs, missing = parse_ldd(proc.stdout)
    if missing:
        raise TargetStartError(
            f"{path} needs libraries the host does not have: {', '.join(missing)}",
            details=proc.stdout.strip(),
            hint="the target must run on this host first (try --runner=process); set "
            "LD_LIBRARY_PATH in the manifest's env if the libraries live in a custom folder",
        )
    _LDD_MEMO.put(path, libs)
    return list(libs)


def _ldconfig_lookup(soname: str) -> Path | None:
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        out = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = line.strip().split(" => ")
        if len(parts) == 2 and parts[0].split(" ", 1)[0] == soname:
            candidate = Path(parts[1])
            if candidate.is_file():
                return candidate
    return None


_DLOPENED: list[Path] | None = None
_DLOPENED_LOCK = threading.Lock()


def dlopened_extras() -> list[Path]:
    """Libraries glibc loads at run time without a binary naming them (found once)."""
    global _DLOPENED
    with _DLOPENED_LOCK:
        if _DLOPENED is None:
            _DLOPENED = [p for p in (_ldconfig_lookup(s) for s in DLOPENED_SONAMES) if p]
        return list(_DLOPENED)


def preload_paths(env: Mapping[str, str]) -> list[Path]:
    """Absolute paths in ``LD_PRELOAD`` (the loader splits it on spaces and colons)."""
    items = re.split(r"[\s:]+", env.get("LD_PRELOAD", ""))
    return [Path(i) for i in items if i.startswith("/")]


def resolve_program(argv0: str, env: Mapping[str, str]) -> Path | None:
    """The host file ``argv0`` names: a path as is, a bare name through PATH."""
    if "/" in argv0:
        path = Path(argv0)
        return path if path.is_absolute() else None
    found = shutil.which(argv0, path=env.get("PATH") or os.environ.get("PATH"))
    return Path(found) if found else None


def closure_files(
    programs: Sequence[Path], env: Mapping[str, str], *, where: str | Path | None = None
) -> list[Path]:
    """``programs`` plus every shared object they need, in a stable order, without repeats."""
    seen: dict[str, Path] = {}
    queue: list[Path] = []
    for prog in programs:
        if not prog.is_file():
            raise TargetStartError(
                f"{prog} does not exist on this host, so it cannot be put into the image",
                where=where,
                hint="build the target first (a [compile] table or the build command), or run "
                "an image that contains it with [docker] image = ...",
            )
        if not _is_elf(prog):
            head = prog.read_bytes()[:2]
            what = "a script (#!)" if head == b"#!" else "not an ELF binary"
            raise TargetStartError(
                f"{prog} is {what}: the Docker runner can only package native programs itself",
                where=where,
                hint="add a [docker] table with dockerfile = (an image that has the "
                "interpreter), or image = an existing local image",
            )
        queue.append(prog)
    queue.extend(dlopened_extras())
    while queue:
        path = queue.pop(0)
        if str(path) in seen:
            continue
        seen[str(path)] = path
        queue.extend(p for p in shared_libraries(path, env) if str(p) not in seen)
    return list(seen.values())


# ------------------------------------------------------------- host files a plan names


@dataclass(frozen=True)
class HostFiles:
    """What the target needs from the host besides ``command[0]`` and the tracer shim."""

    programs: tuple[Path, ...] = ()  # ELF files: copied with the libraries they load
    libraries: tuple[Path, ...] = ()  # shared objects (a closure already): copied as they are
    data: tuple[Path, ...] = ()  # other files: copied as they are
    mounts: tuple[Path, ...] = ()  # folders bind-mounted read-only at their host path


# Kernel filesystems: the container has its own, nothing under them is copied from the host.
# Scratch folders: the container has its own too, but files under them are copied when named
# (a project checked out under /tmp names its own files there).
NOT_COPIED = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/run"))
SCRATCH = tuple(Path(p) for p in ("/tmp", "/var/tmp"))
MAX_NAMED_FOLDER_FILES = 1000
# An absolute path in a command line, a shell script or a config file; the look-behind keeps
# "text/plain" and "$HOME/x" out.
_NAMED_PATH = re.compile(r"(?<![\w.~$}-])/[\w.+@-]+(?:/[\w.+@-]+)*/?")
_PYTHON_NAME = re.compile(r"python\d*(\.\d+)?")
_PYTHON_PATHS = "import json, sys; print(json.dumps({'prefix': sys.prefix, 'path': sys.path[1:]}))"


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    return any(path == f or path.is_relative_to(f) for f in folders)


def named_paths(texts: Sequence[str], skip: Sequence[Path]) -> list[Path]:
    """Existing host files and folders that ``texts`` name by absolute path, outside ``skip``
    and the kernel and scratch folders, in order, without repeats.

    A path keeps the spelling it was named by (``..`` folded, symlinks not resolved): the
    target opens that spelling, so that is where the image must have it."""
    found: dict[str, Path] = {}
    for text in texts:
        for match in _NAMED_PATH.finditer(text):
            path = Path(os.path.normpath(match.group(0)))
            if (
                str(path) in found
                or path in (Path("/"), *SCRATCH)
                or _inside(path, (*skip, *NOT_COPIED))
            ):
                continue
            if path.is_file() or path.is_dir():
                found[str(path)] = path
    return list(found.values())


def _folder_files(folder: Path) -> list[Path] | None:
    """The regular files under ``folder`` (None if there are too many to copy)."""
    files: list[Path] = []
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file():
                files.append(path)
                if len(files) > MAX_NAMED_FOLDER_FILES:
                    return None
    return sorted(files)


def _outermost(folders: Sequence[Path]) -> list[Path]:
    ordered = sorted(
        {Path(os.path.normpath(f)) for f in folders}, key=lambda p: (len(p.parts), str(p))
    )
    kept: list[Path] = []
    for folder in ordered:
        if not _inside(folder, kept):
            kept.append(folder)
    return kept


def _libraries_of_many(paths: Sequence[Path]) -> list[Path]:
    """The shared objects a set of extension modules load: one ``ldd`` for many files.  A
    module whose libraries are missing on the host is left out (it cannot be imported here
    either); its siblings are still served."""
    ldd = shutil.which("ldd")
    if ldd is None or not paths:
        return []
    found: dict[str, Path] = {}
    for start in range(0, len(paths), 100):
        chunk = [str(p) for p in paths[start : start + 100]]
        try:
            proc = subprocess.run(
                [ldd, *chunk],
                capture_output=True,
                text=True,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                timeout=LDD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TargetStartError(
                f"ldd of {len(chunk)} extension modules did not finish within {LDD_TIMEOUT_S:.0f} s"
            ) from None
        libs, _missing = parse_ldd(proc.stdout)
        for lib in libs:
            found.setdefault(str(lib), lib)
    return list(found.values())


def _extension_modules(folder: Path, path_folders: Sequence[Path]) -> list[Path]:
    """The ELF shared objects under ``folder``, except in package folders the interpreter does
    not search: a venv's standard-library folder holds the base installation's
    ``site-packages`` (hundreds of modules there, none importable from the venv)."""
    wanted = {str(f) for f in path_folders}
    found: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in ("site-packages", "dist-packages") or os.path.join(root, d) in wanted
        )
        for name in sorted(names):
            path = Path(root) / name
            if ".so" in name and path.is_file() and _is_elf(path):
                found.append(path)
    return found


_PYTHON_MEMO: dict[tuple[str, tuple[tuple[str, str], ...]], HostFiles] = {}
_PYTHON_LOCK = threading.Lock()


def python_runtime(program: Path, env: Mapping[str, str], *, where: str | Path | None) -> HostFiles:
    """What a Python interpreter needs beyond its ELF closure: the folders of its module path
    (the standard library, the virtual environment's site-packages), bind-mounted read-only
    since they are far too big to copy (1.1 GB for a pyenv build here), a venv's
    ``pyvenv.cfg`` (without it the interpreter does not know it runs in the venv and leaves
    the venv's site-packages off its path), and the libraries its extension modules load
    (``_ssl`` needs libssl, a manylinux wheel may need libpthread), which must be in the
    image itself."""
    # The interpreter is asked with the target's environment (PYTHONPATH and the like) but
    # without the tracer: this probe is not the target.
    probe_env = {
        k: v for k, v in env.items() if k != "LD_PRELOAD" and not k.startswith("AFTERCLOSE_")
    }
    probe_env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    key = (str(program), tuple(sorted(probe_env.items())))
    with _PYTHON_LOCK:
        cached = _PYTHON_MEMO.get(key)
    if cached is not None:
        return cached
    try:
        proc = subprocess.run(
            [str(program), "-c", _PYTHON_PATHS],
            capture_output=True,
            text=True,
            env=probe_env,
            timeout=LDD_TIMEOUT_S,
            check=False,
        )
        info = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        info = None
    if not isinstance(info, dict):
        raise TargetStartError(
            f"cannot ask the Python interpreter {program} for its module path",
            where=where,
            hint="the target must run on this host first (try --runner=process)",
        )
    folders = [Path(p) for p in info["path"] if p and os.path.isabs(p) and os.path.isdir(p)]
    data = [Path(p) for p in info["path"] if p and os.path.isabs(p) and os.path.isfile(p)]
    venv_cfg = Path(info["prefix"]) / "pyvenv.cfg"
    if venv_cfg.is_file():
        data.append(venv_cfg)
    mounts = _outermost(folders)
    modules = [m for folder in mounts for m in _extension_modules(folder, folders)]
    result = HostFiles(
        libraries=tuple(_libraries_of_many(modules)), data=tuple(data), mounts=tuple(mounts)
    )
    with _PYTHON_LOCK:
        _PYTHON_MEMO[key] = result
    return result


def is_python(program: Path) -> bool:
    return bool(_PYTHON_NAME.fullmatch(Path(os.path.realpath(program)).name))


def host_files(
    program: Path,
    texts: Sequence[str],
    env: Mapping[str, str],
    *,
    skip: Sequence[Path],
    where: str | Path | None = None,
) -> HostFiles:
    """The host files a closure image needs besides ``program`` and the tracer shim: every
    existing file or folder that ``texts`` (the command line, the environment, the rendered
    ``[files]``) names by absolute path outside ``skip`` (the bind-mounted folders) — a
    launcher script's ``exec /usr/bin/h2o``, lighttpd's ``server.modules-dir`` — and, when
    ``program`` is a Python interpreter, its module path (``python_runtime``)."""
    programs: list[Path] = []
    data: list[Path] = []
    for path in named_paths(texts, skip):
        if path.is_dir():
            files = _folder_files(path)
            if files is None:
                warnings.warn(
                    f"afterclose: {path} (named by the target's command, environment or "
                    f"files) holds more than {MAX_NAMED_FOLDER_FILES} files: not copied into "
                    "the image",
                    stacklevel=2,
                )
                continue
        else:
            files = [path]
        for file in files:
            (programs if _is_elf(file) else data).append(file)
    named = HostFiles(programs=tuple(programs), data=tuple(data))
    if not is_python(program):
        return named
    runtime = python_runtime(program, env, where=where)
    return HostFiles(
        programs=named.programs,
        libraries=runtime.libraries,
        data=(*named.data, *runtime.data),
        mounts=runtime.mounts,
    )


def _file_digest(path: Path) -> str:
    cached = _HASH_MEMO.get(path)
    if cached is not None:
        return str(cached)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    _HASH_MEMO.put(path, digest)
    return digest


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
        h.update(f"{path}\0{mode:o}\0{_file_digest(path)}\n".encode())
    extras = [LD_SO_CACHE] if LD_SO_CACHE.is_file() else []
    for path in extras:
        h.update(f"{path}\0{_file_digest(path)}\n".encode())
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
