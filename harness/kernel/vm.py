"""Boot a kernel under qemu with the host's root shared read-only, run one command, power off.

The guest sees the host's files at the same paths (9p, under a tmpfs overlay: writes stay in
the guest), and a read-write ``results`` folder at ``/run/afterclose-results`` through which
the command's argv goes in and its results come out.  It has no network card: only its own
loopback.

KVM is used when it can boot a kernel; a nested or restricted ``/dev/kvm`` may exist and still
fail (qemu aborts on an MSR write, or the guest hangs), so ``accel="auto"`` probes once per
host and caches the answer, and falls back to software emulation (TCG).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from afterclose.harness import compile as cbuild
from afterclose.harness.kernel import initramfs
from afterclose.harness.kernel.fetch import Kernel, KernelError
from afterclose.harness.orphans import spawn_tied

GUEST_RESULTS = "/run/afterclose-results"
KVM_PROBE_TIMEOUT_S = 20.0
ACCELS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class GuestRun:
    kernel: Kernel
    accel: str
    results: Path
    console: Path
    status: int | None  # the command's wait status, None if it never finished
    elapsed_s: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.status == 0

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def describe(self) -> str:
        how = f"kernel {self.kernel.release} ({self.kernel.source.describe()}), qemu {self.accel}"
        if self.timed_out:
            return f"{how}: stopped after {self.elapsed_s:.0f} s (time limit)"
        if self.status is None:
            return f"{how}: the guest ended before its command finished"
        return f"{how}: command ended with wait status {self.status} in {self.elapsed_s:.0f} s"


def qemu_binary() -> str:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        raise KernelError(
            "qemu-system-x86_64 not found: the kernel runner boots kernels under qemu",
            hint="apt-get install -y --no-install-recommends qemu-system-x86",
        )
    return exe


def _command(
    kernel: Kernel, initrd: Path, results: Path, console: Path, accel: str, cpus: int, mem_mb: int
) -> list[str]:
    # Under TCG, "max" offers the newest instructions qemu emulates, so host binaries built
    # for this CPU still run; under KVM, "host" passes the real CPU through.
    cpu = ["-cpu", "host"] if accel == "kvm" else ["-cpu", "max"]
    accel_opt = "kvm" if accel == "kvm" else "tcg,thread=multi"
    return [
        qemu_binary(),
        "-accel", accel_opt, *cpu,
        "-smp", str(cpus), "-m", str(mem_mb),
        "-kernel", str(kernel.image), "-initrd", str(initrd),
        # panic=-1: if PID 1 dies the kernel reboots at once, and -no-reboot turns that into
        # qemu exiting, so a broken guest never hangs the test run.
        "-append", "console=ttyS0 panic=-1 loglevel=4 rdinit=/init",
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}",
        "-no-reboot", "-nic", "none",
        # multidevs=remap: "/" spans several host file systems whose inode numbers collide.
        "-virtfs", "local,path=/,mount_tag=host0,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
    ]  # fmt: skip


def run(
    kernel: Kernel,
    argv: list[str],
    results: Path,
    *,
    timeout_s: float,
    accel: str = "auto",
    cpus: int = 2,
    mem_mb: int = 2048,
) -> GuestRun:
    """Boot ``kernel``, run ``argv`` (host paths) in the guest, wait for it to power off."""
    initrd = initramfs.build(kernel)
    chosen = _pick_accel(kernel, initrd, accel)
    return _boot(kernel, initrd, argv, results, timeout_s, chosen, cpus, mem_mb)


def _boot(
    kernel: Kernel,
    initrd: Path,
    argv: list[str],
    results: Path,
    timeout_s: float,
    accel: str,
    cpus: int,
    mem_mb: int,
) -> GuestRun:
    results.mkdir(parents=True, exist_ok=True)
    (results / "init.status").unlink(missing_ok=True)
    (results / "init.argv").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    console = results / "console.log"
    cmd = _command(kernel, initrd, results, console, accel, cpus, mem_mb)
    (results / "qemu.cmd").write_text(" ".join(cmd) + "\n")
    started = time.monotonic()
    timed_out = False
    with (results / "qemu.log").open("wb") as log:
        proc = spawn_tied(cmd, log, log)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - started
    status = None
    with contextlib.suppress(OSError, ValueError):
        status = int((results / "init.status").read_text().strip())
    return GuestRun(kernel, accel, results, console, status, elapsed, timed_out)


def _pick_accel(kernel: Kernel, initrd: Path, accel: str) -> str:
    if accel not in ACCELS:
        raise KernelError(f"unknown accelerator {accel!r}", hint=f"use one of {', '.join(ACCELS)}")
    if accel != "auto":
        return accel
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    probe_file = cbuild.cache_root() / "kernels" / "kvm-probe.json"
    probe_file.parent.mkdir(parents=True, exist_ok=True)
    key = f"{os.uname().release} {qemu_binary()} {os.stat(qemu_binary()).st_mtime_ns}"
    with probe_file.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers probe once between them
        try:
            cached = json.loads(probe_file.read_text())
            if cached.get("key") == key:
                return str(cached["accel"])
        except (OSError, ValueError):
            pass
        with tempfile.TemporaryDirectory(dir=probe_file.parent) as tmp:
            probe = _boot(
                kernel, initrd, ["/bin/true"], Path(tmp), KVM_PROBE_TIMEOUT_S, "kvm", 1, 256
            )
        chosen = "kvm" if probe.ok else "tcg"
        probe_file.write_text(json.dumps({"key": key, "accel": chosen, "probe": probe.describe()}))
    return chosen
