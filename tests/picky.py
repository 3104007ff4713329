"""Manifests for tests/servers/picky.c: correct servers that do not fit afterclose's first
assumptions (small answers, keep-alive only when asked) and an idle timer, buggy or not."""

from __future__ import annotations

from pathlib import Path

from paths import TESTS_DIR

PICKY = TESTS_DIR / "servers" / "picky.c"


def picky_manifest(
    folder: Path, mode: str, *extra: str, idle_timeout_s: float | None = None
) -> Path:
    """A manifest for picky in ``mode`` (``extra``: more top-level manifest lines).  With
    ``idle_timeout_s`` the server's idle timer gets it; the manifest declares it only if an
    ``extra`` line says so."""
    args = ["{build}", "{host}", "{port}", mode]
    if idle_timeout_s is not None:
        args.append(f"{idle_timeout_s:g}")
    command = ", ".join(f'"{a}"' for a in args)
    path = folder / f"picky-{mode}.toml"
    lines = [
        f'name = "picky-{mode}"',
        f"command = [{command}]",
        "fd_grace_s = 1.0",
        *extra,
        "[compile]",
        f'sources = ["{PICKY}"]',
        'cflags = ["-O2", "-Wall"]',
        "[ready]",
        'log = "READY"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
