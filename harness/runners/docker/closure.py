"""What a target needs from the host in a closure image: its programs, the shared libraries
they load (``ldd``), and the files its command, environment and rendered files name.

Files keep their host paths, so the plan's argv and environment (``LD_PRELOAD`` included) work
unchanged inside the container.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afterclose.harness.errors import TargetStartError

LDD_TIMEOUT_S = 30.0
# glibc dlopen()s libgcc_s for pthread_cancel/pthread_exit unwinding and backtrace(); a binary
# does not list it, so ldd cannot find it, and without it such a call aborts the target.
DLOPENED_SONAMES = ("libgcc_s.so.1",)


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


def file_digest(path: Path) -> str:
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
