"""Turn a manifest into a launch plan: build the target, render its command, add the tracer."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from afterclose.harness import compile as cbuild
from afterclose.harness.errors import BuildError
from afterclose.harness.manifest import Manifest
from afterclose.harness.runners.base import LaunchPlan

BUILD_TIMEOUT_S = 600
SANITIZER_ENV = {
    # Leak reports at exit would read as a crash of a target we merely stopped.
    "address": ("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0"),
    "undefined": ("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"),
    "thread": ("TSAN_OPTIONS", "halt_on_error=0"),
}


def build_target(manifest: Manifest, sanitizer: str, run_id: str) -> Path | None:
    """Run the manifest's build step once per test run and return the ``{build}`` artefact."""
    if manifest.build is not None:
        _run_build_command(manifest, run_id)
    if manifest.compile is None:
        return None
    spec = manifest.compile
    return cbuild.build(
        cbuild.CBuild(
            name=manifest.name,
            sources=spec.sources,
            cflags=spec.cflags,
            ldflags=spec.ldflags,
            sanitizer=sanitizer,
        )
    )


def _run_build_command(manifest: Manifest, run_id: str) -> None:
    assert manifest.build is not None
    key = hashlib.sha256(f"{manifest.path}\n{manifest.build}".encode()).hexdigest()[:16]
    stamp_dir = cbuild.cache_root() / "stamps"
    stamp_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp_dir / f"{manifest.name}-{key}"
    # xdist workers share one run id: the first one builds, the others wait on the lock and
    # then find the stamp.  The build tool's own incremental logic decides what to rebuild.
    with (stamp_dir / f"{manifest.name}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == run_id:
            return
        cmd = list(manifest.build)
        log = stamp_dir / f"{manifest.name}-{key}.log"
        try:
            with log.open("wb") as out:
                proc = subprocess.run(
                    cmd,
                    cwd=manifest.folder,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=BUILD_TIMEOUT_S,
                    check=False,
                )
        except FileNotFoundError:
            raise BuildError(
                f"build command not found: {cmd[0]!r}",
                where=f"{manifest.path}: key 'build'",
                hint="the build command runs in the manifest's folder; install the tool or fix "
                "the command",
            ) from None
        except subprocess.TimeoutExpired:
            raise BuildError(
                f"build did not finish within {BUILD_TIMEOUT_S} s: {shlex.join(cmd)}",
                where=f"{manifest.path}: key 'build'",
            ) from None
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise BuildError(
                f"build failed with exit status {proc.returncode}: {shlex.join(cmd)}",
                where=f"{manifest.path}: key 'build'",
                details=f"--- build output (last 30 lines): {log}\n{tail}",
                hint=f"run `{shlex.join(cmd)}` in {manifest.folder} to see the full error",
            )
        stamp.write_text(run_id)


def make_plan(
    manifest: Manifest,
    *,
    host: str,
    port: int,
    workdir: Path,
    artefact: Path | None,
    sanitizer: str = "none",
    trace_dir: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> LaunchPlan:
    workdir.mkdir(parents=True, exist_ok=True)
    values = {
        "host": host,
        "port": str(port),
        "build": str(artefact) if artefact else "",
        "workdir": str(workdir),
        "manifest_dir": str(manifest.folder),
        # The interpreter running the harness: Python targets then run in the same virtual
        # environment whether or not it is activated.
        "python": sys.executable,
        "tls_cert": "",
        "tls_key": "",
    }
    if manifest.tls:
        from afterclose.harness.protocols import tls

        cert, key = tls.certificate_in(workdir)
        values.update(tls_cert=str(cert), tls_key=str(key))
    argv = [
        manifest.render(part, values, f"command[{i}]") for i, part in enumerate(manifest.command)
    ]
    first = argv[0]
    if "/" in first and not os.path.isabs(first):
        # Relative program paths are relative to the manifest, not to where pytest runs.
        argv[0] = str((manifest.folder / first).resolve())
    env = {key: manifest.render(v, values, f"env.{key}") for key, v in manifest.env.items()}
    for name, template in manifest.files.items():
        (workdir / name).write_text(manifest.render(template, values, f"files.{name!r}"))
    if sanitizer in SANITIZER_ENV and manifest.compile is not None:
        var, value = SANITIZER_ENV[sanitizer]
        env[var] = ":".join(filter(None, (os.environ.get(var), value)))
    env.update(extra_env or {})
    env.setdefault("AFTERCLOSE_HOST", host)
    env.setdefault("AFTERCLOSE_PORT", str(port))
    return LaunchPlan(
        manifest=manifest,
        argv=tuple(argv),
        env=env,
        cwd=manifest.folder,
        workdir=workdir,
        host=host,
        port=port,
        trace_dir=trace_dir,
        binaries=tuple(p for p in (artefact,) if p is not None),
    )
