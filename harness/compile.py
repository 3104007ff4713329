"""Build C sources with the system compiler, cached by a hash of sources, flags and compiler.

Both the built-in targets and the tracer shim are built on first use.  Several pytest-xdist
workers may ask for the same build at once, so the build runs under an exclusive ``flock`` on a
per-key lock file and the result is published with an atomic ``rename``: a reader never sees a
half-written binary.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from afterclose.harness.errors import BuildError

SANITIZER_FLAGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "address": ("-fsanitize=address", "-fno-omit-frame-pointer", "-g"),
    "undefined": ("-fsanitize=undefined", "-fno-omit-frame-pointer", "-g"),
    "thread": ("-fsanitize=thread", "-g"),
}


def cache_root() -> Path:
    base = os.environ.get("AFTERCLOSE_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "afterclose"


def compiler() -> str:
    return os.environ.get("CC", "cc")


@cache
def compiler_identity(cc: str) -> str:
    exe = shutil.which(cc)
    if exe is None:
        raise BuildError(
            f"C compiler {cc!r} not found",
            hint="install one (apt-get install -y gcc) or set CC to a compiler on PATH",
        )
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot run the C compiler {exe}: {exc}") from exc
    return f"{exe}\n{out.stdout}"


@dataclass(frozen=True)
class CBuild:
    """What to build: ``kind`` is ``exe``, ``shared`` (a ``.so`` for ``LD_PRELOAD``) or
    ``object`` (a ``.o``: the eBPF program, with ``cc="clang"``); ``cc`` overrides the
    compiler (default: ``$CC``, else ``cc``)."""

    name: str
    sources: tuple[Path, ...]
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    kind: str = "exe"
    sanitizer: str = "none"
    cc: str | None = None

    def command(self, output: Path, cc: str) -> list[str]:
        san = SANITIZER_FLAGS[self.sanitizer]
        shared = {"shared": ("-shared", "-fPIC"), "object": ("-c",)}.get(self.kind, ())
        return [
            cc,
            *shared,
            *self.cflags,
            *san,
            "-o",
            str(output),
            *(str(s) for s in self.sources),
            *self.ldflags,
            *san,
        ]

    def key(self, cc: str) -> str:
        h = hashlib.sha256()
        h.update(compiler_identity(cc).encode())
        h.update(repr((self.cflags, self.ldflags, self.kind, self.sanitizer)).encode())
        for src in self.sources:
            h.update(src.name.encode())
            h.update(src.read_bytes())
        # An edited header of the target's own must rebuild it too.
        for header in local_includes(self.sources):
            h.update(str(header).encode())
            h.update(header.read_bytes())
        return h.hexdigest()[:20]


_QUOTED_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.M)


def local_includes(sources: Sequence[Path]) -> list[Path]:
    """Files pulled in by ``#include "..."`` (found next to the including file), recursively;
    system headers (``<...>``) belong to the compiler's identity, not to the target."""
    found: dict[Path, None] = {}
    todo = list(sources)
    while todo:
        current = todo.pop()
        try:
            text = current.read_bytes()
        except OSError:
            continue
        for name in _QUOTED_INCLUDE.findall(text):
            header = (current.parent / name.decode(errors="replace")).resolve()
            if header.is_file() and header not in found:
                found[header] = None
                todo.append(header)
    return sorted(found)


def build(spec: CBuild, *, extra_deps: Sequence[Path] = ()) -> Path:
    """Return the path of the built artefact, building it once per distinct input."""
    if spec.sanitizer not in SANITIZER_FLAGS:
        raise BuildError(
            f"unknown sanitizer {spec.sanitizer!r}",
            hint=f"use one of: {', '.join(SANITIZER_FLAGS)}",
        )
    for src in (*spec.sources, *extra_deps):
        if not src.is_file():
            raise BuildError(f"source file not found: {src}", where=spec.name)
    cc = spec.cc or compiler()
    key = spec.key(cc)
    for dep in extra_deps:
        key = hashlib.sha256((key + dep.read_text(errors="replace")).encode()).hexdigest()[:20]
    suffix = {"shared": ".so", "object": ".o"}.get(spec.kind, "")
    variant = "" if spec.sanitizer == "none" else f"-{spec.sanitizer}"
    out_dir = cache_root() / "build" / f"{spec.name}{variant}-{key}"
    output = out_dir / f"{spec.name}{variant}{suffix}"
    if output.is_file():
        return output
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if output.is_file():  # another worker built it while we waited
            return output
        tmp = out_dir / f".{output.name}.{os.getpid()}.tmp"
        cmd = spec.command(tmp, cc)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BuildError(f"compiler timed out after 300 s: {' '.join(cmd)}") from exc
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BuildError(
                f"build of {spec.name} failed (exit {proc.returncode})",
                where=spec.sources[0],
                details=f"command: {' '.join(cmd)}\n{_tail(proc.stderr)}",
                hint="fix the compile error above"
                + ("" if spec.cc else "; set CC to choose another compiler"),
            )
        tmp.rename(output)
    return output


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
