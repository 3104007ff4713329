"""The manifest of ``tests/servers/misbehave.c`` in one of its modes, for tests that run it."""

from __future__ import annotations

from pathlib import Path

from paths import TESTS_DIR

MISBEHAVE = TESTS_DIR / "servers" / "misbehave.c"


def misbehave_manifest(folder: Path, mode: str) -> Path:
    """Write ``misbehave-MODE.toml`` into ``folder`` and return its path: the server built
    from source (with its timer thread: -pthread), ready once it prints READY."""
    manifest = folder / f"misbehave-{mode}.toml"
    manifest.write_text(
        f"""
name = "misbehave-{mode}"
command = ["{{build}}", "{{host}}", "{{port}}", "{mode}"]
echo_path = true
fd_grace_s = 1.0
[compile]
sources = ["{MISBEHAVE}"]
cflags = ["-O2", "-Wall", "-pthread"]
ldflags = ["-pthread"]
[ready]
log = "READY"
"""
    )
    return manifest
