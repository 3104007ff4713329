"""Target manifests: a small TOML file that says how to build, start and probe a server.

Every key is checked: an unknown key, a wrong type or a bad value is a ``ManifestError`` that
names the file and the key and gives a hint (with a close-match suggestion for typos).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from afterclose.harness.errors import ManifestError
from afterclose.harness.manifest_keys import KEYS

if TYPE_CHECKING:
    from afterclose.harness.protocols.base import Protocol

MANIFEST_FILE = "target.toml"
PLACEHOLDERS = ("host", "port", "build", "workdir", "manifest_dir", "python", "tls_cert", "tls_key")
TRACER_MODES = ("auto", "preload", "ebpf", "off")
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGKILL")

T = TypeVar("T")


@dataclass(frozen=True)
class ReadySpec:
    """How to tell that a target is ready: exactly one of a log line, an open port or HTTP."""

    log: str | None = None
    port: bool = False
    http: str | None = None
    timeout_s: float = 10.0
    protocol: bool = False

    @property
    def strategy(self) -> str:
        if self.log is not None:
            return "log"
        if self.http is not None:
            return "http"
        if self.protocol:
            return "protocol"
        return "port"


@dataclass(frozen=True)
class CompileSpec:
    """A C program the harness builds itself (cached, optionally with a sanitizer)."""

    sources: tuple[Path, ...]
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()


@dataclass(frozen=True)
class DockerSpec:
    """How to run the target in a container (used by the Docker runner)."""

    image: str | None = None
    dockerfile: Path | None = None
    context: Path | None = None
    run_args: tuple[str, ...] = ()
    libc: str = "glibc"
    cap_add: tuple[str, ...] = ()  # capabilities kept; every other one is dropped
    user: str | None = None  # None: a non-root user (see runners/docker/privileges.py)
    unsupported: str | None = None  # why the target cannot run in a container at all


@dataclass(frozen=True)
class Manifest:
    name: str
    path: Path
    command: tuple[str, ...]
    description: str = ""
    build: tuple[str, ...] | None = None
    compile: CompileSpec | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    echo_path: bool = False
    liveness_path: str = "/"
    liveness_status: int = 200
    fd_grace_s: float = 2.0
    stop_signal: str = "SIGTERM"
    stop_timeout_s: float = 5.0
    tracer: str = "auto"
    ready: ReadySpec = ReadySpec(port=True)
    docker: DockerSpec | None = None
    restart_keeps: tuple[str, ...] = ()  # paths answered the same after a kill and restart
    protocol: str = "http"
    tls: bool = False
    request_headers: Mapping[str, str] = field(default_factory=dict)
    large_path: str | None = None
    idle_timeout_s: float | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def docker_unsupported(self) -> str | None:
        """Why the target cannot run in a container (``docker.unsupported``), if it cannot."""
        return self.docker.unsupported if self.docker is not None else None

    @cached_property
    def speaks(self) -> Protocol:
        """The :class:`Protocol` named by ``protocol`` (a user's class imported once)."""
        from afterclose.harness import protocols

        return protocols.resolve(self.protocol, self.folder, self.path)

    def render(self, template: str, values: Mapping[str, str], key: str) -> str:
        """Substitute ``{host}``-style placeholders; a typo is named, not silently kept."""
        try:
            return template.format_map(values)
        except (KeyError, IndexError, ValueError) as exc:
            raise ManifestError(
                f"bad placeholder in {key}: {template!r} ({exc})",
                where=self.path,
                hint=f"placeholders are {', '.join('{' + p + '}' for p in PLACEHOLDERS)};"
                " write {{ and }} for literal braces",
            ) from exc


# ---------------------------------------------------------------------------- parsing


class _Table:
    """A TOML table being validated: tracks which keys were read to reject the rest."""

    def __init__(self, data: Mapping[str, Any], path: Path, prefix: str = "") -> None:
        self.data = data
        self.path = path
        self.prefix = prefix
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str, hint: str | None = None) -> ManifestError:
        return ManifestError(f"key {self.key(name)!r}: {message}", where=self.path, hint=hint)

    def get(self, name: str, kind: Callable[[Any], T]) -> T:
        """The value of ``name``, checked by ``kind``; its default and description are the
        ones ``manifest_keys.KEYS`` gives."""
        spec = KEYS[self.key(name)]
        describe, default = spec.value, cast(T, spec.default)
        self.seen.add(name)
        if name not in self.data:
            if spec.required:
                raise ManifestError(
                    f"missing required key {self.key(name)!r}",
                    where=self.path,
                    hint=f"add {self.key(name)} = <{describe}>",
                )
            return default
        value = self.data[name]
        try:
            return kind(value)
        except (TypeError, ValueError) as exc:
            raise self.error(name, f"expected {describe}, got {value!r}", str(exc) or None) from exc

    def get_opt(self, name: str, kind: Callable[[Any], T]) -> T | None:
        """Like ``get``, for a key whose default is "not given" (None)."""
        assert KEYS[self.key(name)].default is None, name
        return self.get(name, cast("Callable[[Any], T | None]", kind))

    def read(
        self,
        kinds: Mapping[str, Callable[[Any], object]],
        then: Mapping[str, Callable[[_Table, Any], None]] | None = None,
    ) -> dict[str, Any]:
        """``get`` of each key of ``kinds``, in its order: name -> checked value.  ``then``:
        a further check of a key's value, made before the next key is read (which error a
        manifest with several gets first does not depend on how it is read)."""
        values: dict[str, Any] = {}
        for name, kind in kinds.items():
            values[name] = self.get(name, kind)
            if then and name in then:
                then[name](self, values[name])
        return values

    def table(self, name: str) -> _Table | None:
        self.seen.add(name)
        if name not in self.data:
            return None
        value = self.data[name]
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table [{self.key(name)}], got {value!r}")
        return _Table(value, self.path, f"{self.key(name)}.")

    def reject_unknown(self) -> None:
        for name in self.data:
            if name not in self.seen:
                close = difflib.get_close_matches(name, sorted(self.seen), n=1)
                hint = f"did you mean {self.key(close[0])!r}?" if close else None
                allowed = ", ".join(sorted(self.seen))
                raise ManifestError(
                    f"unknown key {self.key(name)!r} (allowed here: {allowed})",
                    where=self.path,
                    hint=hint,
                )


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("write true or false")
    return value


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("not a number")
    if value <= 0:
        raise ValueError("must be greater than 0")
    return float(value)


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError('write a list of strings, e.g. ["./server", "{port}"]')
    return tuple(value)


def _command(value: Any) -> tuple[str, ...]:
    items = _str_list(value)
    if not items:
        raise ValueError("the command must not be empty")
    return items


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError('write a table of strings, e.g. {NAME = "value"}')
    return dict(value)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"allowed values: {', '.join(options)}")
        return str(value)

    return check


def _url_path(value: Any) -> str:
    text = _str(value)
    if not text.startswith("/"):
        raise ValueError("an HTTP path starts with '/'")
    return text


def _header_map(value: Any) -> dict[str, str]:
    headers = _str_map(value)
    for name, text in headers.items():
        if not name or any(c in name for c in " :\t\r\n") or any(c in text for c in "\r\n"):
            raise ValueError(f"{name!r} = {text!r} is not a request header (name: value)")
    return headers


def _url_paths(value: Any) -> tuple[str, ...]:
    return tuple(_url_path(v) for v in _str_list(value))


def load_manifest(path: Path) -> Manifest:
    path = path.resolve()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            "manifest file not found", where=path, hint="check the path given to --target"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {exc.strerror}", where=path) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError("manifest is not UTF-8 text", where=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(
            f"invalid TOML: {exc}",
            where=path,
            hint='strings need quotes; lists are written ["a", "b"]',
        ) from exc
    return parse_manifest(data, path)


def parse_manifest(data: Mapping[str, Any], path: Path) -> Manifest:
    top = _Table(data, path)
    values = top.read(_TOP_KINDS, then={"name": _usable_name, "files": _plain_file_names})
    compile_spec = _parse_compile(top.table("compile"), path.parent)
    ready = _parse_ready(top.table("ready"))
    docker = _parse_docker(top.table("docker"), path.parent)
    values |= top.read(_LATER_KINDS)
    top.reject_unknown()

    command: tuple[str, ...] = values["command"]
    if "{build}" in " ".join(command) and compile_spec is None:
        raise top.error(
            "command",
            "uses {build} but the manifest has no [compile] table",
            "add [compile] sources = [...], or name the program directly",
        )
    manifest = Manifest(path=path, compile=compile_spec, ready=ready, docker=docker, **values)
    manifest.speaks  # noqa: B018  (an unknown protocol or a broken class is named now)
    probe = dict.fromkeys(PLACEHOLDERS, "x")
    for i, part in enumerate(command):
        manifest.render(part, probe, f"command[{i}]")
    for key, value in manifest.env.items():
        manifest.render(value, probe, f"env.{key}")
    for fname, text in manifest.files.items():
        manifest.render(text, probe, f"files.{fname!r}")
    return manifest


def _usable_name(top: _Table, name: str) -> None:
    if not name or any(c.isspace() or c == "/" for c in name):
        raise top.error("name", f"{name!r} is not a usable name", "use letters, digits, - and _")


def _plain_file_names(top: _Table, files: Mapping[str, str]) -> None:
    for fname in files:
        if "/" in fname or fname in ("", ".", ".."):
            raise top.error("files", f"{fname!r} is not a plain file name", "no folders")


def _status(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError("an HTTP status is a whole number from 100 to 599")
    return value


def _parse_compile(table: _Table | None, folder: Path) -> CompileSpec | None:
    if table is None:
        return None
    sources = table.get("sources", _command)
    cflags = table.get("cflags", _str_list)
    ldflags = table.get("ldflags", _str_list)
    table.reject_unknown()
    paths = tuple((folder / s).resolve() for s in sources)
    for src, p in zip(sources, paths, strict=True):
        if not p.is_file():
            raise table.error("sources", f"source file {src!r} not found ({p})")
    return CompileSpec(sources=paths, cflags=cflags, ldflags=ldflags)


def _parse_ready(table: _Table | None) -> ReadySpec:
    if table is None:
        return ReadySpec(port=True)
    log = table.get_opt("log", _str)
    port = table.get("port", _bool)
    http = table.get_opt("http", _url_path)
    by_protocol = table.get("protocol", _bool)
    timeout_s = table.get("timeout_s", _positive)
    table.reject_unknown()
    given = (("log", log), ("port", port or None), ("http", http), ("protocol", by_protocol))
    chosen = [k for k, v in given if v]
    if len(chosen) > 1:
        raise table.error(chosen[1], f"choose one readiness strategy, not {' and '.join(chosen)}")
    if log == "":
        raise table.error("log", "the log line to wait for is empty")
    return ReadySpec(
        log=log, port=port or not chosen, http=http, timeout_s=timeout_s, protocol=by_protocol
    )


def _parse_docker(table: _Table | None, folder: Path) -> DockerSpec | None:
    if table is None:
        return None
    values = table.read(_DOCKER_KINDS)
    table.reject_unknown()
    image, dockerfile, context = values["image"], values.pop("dockerfile"), values.pop("context")
    if image is not None and dockerfile is not None:
        raise table.error(
            "image", "give one of image or dockerfile, not both", 'image = "name:tag"'
        )
    return DockerSpec(
        **values,
        dockerfile=(folder / dockerfile).resolve() if dockerfile else None,
        context=(folder / context).resolve() if context else None,
    )


# The capabilities of Linux 6.x (capability.h), without their CAP_ prefix.
LINUX_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip


def _capabilities(value: Any) -> tuple[str, ...]:
    names = tuple(name.upper().removeprefix("CAP_") for name in _str_list(value))
    unknown = [name for name in names if name not in LINUX_CAPABILITIES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], LINUX_CAPABILITIES, n=1)
        raise ValueError(
            f"unknown capability {unknown[0]!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + " (e.g. NET_BIND_SERVICE, SETUID, SETGID)"
        )
    return tuple(dict.fromkeys(names))


def _user(value: Any) -> str:
    text = _str(value)
    if not re.fullmatch(r"[a-z_][a-z0-9_.-]*|[0-9]+(:[0-9]+)?", text):
        raise ValueError('write "root", a user name, or UID[:GID]')
    return text


# How each key is checked, in the order the keys are read (the first bad one is named): these,
# then the tables [compile], [ready] and [docker], then _LATER_KINDS.
_TOP_KINDS: dict[str, Callable[[Any], object]] = {
    "name": _str,
    "command": _command,
    "description": _str,
    "build": _command,
    "env": _str_map,
    "files": _str_map,
    "echo_path": _bool,
    "liveness_path": _url_path,
    "liveness_status": _status,
    "fd_grace_s": _positive,
    "stop_signal": _choice(STOP_SIGNALS),
    "stop_timeout_s": _positive,
    "tracer": _choice(TRACER_MODES),
}
_LATER_KINDS: dict[str, Callable[[Any], object]] = {
    "restart_keeps": _url_paths,
    "protocol": _str,
    "tls": _bool,
    "request_headers": _header_map,
    "large_path": _url_path,
    "idle_timeout_s": _positive,
}
_DOCKER_KINDS: dict[str, Callable[[Any], object]] = {
    "image": _str,
    "dockerfile": _str,
    "context": _str,
    "run_args": _str_list,
    "libc": _choice(("glibc", "musl", "none")),
    "cap_add": _capabilities,
    "user": _user,
    "unsupported": _str,
}


# ------------------------------------------------------------------------- resolution


def builtin_targets_dir() -> Path:
    import afterclose.targets

    return Path(afterclose.targets.__file__).parent


def _candidates(name: str, folder: Path) -> list[Path]:
    return [folder / f"{name}.toml", folder / name / MANIFEST_FILE]


def _is_target_name(spec: str, rootdir: Path | None) -> bool:
    """Whether ``spec`` is group/name inside ``<rootdir>/targets/`` or the built-in targets
    (a misspelt name in an existing group too, so that it gets the "did you mean" answer)."""
    folders = [builtin_targets_dir()] + ([rootdir / "targets"] if rootdir is not None else [])
    group = spec.split("/", 1)[0]
    return bool(group) and any((folder / group).is_dir() for folder in folders)


def available_targets(rootdir: Path | None) -> list[str]:
    names: set[str] = set()
    folders = [builtin_targets_dir()]
    if rootdir is not None:
        folders.insert(0, rootdir / "targets")
    for folder in folders:
        if not folder.is_dir():
            continue
        names.update(p.stem for p in folder.glob("*.toml"))
        names.update(p.parent.name for p in folder.glob(f"*/{MANIFEST_FILE}"))
        # Collections of targets one folder deeper (targets/zoo/<name>/) are named group/name.
        names.update(
            f"{p.parent.parent.name}/{p.parent.name}" for p in folder.glob(f"*/*/{MANIFEST_FILE}")
        )
    return sorted(names)


def resolve_target(spec: str, rootdir: Path | None, cwd: Path | None = None) -> Path:
    """``--target`` value to a manifest path: a file path, else a name looked up in
    ``<rootdir>/targets/`` and then among the built-in targets."""
    if not spec:
        raise ManifestError("--target is empty", hint="--target=NAME or --target=path/to.toml")
    looks_like_path = "/" in spec or spec.endswith(".toml")
    if looks_like_path and not spec.endswith(".toml") and not Path(spec).is_absolute():
        # group/name (zoo/h2o-1427) is a built-in target's name unless such a path exists.
        local = (cwd or Path.cwd()) / spec
        looks_like_path = local.exists() or not _is_target_name(spec, rootdir)
    if looks_like_path:
        path = Path(spec)
        if not path.is_absolute():
            path = (cwd or Path.cwd()) / path
        if path.is_dir():
            path = path / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(
                f"no manifest at {path}",
                hint="--target takes a manifest file, a folder holding target.toml, or a name",
            )
        return path.resolve()
    tried: list[Path] = []
    folders = [builtin_targets_dir()]
    if rootdir is not None:
        folders.insert(0, rootdir / "targets")
    for folder in folders:
        for candidate in _candidates(spec, folder):
            tried.append(candidate)
            if candidate.is_file():
                return candidate.resolve()
    known = available_targets(rootdir)
    close = difflib.get_close_matches(spec, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ManifestError(
        f"unknown target {spec!r}",
        details="looked for:\n" + "\n".join(f"  {p}" for p in tried),
        hint=f"{hint}known targets: {', '.join(known) or 'none'}",
    )
