"""The eBPF tracer's two parts, built on first use (``c/tracer.bpf.c`` with clang, ``c/loader.c``
with the C compiler against libbpf), whether they can run here, and one run of the loader:
started attached, stopped once."""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from afterclose.harness import compile as cbuild
from afterclose.harness.errors import AftercloseError
from afterclose.harness.orphans import spawn_tied
from afterclose.harness.trace.codegen import ebpf_constants

__all__ = [
    "C_DIR",
    "ENV_ALL_IO",
    "ENV_MAP_KEYS",
    "ENV_RING_KB",
    "EbpfRun",
    "tracer_build",
    "unavailable",
]

C_DIR = Path(__file__).resolve().parent / "c"
ENV_RING_KB = "AFTERCLOSE_EBPF_RING_KB"  # the ring buffer, shared by all CPUs
ENV_MAP_KEYS = "AFTERCLOSE_EBPF_MAP_KEYS"  # entries of each hash map (threads, processes, fds)
ENV_ALL_IO = "AFTERCLOSE_EBPF_ALL_IO"  # 1: print every read/write (no de-duplication)
DEFAULT_RING_KB = 16384
DEFAULT_MAP_KEYS = 16384
ATTACH_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0  # for the loader to read out the ring buffer and exit after SIGINT
OUTPUT_NAME = "ebpf.out"
LOG_NAME = "ebpf.log"
BTF = Path("/sys/kernel/btf/vmlinux")
LIBBPF_HEADER = Path("/usr/include/bpf/libbpf.h")
_INSTALL_HINT = (
    "install clang and libbpf-dev (Debian/Ubuntu: apt-get install clang libbpf-dev, as "
    "scripts/setup-system does), or use --tracer=preload for dynamically linked targets"
)


# -- can it run here -------------------------------------------------------------------------


def unavailable() -> tuple[str, str] | None:
    """Why the eBPF tracer cannot run on this machine, as (what is missing, hint); None if it
    can.  Cheap and without side effects (the build happens at the first run)."""
    machine = platform.machine()
    if machine != "x86_64":
        return (
            f"the eBPF tracer supports x86_64 only (this machine is {machine}): it decodes "
            "syscall numbers and argument registers of that ABI",
            "use --tracer=preload for dynamically linked targets",
        )
    if os.geteuid() != 0:
        return (
            "the eBPF tracer needs root (it loads BPF programs and attaches them to kernel "
            "tracepoints)",
            "run the tests as root (sudo), or use --tracer=preload for dynamically linked targets",
        )
    if shutil.which("clang") is None:
        return (
            "the eBPF tracer needs clang to build its BPF program (not found on PATH)",
            _INSTALL_HINT,
        )
    if not LIBBPF_HEADER.is_file():
        return (
            f"the eBPF tracer needs libbpf's headers ({LIBBPF_HEADER} is missing)",
            _INSTALL_HINT,
        )
    if not BTF.is_file():
        return (
            f"the eBPF tracer needs the kernel's BTF ({BTF} is missing): this kernel was "
            "built without CONFIG_DEBUG_INFO_BTF",
            "use a kernel with BTF (Debian's have it), or --tracer=preload for dynamically "
            "linked targets",
        )
    return None


def tracer_build() -> tuple[Path, Path]:
    """Build (once, cached) and return the BPF object and the loader."""
    defines = tuple(f"-D{name}={value}" for name, value in ebpf_constants().items())
    include = f"/usr/include/{platform.machine()}-linux-gnu"  # asm/ for linux/bpf.h
    obj = cbuild.build(
        cbuild.CBuild(
            name="afterclose-tracer.bpf",
            sources=(C_DIR / "tracer.bpf.c",),
            cflags=(
                "-O2",
                "-g",
                "-target",
                "bpf",
                "-D__TARGET_ARCH_x86",
                f"-I{include}",
                "-Wall",
                *defines,
            ),
            kind="object",
            cc="clang",
        ),
    )
    loader = cbuild.build(
        cbuild.CBuild(
            name="afterclose-ebpf",
            sources=(C_DIR / "loader.c",),
            cflags=("-O2", "-Wall", "-Wextra"),
            ldflags=("-lbpf",),
        ),
    )
    return obj, loader


# -- one run ---------------------------------------------------------------------------------

_RUNNING: set[EbpfRun] = set()
_RUNNING_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _RUNNING_LOCK:
        runs = list(_RUNNING)
    for run in runs:
        run.stop()


atexit.register(_stop_all_at_exit)


def env_whole_number(env: Mapping[str, str], name: str, default: int, *, least: int) -> int:
    """The whole-number setting ``name`` from ``env``: ``default`` when unset or blank, an
    error naming it when it is not a whole number of at least ``least``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = least - 1
    if value < least:
        raise AftercloseError(
            f"{name}={raw!r} is not a whole number of at least {least}",
            hint=f"unset it for the default ({default}), or give a whole number",
        )
    return value


class EbpfRun:
    """One loader process tracing ``pids`` and their children: started attached
    (``begin_ns`` known), stopped once."""

    def __init__(
        self,
        folder: Path,
        pids: Sequence[int],
        env: Mapping[str, str] | None = None,
        *,
        dedup_io: bool | None = None,
    ) -> None:
        missing = unavailable()
        if missing is not None:
            raise AftercloseError(missing[0], hint=missing[1])
        full_env = {**os.environ, **(env or {})}
        self.ring_kb = env_whole_number(full_env, ENV_RING_KB, DEFAULT_RING_KB, least=1)
        map_keys = env_whole_number(full_env, ENV_MAP_KEYS, DEFAULT_MAP_KEYS, least=1)
        if dedup_io is None:
            dedup_io = full_env.get(ENV_ALL_IO, "") not in ("1", "yes", "true")
        self.dedup_io = dedup_io
        obj, loader = tracer_build()
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.output = folder / OUTPUT_NAME
        self.log = folder / LOG_NAME
        self.pids = list(pids)
        self.begin_ns = 0
        self.stop_s = 0.0  # how long stop() took
        self.returncode: int | None = None
        self._lock = threading.Lock()
        cmd = [str(loader), str(obj), "--ring-kb", str(self.ring_kb), "--map-keys", str(map_keys)]
        if not dedup_io:
            cmd.append("--all-io")
        cmd += [str(int(p)) for p in self.pids]
        with self.output.open("wb") as out, self.log.open("wb") as err:
            try:
                self.proc: subprocess.Popen[bytes] | None = spawn_tied(cmd, out, err, cwd=folder)
            except OSError as exc:
                raise AftercloseError(
                    f"cannot run the eBPF loader ({loader}): {exc.strerror}",
                    hint="delete the build cache (~/.cache/afterclose/build) to rebuild it",
                ) from None
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        try:
            self.begin_ns = self._wait_attached()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_attached(self) -> int:
        """The loader prints ``B <ns>`` once every probe is attached."""
        assert self.proc is not None
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        delay = 0.005
        while True:
            with self.output.open("rb") as f:
                head = f.read(64)
            m = re.match(rb"B (\d+)\n", head)
            if m is not None:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise AftercloseError(
                    f"the eBPF loader exited with status {self.proc.returncode} before attaching",
                    details=f"--- {self.log}\n{self.log_text()[-3000:]}",
                    hint="the kernel refused the program (the log above has its reason); "
                    "use --tracer=preload for dynamically linked targets",
                )
            if time.monotonic() > deadline:
                raise AftercloseError(
                    f"the eBPF loader did not attach within {ATTACH_TIMEOUT_S:.0f} s",
                    details=f"--- {self.log}\n{self.log_text()[-3000:]}",
                    hint="the machine may be overloaded",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def stop(self) -> int | None:
        """SIGINT: the loader stops the program printing, reads out the ring buffer, prints
        its counts and exits; SIGKILL if it does not within the timeout.  Idempotent."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return self.returncode
            t = time.monotonic()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(10)
            self.returncode = proc.returncode
            self.stop_s = time.monotonic() - t
            self.proc = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        return self.returncode
