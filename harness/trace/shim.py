"""Build the LD_PRELOAD shim and describe the environment that makes a target traced.

The shim is one library built from the C files of ``harness/shim/`` (their parts: ``shim.h``;
the trace layout ``format.h`` is generated from :mod:`.format` by :mod:`.codegen` before every
build).  It writes the files that :mod:`.reader` reads.  Environment it understands:

``AFTERCLOSE_TRACE_DIR``       folder for ``seq.bin`` and ``trace.<pid>.<n>.bin`` (required to
                              trace; unset, the shim only perturbs when asked to below, else it
                              passes everything through and says so on stderr)
``AFTERCLOSE_TRACE_MB``        size of each process's trace file in MiB (sparse; default
                              :data:`.format.DEFAULT_TRACE_MB`)
``AFTERCLOSE_TRACE_CHUNK``     records per chunk (default :data:`.format.DEFAULT_CHUNK_RECORDS`;
                              small values for tests)
``AFTERCLOSE_FREE_TRACKING``   ``0`` stops recording free() of epoll data pointers
``AFTERCLOSE_CRASH_HANDLER``   ``0`` stops the shim installing its SIGSEGV/SIGABRT/... marker
``AFTERCLOSE_SYSCALL_FAULTS``  syscall faults, encoded by
                              :func:`afterclose.harness.syscall_faults.to_env` (which validates
                              the ``@pytest.mark.syscall_faults`` spec)
``AFTERCLOSE_CHAOS``           schedule perturbation: a level ``0``-``10``
                              (:func:`afterclose.harness.syscall_faults.chaos_env`)
``AFTERCLOSE_FAULT_SEED``      u64 seed of both (default 0)

A malformed value of the last three makes the shim print one line on stderr and leave that
perturbation off; tracing is not affected.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from afterclose.harness import compile as cbuild
from afterclose.harness.errors import BuildError, TraceError
from afterclose.harness.trace import codegen
from afterclose.harness.trace.format import (
    CHUNK_HEADER_FIELDS,
    CHUNK_HEADER_SIZE,
    CHUNK_HEADER_STRUCT,
    HEADER_FIELDS,
    HEADER_SIZE,
    HEADER_STRUCT,
    RECORD_SIZE,
    SEQ_FILE,
    field_offset,
)

__all__ = [
    "SHIM_SOURCES",
    "asan_runtime_path",
    "preload_env",
    "read_seq",
    "shim_env",
    "shim_path",
]

SHIM_DIR = Path(__file__).resolve().parent.parent / "shim"
# The library's name: the built file is ``<SHIM_NAME>[-sanitizer].so`` (a traced process maps it).
SHIM_NAME = "afterclose_shim"
# Every C file of the folder is a part of the one library.
SHIM_SOURCES = tuple(sorted(SHIM_DIR.glob("*.c")))
CFLAGS = ("-O2", "-fPIC", "-pthread", "-Wall", "-Wextra")
LDFLAGS = ("-ldl", "-pthread")


def shim_path(sanitizer: str = "none") -> Path:
    """Build (once, cached) and return the shim ``.so``.

    Use the plain shim (``"none"``) for every target, sanitized ones included: an instrumented
    shim would itself need the sanitizer runtime preloaded first, also in uninstrumented
    children of the target.
    """
    codegen.ensure_shim_header()
    # The key covers every source and header: any change to a part rebuilds the library.
    headers = tuple(sorted(SHIM_DIR.glob("*.h")))
    return cbuild.build(
        cbuild.CBuild(
            name=SHIM_NAME,
            sources=SHIM_SOURCES,
            cflags=CFLAGS,
            ldflags=LDFLAGS,
            kind="shared",
            sanitizer=sanitizer,
        ),
        extra_deps=headers,
    )


@cache
def asan_runtime_path() -> Path:
    """The compiler's ``libasan.so``, which must come first in LD_PRELOAD of an ASan target.

    ASan checks at start-up that its runtime is the first object in the initial library list
    and aborts otherwise ("ASan runtime does not come first"); an LD_PRELOAD shim comes before
    the executable's own DT_NEEDED entries, so the runtime has to be preloaded ahead of it.
    """
    cc = cbuild.compiler()
    try:
        out = subprocess.run(
            [cc, "-print-file-name=libasan.so"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot ask {cc} for libasan.so: {exc}") from exc
    name = out.stdout.strip()
    # gcc prints the bare name back when it does not know the file.
    path = Path(name)
    if out.returncode != 0 or not path.is_absolute() or not path.exists():
        raise BuildError(
            f"{cc} does not know libasan.so (answered {name!r})",
            hint="install the ASan runtime (apt-get install -y libasan8) or set CC",
        )
    return path.resolve()


def _split_preload(value: str) -> list[str]:
    # ld.so accepts spaces and colons as separators.
    return [p for p in value.replace(":", " ").split() if p]


def preload_env(
    *,
    asan_runtime: bool = False,
    sanitizer: str = "none",
    base_env: Mapping[str, str] | None = None,
    extra_preload: str = "",
) -> dict[str, str]:
    """Just ``LD_PRELOAD`` with the shim last: what :func:`shim_env` sets, without a trace folder.

    A shim loaded this way traces nothing; with ``AFTERCLOSE_SYSCALL_FAULTS`` or
    ``AFTERCLOSE_CHAOS`` set it still perturbs the target (quietly), which is how syscall faults
    and chaos work with ``--tracer=off``.
    """
    base = os.environ if base_env is None else base_env
    preload: list[str] = []
    if asan_runtime:
        preload.append(str(asan_runtime_path()))
    for source in (base.get("LD_PRELOAD", ""), extra_preload):
        for item in _split_preload(source):
            if item not in preload:
                preload.append(item)
    shim = str(shim_path(sanitizer))
    if shim in preload:
        preload.remove(shim)
    preload.append(shim)
    # ld.so splits on colons and spaces alike; build-cache paths are likelier to hold a space
    # (a home folder) than a colon.
    return {"LD_PRELOAD": ":".join(preload)}


def shim_env(
    trace_dir: Path,
    *,
    free_tracking: bool = True,
    extra: dict[str, str] | None = None,
    asan_runtime: bool = False,
    sanitizer: str = "none",
    trace_mb: int | None = None,
    chunk_records: int | None = None,
    base_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment variables to add to a target's environment to trace it into ``trace_dir``.

    An LD_PRELOAD already in ``base_env`` (default: this process's environment) or in ``extra``
    is kept, before the shim.  With ``asan_runtime`` the ASan runtime goes first of all.
    """
    extra = dict(extra or {})
    env = {
        **preload_env(
            asan_runtime=asan_runtime,
            sanitizer=sanitizer,
            base_env=base_env,
            extra_preload=extra.pop("LD_PRELOAD", ""),
        ),
        "AFTERCLOSE_TRACE_DIR": str(Path(trace_dir).resolve()),
        "AFTERCLOSE_FREE_TRACKING": "1" if free_tracking else "0",
    }
    if trace_mb is not None:
        env["AFTERCLOSE_TRACE_MB"] = str(int(trace_mb))
    if chunk_records is not None:
        env["AFTERCLOSE_TRACE_CHUNK"] = str(int(chunk_records))
    env.update(extra)
    return env


def read_seq(trace_dir: Path) -> int:
    """The shared sequence counter now: every call that starts later gets a larger seq_in.

    ``seq.bin`` is a ``MAP_SHARED`` mapping in the targets; a plain read goes through the same
    page cache, so it sees their latest increments.  0 when no traced process has started yet.
    """
    path = Path(trace_dir) / SEQ_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(8)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise TraceError(f"cannot read the sequence counter: {exc.strerror}", where=path) from exc
    if len(raw) < 8:
        return 0  # created but not yet sized by the first traced process
    value: int = struct.unpack("<Q", raw)[0]
    return value


def relabel_pid(trace_dir: Path, inner_pid: int, host_pid: int) -> list[Path]:
    """Give a dead process's trace files its host PID instead of its PID-namespace one.

    A restarted container's first process is PID 1 again, and its trace files would be read
    as an exec of the old PID 1: one process whose fds came back from nowhere.  Relabelled
    with the old process's host PID (header, every chunk, the file name), the old incarnation
    stays a process of its own.  Only for files of processes known to be dead."""
    header_pid_at = field_offset(HEADER_FIELDS, "pid")
    chunk_pid_at = field_offset(CHUNK_HEADER_FIELDS, "pid")
    moved: list[Path] = []
    for path in sorted(trace_dir.glob(f"trace.{inner_pid}.*.bin")):
        with path.open("r+b") as f:
            fields = HEADER_STRUCT.unpack(f.read(HEADER_STRUCT.size))
            chunk_records, n_chunks, pid, next_chunk = fields[4], fields[5], fields[6], fields[9]
            if pid != inner_pid:
                continue
            f.seek(header_pid_at)
            f.write(struct.pack("<I", host_pid))
            chunk_bytes = CHUNK_HEADER_SIZE + chunk_records * RECORD_SIZE
            for index in range(min(n_chunks, next_chunk)):
                offset = HEADER_SIZE + index * chunk_bytes
                f.seek(offset)
                head = f.read(CHUNK_HEADER_STRUCT.size)
                if len(head) < CHUNK_HEADER_STRUCT.size:
                    break
                _tid, chunk_pid, count = CHUNK_HEADER_STRUCT.unpack(head)
                if count and chunk_pid == inner_pid:
                    f.seek(offset + chunk_pid_at)
                    f.write(struct.pack("<I", host_pid))
        n = int(path.name.split(".")[2])
        target = trace_dir / f"trace.{host_pid}.{n}.bin"
        while target.exists():
            n += 1
            target = trace_dir / f"trace.{host_pid}.{n}.bin"
        path.rename(target)
        moved.append(target)
    return moved
