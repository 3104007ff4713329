"""Which targets need the eBPF tracer: those whose syscalls the shim cannot see (a static or
Go binary)."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

from afterclose.harness.manifest import Manifest

__all__ = ["elf_kind", "prefers_ebpf"]

_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3
_GO_BUILDINFO = b"\xff Go buildinf:"
_GO_BUILD = re.compile(r"(^|[\s;&|(])go\s+build\b")  # "go build" inside a shell command


def elf_kind(path: Path) -> str:
    """``"dynamic"`` (an ELF with an interpreter: LD_PRELOAD works), ``"static"`` (an ELF
    without one), ``"go"`` (a Go program: raw syscalls, whatever its linking) or ``"other"``
    (a script or an unreadable file)."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != _ELF_MAGIC or head[4] != 2:  # ELFCLASS64 only
                return "other"
            little = head[5] == 1
            end = "<" if little else ">"
            phoff = struct.unpack_from(end + "Q", head, 32)[0]
            phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            interp = any(
                struct.unpack_from(end + "I", table, i * phentsize)[0] == _PT_INTERP
                for i in range(phnum)
                if (i + 1) * phentsize <= len(table)
            )
            f.seek(0)
            # Go writes its build info near the start of the data segment: look in 32 MiB.
            window = f.read(32 << 20)
    except OSError:
        return "other"
    if _GO_BUILDINFO in window:
        return "go"
    return "dynamic" if interp else "static"


def _program_of(manifest: Manifest) -> Path | None:
    first = manifest.command[0]
    if "{" in first:
        return None
    if "/" in first:
        path = Path(first)
        return path if path.is_absolute() else (manifest.folder / path).resolve()
    found = shutil.which(first)
    return Path(found) if found else None


def prefers_ebpf(manifest: Manifest) -> bool:
    """Whether the shim cannot see this target's syscalls: a static or Go binary.

    A ``[compile]`` target is static when its ldflags say ``-static``; a program that exists
    is inspected (ELF interpreter, Go build info); one a build step makes is taken to be a Go
    program when that step runs ``go``.  Anything else (scripts, dynamic ELF) is preloadable.
    """
    if manifest.compile is not None:
        return "-static" in manifest.compile.ldflags
    program = _program_of(manifest)
    if program is not None and program.is_file():
        return elf_kind(program) in ("static", "go")
    build = manifest.build or ()
    return any(Path(a).name == "go" or _GO_BUILD.search(a) for a in build)
