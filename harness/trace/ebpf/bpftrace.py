"""Running bpftrace: whether it can run here, starting it attached, stopping it once."""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from afterclose.harness.errors import AftercloseError
from afterclose.harness.orphans import spawn_tied
from afterclose.harness.trace.ebpf.program import program_text

__all__ = [
    "ENV_ALL_IO",
    "ENV_BPFTRACE",
    "ENV_MAP_KEYS",
    "ENV_RING_PAGES",
    "BpftraceRun",
    "bpftrace_path",
    "ensure_tracefs",
    "unavailable",
]

ENV_RING_PAGES = "BPFTRACE_PERF_RB_PAGES"
ENV_MAP_KEYS = "BPFTRACE_MAP_KEYS_MAX"
ENV_BPFTRACE = "AFTERCLOSE_BPFTRACE"  # the bpftrace binary to run (default: the one on PATH)
ENV_ALL_IO = "AFTERCLOSE_EBPF_ALL_IO"  # 1: print every read/write (no de-duplication)
DEFAULT_RING_PAGES = 1024  # per CPU; the default (64) loses events under a storm
DEFAULT_MAP_KEYS = 16384  # one key per traced process and per thread in a syscall
ATTACH_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0  # for bpftrace to write out what it read before it stopped printing
EXIT_TIMEOUT_S = 10.0  # for it to exit after SIGINT
NUDGE_S = 0.5  # a bpftrace not gone this long after SIGINT is nudged (see stop())
OUTPUT_NAME = "bpftrace.out"
LOG_NAME = "bpftrace.log"
PROGRAM_NAME = "afterclose.bt"
_MEMLOCK_NOISE = "ERROR: Unknown error -1: couldn't set RLIMIT_MEMLOCK"


# -- can it run here -------------------------------------------------------------------------


def bpftrace_path() -> str | None:
    explicit = os.environ.get(ENV_BPFTRACE)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("bpftrace")


def unavailable() -> tuple[str, str] | None:
    """Why the eBPF tracer cannot run on this machine, as (what is missing, hint); None if it
    can.  Cheap and without side effects (tracefs is mounted, if need be, at start)."""
    machine = platform.machine()
    if machine != "x86_64":
        return (
            f"the eBPF tracer supports x86_64 only (this machine is {machine}): it decodes "
            "syscall numbers and argument registers of that ABI",
            "use --tracer=preload for dynamically linked targets",
        )
    if os.geteuid() != 0:
        return (
            "the eBPF tracer needs root (bpftrace loads BPF programs and attaches to "
            "kernel tracepoints)",
            "run the tests as root (sudo), or use --tracer=preload for dynamically linked targets",
        )
    if bpftrace_path() is None:
        return (
            "the eBPF tracer needs bpftrace, which is not installed (not found on PATH)",
            "install it (Debian/Ubuntu: apt-get install bpftrace, as scripts/setup-system "
            "does), or use --tracer=preload for dynamically linked targets",
        )
    return None


def _tracefs_events() -> Path | None:
    for base in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        events = Path(base) / "events"
        if (events / "raw_syscalls").is_dir():
            return events
    return None


def ensure_tracefs() -> None:
    """Mount tracefs when it is not (bpftrace finds tracepoints there); root only."""
    if _tracefs_events() is not None:
        return
    mount = shutil.which("mount") or "/bin/mount"
    attempts = (
        [mount, "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
        [mount, "-t", "debugfs", "nodev", "/sys/kernel/debug"],
    )
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if _tracefs_events() is not None:
            return
        errors.append(f"$ {' '.join(cmd)}: {(proc.stderr or proc.stdout).strip() or 'failed'}")
    raise AftercloseError(
        "the eBPF tracer needs tracefs (the kernel's tracepoint list), which is not mounted "
        "and could not be mounted",
        details="\n".join(errors),
        hint="mount it (mount -t tracefs nodev /sys/kernel/tracing); in a container, run it "
        "privileged with /sys/kernel/tracing available",
    )


_RUNNING: set[BpftraceRun] = set()
_RUNNING_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _RUNNING_LOCK:
        runs = list(_RUNNING)
    for run in runs:
        run.stop()


atexit.register(_stop_all_at_exit)


class BpftraceRun:
    """One bpftrace process: started attached (``begin_ns`` known), stopped once."""

    def __init__(
        self,
        folder: Path,
        pids: Sequence[int],
        env: Mapping[str, str] | None = None,
        *,
        dedup_io: bool | None = None,
    ) -> None:
        exe = bpftrace_path()
        if exe is None:
            missing = unavailable()
            raise AftercloseError(
                missing[0] if missing else "bpftrace not found",
                hint=missing[1] if missing else None,
            )
        ensure_tracefs()
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.program = folder / PROGRAM_NAME
        self.output = folder / OUTPUT_NAME
        self.log = folder / LOG_NAME
        full_env = dict(os.environ)
        full_env.setdefault(ENV_RING_PAGES, str(DEFAULT_RING_PAGES))
        full_env.setdefault(ENV_MAP_KEYS, str(DEFAULT_MAP_KEYS))
        full_env.update(env or {})
        if dedup_io is None:
            dedup_io = full_env.get(ENV_ALL_IO, "") not in ("1", "yes", "true")
        self.dedup_io = dedup_io
        # The stop handshake's token: another run's handshake does not stop this one.
        self.token = secrets.randbits(62) | 1
        self.program.write_text(program_text(pids, dedup_io=dedup_io, stop_token=self.token))
        self.pids = list(pids)
        self.ring_pages = full_env[ENV_RING_PAGES]
        self.begin_ns = 0
        self.stop_s = 0.0  # how long stop() took
        self.returncode: int | None = None
        self._lock = threading.Lock()
        # -B full: one write(2) per buffer, not per line; the program pads its "B" line out of
        # the buffer for the attach handshake, and bpftrace flushes the rest when it exits.
        cmd = [exe, "-B", "full", str(self.program)]
        with self.output.open("wb") as out, self.log.open("wb") as err:
            try:
                self.proc: subprocess.Popen[bytes] | None = spawn_tied(
                    cmd, out, err, env=full_env, cwd=folder
                )
            except OSError as exc:
                raise AftercloseError(
                    f"cannot run bpftrace ({exe}): {exc.strerror}",
                    hint="check the bpftrace installation, or use --tracer=preload",
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
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(ln for ln in lines if not ln.startswith(_MEMLOCK_NOISE))

    def _wait_attached(self) -> int:
        """bpftrace runs BEGIN once every probe is attached; it prints ``B <ns>``."""
        assert self.proc is not None
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        delay = 0.01
        while True:
            with self.output.open("rb") as f:
                head = f.read(4096)
            m = re.search(rb"^B (\d+)$", head, re.MULTILINE)
            if m is not None:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise AftercloseError(
                    f"bpftrace exited with status {self.proc.returncode} before attaching",
                    details=f"--- {self.log}\n{self.log_text()[-3000:]}",
                    hint="run the program by hand to see the error: bpftrace " + str(self.program),
                )
            if time.monotonic() > deadline:
                raise AftercloseError(
                    f"bpftrace did not attach within {ATTACH_TIMEOUT_S:.0f} s",
                    details=f"--- {self.log}\n{self.log_text()[-3000:]}",
                    hint="the machine may be overloaded (bpftrace compiles its program with "
                    "LLVM at start)",
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def stop(self) -> int | None:
        """Stop printing, let bpftrace write out what it read, SIGINT it (its buffers are
        drained), SIGKILL it if it cannot; idempotent.  See "Stopping" in the program's
        header for why SIGINT alone loses events."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return self.returncode
            t = time.monotonic()
            if proc.poll() is None:
                self._halt(proc)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                self._wait_exit(proc)
            self.returncode = proc.returncode
            self.stop_s = time.monotonic() - t
            self.proc = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        return self.returncode

    def _handshake(self, step: int) -> None:
        """lseek(-1, token, step): 0 stops the program printing records, 1 makes it print a
        nudge.  EBADF, always: the probe sees the call's arguments, the kernel does nothing."""
        with contextlib.suppress(OSError):
            os.lseek(-1, self.token, step)

    def _halt(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop the program printing and wait until bpftrace has written its "S" line out:
        it has then read what was printed before (or was busy, and the wait times out)."""
        try:
            offset = self.output.stat().st_size
        except OSError:
            return
        self._handshake(0)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        carry = b""
        delay = 0.005
        while proc.poll() is None and time.monotonic() < deadline:
            with self.output.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            text = carry + chunk
            if re.search(rb"(?:^|\n)S \d+\n", text):
                return
            carry = text[-64:]
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def _wait_exit(self, proc: subprocess.Popen[bytes]) -> None:
        # A SIGINT bpftrace received outside epoll_wait is acted on at its next event only:
        # the nudge is that event.
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while True:
            try:
                proc.wait(min(NUDGE_S, max(deadline - time.monotonic(), 0.0)))
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    break
                self._handshake(1)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
