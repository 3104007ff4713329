"""The eBPF back-end: trace a running process tree with bpftrace, from outside.

The LD_PRELOAD shim sees only what goes through libc's dynamic symbols.  A statically linked
server, a Go server (raw syscalls), libc's own internal closes, ``syscall(SYS_close, ...)``,
``close_range`` and ``dup2`` behind the library's back are all invisible to it, and all visible
to the kernel's syscall tracepoints.  This module runs ``afterclose.bt`` (next to this file)
on the target's host PIDs and turns what it prints into the very same :class:`Record` stream the
shim writes, one standard ``trace.<pid>.0.bin`` per process, so the model, every rule, the
timelines and ``afterclose trace show`` work unchanged.

Sequence numbers
    The shim takes seq_in/seq_out from one atomic counter shared by every traced process.
    bpftrace 0.17 has no global atomic counter a program can read back (``count()`` is
    per-CPU and ``@x++`` on a map is a non-atomic load/add/store), so the eBPF back-end uses
    ``bpf_ktime_get_ns()`` instead: seq_in is CLOCK_MONOTONIC read in the ``sys_enter``
    tracepoint, before the syscall body runs, and seq_out is read in ``sys_exit``, after it
    returned.  What the rules need is "A's seq_out < B's seq_in proves A's effect happened
    before B's", across CPUs.  That holds when the clock is consistent across CPUs to better
    than the distance between the time stamp and the effect it brackets (hundreds of
    nanoseconds: the tracepoint, the BPF program and its map operations run between them).
    The kernel keeps the ``tsc`` clocksource only if the TSCs are synchronised (else it falls
    back to a global clocksource), and ``ktime_get_mono_fast_ns`` may read a few nanoseconds
    early across a timekeeping update; both are far inside that margin.  Equal time stamps
    prove nothing (the rules use strict comparisons), and ``AFTERCLOSE_EBPF_GUARD_NS`` widens
    every interval by that many nanoseconds on each side for machines whose clock one trusts
    less (a virtual machine with an unstable TSC, say).  The cut-off is
    ``time.monotonic_ns()`` of the harness: the same clock.

Attaching late
    The target is already running (and ready) when tracing attaches, so its listening socket,
    its epoll instances and their registrations exist before the first record.  After attach
    the tracer reads ``/proc/PID/fd`` and ``/proc/PID/fdinfo/<epfd>`` (its ``tfd: N events: E
    data: D ... ino: I`` lines) and writes synthetic SOCKET / FDNEW / EPOLL_CREATE / DUP /
    EPOLL_CTL(ADD) records just before the first real one, so events of registrations made
    before attach map to the right connection.  An fd number that a traced call created,
    closed or replaced before the scan finished is not seeded (its state at attach time is not
    known): it is of unknown origin, which no rule ever reports on.  A call already in the
    kernel when tracing attached (an ``epoll_wait`` blocked in the loop thread, typically) has
    no entry record and is not printed.

Which processes
    The pids the runner reports (host PID namespace, so a container's processes too), and
    every child they fork afterwards (``sched_process_fork`` adds it before it can run; a
    thread is no child).  A FORK record in the parent copies its table to the child's, as
    with the shim.

Cost
    Every traced call costs the target two BPF programs and, for each printed line, a
    perf-buffer write and a wake-up of bpftrace, which formats the line in user space.  The
    program therefore prints a repeated read/write (same thread, same fd, same epoll batch,
    no fd change in the process since) and a MOD that re-sets a registration's own data only
    once (``AFTERCLOSE_EBPF_ALL_IO=1`` prints them all; see ``afterclose.bt``).  The perf
    buffer is ``BPFTRACE_PERF_RB_PAGES`` pages per CPU (1024 unless set); events it drops are
    counted from bpftrace's "Lost N events" lines and every report says the trace is
    incomplete.

What it does not see: ``free()`` (the two free rules are not checked; every report says so),
io_uring, fds passed over unix sockets (SCM_RIGHTS: the receiver's ``recvmsg`` creates fds
the model does not learn about; they are of unknown origin), and execve's close-on-exec sweep.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from afterclose.harness import procfs
from afterclose.harness.errors import AftercloseError, TraceError
from afterclose.harness.manifest import Manifest
from afterclose.harness.orphans import die_with_parent
from afterclose.harness.runners.base import RunningTarget
from afterclose.harness.trace.format import (
    CHUNK_HEADER_SIZE,
    CHUNK_HEADER_STRUCT,
    EPOLL_CTL_ADD,
    EXE_OFFSET,
    EXE_SIZE,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    RECORD_SIZE,
    RECORD_STRUCT,
    VERSION,
    DupKind,
    Op,
)
from afterclose.harness.tracers import TraceOutcome, TracerSession

__all__ = [
    "BT_SOURCE",
    "BpftraceRun",
    "EbpfTracer",
    "ParsedOutput",
    "ProcSnapshot",
    "build_trace_files",
    "elf_kind",
    "parse_output",
    "prefers_ebpf",
    "program_text",
    "scan_process",
    "unavailable",
]

BT_SOURCE = Path(__file__).resolve().parent / "afterclose.bt"
SEED_MARK = "/*@SEED@*/"
DEDUP_MARK = "/*@DEDUP_IO@*/"
ENV_RING_PAGES = "BPFTRACE_PERF_RB_PAGES"
ENV_MAP_KEYS = "BPFTRACE_MAP_KEYS_MAX"
ENV_GUARD_NS = "AFTERCLOSE_EBPF_GUARD_NS"
ENV_BPFTRACE = "AFTERCLOSE_BPFTRACE"  # the bpftrace binary to run (default: the one on PATH)
ENV_ALL_IO = "AFTERCLOSE_EBPF_ALL_IO"  # 1: print every read/write (no de-duplication)
DEFAULT_RING_PAGES = 1024  # per CPU; the default (64) loses events under a storm
DEFAULT_MAP_KEYS = 16384  # one key per traced process and per thread in a syscall
ATTACH_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
OUTPUT_NAME = "bpftrace.out"
LOG_NAME = "bpftrace.log"
PROGRAM_NAME = "afterclose.bt"
EINTR = 4
# Kernel-internal "restart the call" results a tracepoint can see (ERESTARTSYS, ERESTARTNOINTR,
# ERESTARTNOHAND, ERESTART_RESTARTBLOCK): the caller sees EINTR or the call runs again.
_RESTART = {512, 513, 514, 516}
_LOST_RE = re.compile(rb"^Lost (\d+) events")
_NOISE = (b"Attaching ", b"ERROR: Unknown error -1: couldn't set RLIMIT_MEMLOCK")

# Raw record: op, pid, tid, seq_in, seq_out, flags, fd, arg, data, events, ret (kernel result).
RawRecord = tuple[int, int, int, int, int, int, int, int, int, int, int]


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


# -- the program -----------------------------------------------------------------------------


def program_text(pids: Iterable[int], source: Path = BT_SOURCE, *, dedup_io: bool = True) -> str:
    """``afterclose.bt`` with the traced pids seeded into its BEGIN block and its I/O
    de-duplication switched on or off (see the program's header)."""
    text = source.read_text()
    if SEED_MARK not in text:
        raise TraceError(f"the eBPF program has no {SEED_MARK} placeholder", where=source)
    seeds = " ".join(f"@t[{int(p)}] = 1;" for p in sorted(set(pids)))
    if DEDUP_MARK not in text:
        raise TraceError(f"the eBPF program has no {DEDUP_MARK} placeholder", where=source)
    return text.replace(SEED_MARK, seeds).replace(DEDUP_MARK, "1" if dedup_io else "0")


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
        self.program.write_text(program_text(pids, dedup_io=dedup_io))
        self.pids = list(pids)
        self.ring_pages = full_env[ENV_RING_PAGES]
        self.begin_ns = 0
        self.returncode: int | None = None
        self._lock = threading.Lock()
        # -B none: every line reaches the file when printed (the attach handshake reads it).
        cmd = [exe, "-B", "none", str(self.program)]
        with self.output.open("wb") as out, self.log.open("wb") as err:
            try:
                self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=full_env,
                    cwd=folder,
                    start_new_session=True,  # a Ctrl-C of the harness must not stop it early
                    preexec_fn=die_with_parent,
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
        return "\n".join(ln for ln in lines if not ln.startswith(_NOISE[1].decode()))

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
        """SIGINT (bpftrace drains its buffers and exits), then SIGKILL; idempotent."""
        with self._lock:
            proc = self.proc
            if proc is None:
                return self.returncode
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
            self.proc = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        return self.returncode


# -- /proc snapshots -------------------------------------------------------------------------


@dataclass
class Registration:
    tfd: int
    events: int
    data: int
    ino: int


@dataclass
class ProcSnapshot:
    """A process's fd table and epoll interest lists as /proc showed them after attach."""

    pid: int
    ppid: int
    exe: str
    start_ns: int  # monotonic ns when the scan began
    end_ns: int  # ... and when it finished
    links: dict[int, str] = field(default_factory=dict)  # fd -> readlink of /proc/PID/fd/N
    inodes: dict[int, int] = field(default_factory=dict)  # fd -> inode number
    epoll: dict[int, list[Registration]] = field(default_factory=dict)  # epfd -> its items


def scan_process(pid: int) -> ProcSnapshot | None:
    """Read ``/proc/PID/fd`` and each epoll fd's ``fdinfo``; None if the process is gone."""
    start = time.monotonic_ns()
    ppid = procfs.parent_pid(pid)
    exe = procfs.exe(pid)
    links = procfs.fd_links(pid)
    if ppid is None or links is None:
        return None
    snap = ProcSnapshot(pid, ppid, exe, start, start)
    for fd, (link, ino) in links.items():
        snap.links[fd] = link
        snap.inodes[fd] = ino
        if link == "anon_inode:[eventpoll]":
            items = procfs.epoll_items(pid, fd)
            if items is None:
                continue
            snap.epoll[fd] = [Registration(*item) for item in items]
    snap.end_ns = time.monotonic_ns()
    return snap


# -- what bpftrace printed -------------------------------------------------------------------


@dataclass
class ParsedOutput:
    records: list[RawRecord] = field(default_factory=list)
    begin_ns: int = 0
    lost: int = 0
    truncated_waits: int = 0
    execs: list[tuple[int, int, int]] = field(default_factory=list)  # pid, tid, ns
    malformed: int = 0


def parse_output(path: Path) -> ParsedOutput:
    """Parse the lines of ``afterclose.bt`` (see its header); records keep their print order."""
    out = ParsedOutput()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"cannot read the eBPF trace: {exc.strerror}", where=path) from exc
    append = out.records.append
    for line in raw.split(b"\n"):
        if not line:
            continue
        c = line[0]
        if 0x30 <= c <= 0x39:  # a digit: a record
            parts = line.split()
            if len(parts) != 11:
                out.malformed += 1
                continue
            try:
                op, pid, tid, si, so, fl, fd, arg, data, ev, ret = map(int, parts)
            except ValueError:
                out.malformed += 1
                continue
            if op == Op.EPOLL_WAIT:
                # The wait line carries its first event (one perf-buffer write less).
                append((op, pid, tid, si, so, fl, fd, arg, 0, 0, ret))
                if ret > 0:
                    append((Op.EPOLL_EVENT, pid, tid, si, so, 0, fd, 0, data, ev, 0))
            else:
                append((op, pid, tid, si, so, fl, fd, arg, data, ev, ret))
        elif line.startswith(b"B "):
            out.begin_ns = int(line[2:])
        elif line.startswith(b"Lost "):
            m = _LOST_RE.match(line)
            if m is not None:
                out.lost += int(m.group(1))
        elif line.startswith(b"T "):
            out.truncated_waits += 1
        elif line.startswith(b"X "):
            parts = line.split()
            if len(parts) == 4:
                out.execs.append((int(parts[1]), int(parts[2]), int(parts[3])))
        elif not line.startswith(_NOISE[0]):
            out.malformed += 1
    return out


# -- records ---------------------------------------------------------------------------------

# Packed record fields, RECORD_STRUCT order:
#   seq_in, seq_out, t_ns, tid, op, flags, fd, arg, data, events, err, ret
Packed = tuple[int, int, int, int, int, int, int, int, int, int, int, int]

_CREATES = {Op.SOCKET, Op.ACCEPT, Op.EPOLL_CREATE, Op.FDNEW, Op.DUP}


def _changed_numbers(
    recs: Iterable[RawRecord], before: int
) -> tuple[set[int], list[tuple[int, int]]]:
    """fd numbers whose binding a traced call of one process changed (or may have changed)
    before ``before``: created, closed or replaced.  Returns (numbers, close_range spans)."""
    nums: set[int] = set()
    spans: list[tuple[int, int]] = []
    for op, _pid, _tid, si, _so, fl, fd, arg, data, _ev, ret in recs:
        if si >= before:
            continue
        if op in _CREATES and ret >= 0:
            nums.add(ret)
            if op == Op.DUP and fl in (DupKind.DUP2, DupKind.DUP3):
                nums.add(arg)
        elif op == Op.CLOSE:
            nums.add(fd)
        elif op == Op.CLOSE_RANGE:
            spans.append((fd, data))
    return nums, spans


def seed_records(snap: ProcSnapshot, recs: Sequence[RawRecord]) -> list[tuple[int, ...]]:
    """Synthetic records (op, flags, fd, arg, data, events, ret) that rebuild ``snap`` as of
    attach time, leaving out every number a traced call touched before the scan ended."""
    changed, spans = _changed_numbers(recs, snap.end_ns)
    ctl_seen = {(r[7], r[6]) for r in recs if r[0] == Op.EPOLL_CTL and r[3] < snap.end_ns}

    def untouched(fd: int) -> bool:
        return fd not in changed and not any(a <= fd <= b for a, b in spans)

    out: list[tuple[int, ...]] = []
    seeded: set[int] = set()
    first_of_socket: dict[int, int] = {}
    for fd in sorted(snap.links):
        if not untouched(fd):
            continue
        link = snap.links[fd]
        if link.startswith("socket:["):
            ino = snap.inodes[fd]
            src = first_of_socket.get(ino)
            if src is not None:
                # Two numbers for one socket: a dup made before attach (same open file).
                out.append((Op.DUP, DupKind.DUP, src, -1, 0, 0, fd))
            else:
                first_of_socket[ino] = fd
                out.append((Op.SOCKET, 0, 0, 0, 0, 0, fd))
        elif link == "anon_inode:[eventpoll]":
            out.append((Op.EPOLL_CREATE, 0, 0, 0, 0, 0, fd))
        else:
            out.append((Op.FDNEW, 0, 0, 0, 0, 0, fd))
        seeded.add(fd)
    for epfd in sorted(snap.epoll):
        if epfd not in seeded:
            continue
        for reg in snap.epoll[epfd]:
            tfd = reg.tfd
            # Only registrations of a number that still names the registered file: another
            # (closed, kept alive by a dup) would pin its events on a stranger.
            if tfd not in seeded or snap.inodes.get(tfd) != reg.ino or (epfd, tfd) in ctl_seen:
                continue
            out.append((Op.EPOLL_CTL, EPOLL_CTL_ADD, tfd, epfd, reg.data, reg.events, 0))
    return out


def _pack(r: RawRecord, guard: int) -> Packed:
    op, _pid, tid, si, so, fl, fd, arg, data, ev, ret = r
    err = 0
    if ret < 0 and op != Op.EPOLL_EVENT:
        err = -ret
        if err in _RESTART:
            err = EINTR
        ret = -1
    if guard:
        si = max(si - guard, 0)
        so = so + guard
    # Kernel values are printed from 64-bit registers: keep the fields in their C types.
    return (
        si,
        so,
        si,
        tid & 0xFFFFFFFF,
        op,
        fl & 0xFFFF,
        _i32(fd),
        _i32(arg),
        data & 0xFFFFFFFFFFFFFFFF,
        ev & 0xFFFFFFFF,
        err,
        ret,
    )


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


@dataclass
class BuiltTrace:
    files: list[Path]
    records: int
    seeded: int
    lost: int
    warnings: list[str]


def _write_trace_file(
    path: Path,
    pid: int,
    ppid: int,
    fork_seq: int,
    exe: str,
    start_ns: int,
    lost: int,
    packed: Sequence[Packed],
) -> None:
    n = len(packed)
    chunk_records = max(n, 1)
    header = HEADER_STRUCT.pack(
        MAGIC,
        VERSION,
        HEADER_SIZE,
        RECORD_SIZE,
        chunk_records,
        1,  # n_chunks
        pid,
        ppid,
        0,  # flags: no free() tracking
        1,  # next_chunk
        lost,
        start_ns,
        fork_seq,
        0,
        0,
    )
    head = bytearray(HEADER_SIZE)
    head[: len(header)] = header
    name = exe.encode("utf-8", errors="replace")[: EXE_SIZE - 1]
    head[EXE_OFFSET : EXE_OFFSET + len(name)] = name
    chunk_head = bytearray(CHUNK_HEADER_SIZE)
    chunk_head[: CHUNK_HEADER_STRUCT.size] = CHUNK_HEADER_STRUCT.pack(pid, pid, n)
    pack = RECORD_STRUCT.pack
    body = b"".join(pack(*p) for p in packed)
    if n == 0:
        body = bytes(RECORD_SIZE)
    with path.open("wb") as f:
        f.write(head)
        f.write(chunk_head)
        f.write(body)


def build_trace_files(
    parsed: ParsedOutput,
    snapshots: Sequence[ProcSnapshot],
    trace_dir: Path,
    guard_ns: int = 0,
) -> BuiltTrace:
    """Write one ``trace.<pid>.0.bin`` per traced process: the seed records first, then what
    bpftrace printed, in seq_out order (a wait's events right behind it)."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    # (seq_out, seq_in, tid, print order): one call's lines share the first three and were
    # printed in order by one program run on one CPU, so they stay together and in order.
    order = sorted(range(len(parsed.records)), key=lambda i: _key(parsed.records[i], i))
    by_pid: dict[int, list[RawRecord]] = {}
    for i in order:
        r = parsed.records[i]
        by_pid.setdefault(r[1], []).append(r)
    snaps = {s.pid: s for s in snapshots}
    first_in = min((r[3] for r in parsed.records), default=0)
    starts = (first_in, parsed.begin_ns, *(s.start_ns for s in snapshots))
    t0 = min((x for x in starts if x > 0), default=1 << 62)
    forks: dict[int, tuple[int, int]] = {}  # child -> (parent, fork seq_in)
    for r in parsed.records:
        if r[0] == Op.FORK and r[10] > 0:
            forks.setdefault(r[10], (r[1], r[3]))
    seeds: dict[int, list[tuple[int, ...]]] = {
        pid: seed_records(s, by_pid.get(pid, ())) for pid, s in snaps.items()
    }
    n_seeds = sum(len(v) for v in seeds.values())
    # Seeds take distinct numbers just below the first real one, in order.
    next_seed = t0 - n_seeds - 1 - 2 * guard_ns
    files: list[Path] = []
    total = 0
    main_pid = snapshots[0].pid if snapshots else (min(by_pid) if by_pid else 0)
    for pid in sorted(set(by_pid) | set(snaps)):
        snap = snaps.get(pid)
        packed: list[Packed] = []
        for op, fl, fd, arg, data, ev, ret in seeds.get(pid, ()):
            s = max(next_seed, 1)
            next_seed += 1
            packed.append((s, s, s, pid, op, fl, fd, arg, data, ev, 0, ret))
        packed.extend(_pack(r, guard_ns) for r in by_pid.get(pid, ()))
        total += len(packed)
        parent, fork_seq = forks.get(pid, (snap.ppid if snap else 0, 0))
        exe = snap.exe if snap else procfs.exe(pid)
        path = trace_dir / f"trace.{pid}.0.bin"
        _write_trace_file(
            path,
            pid,
            parent,
            fork_seq,
            exe,
            snap.start_ns if snap else fork_seq,
            parsed.lost if pid == main_pid else 0,
            packed,
        )
        files.append(path)
    warnings = []
    if parsed.truncated_waits:
        warnings.append(
            f"eBPF tracer: {parsed.truncated_waits} epoll_wait calls returned more than 256 "
            "events; only the first 256 of each were traced"
        )
    if parsed.malformed:
        warnings.append(f"eBPF tracer: {parsed.malformed} unreadable lines in bpftrace's output")
    if parsed.execs:
        warnings.append(
            f"eBPF tracer: {len(parsed.execs)} traced process(es) called execve; the fds it "
            "closed (close-on-exec) are not traced"
        )
    return BuiltTrace(files, total, n_seeds, parsed.lost, warnings)


def _key(r: RawRecord, i: int) -> tuple[int, int, int, int]:
    return (r[4], r[3], r[2], i)


def guard_ns_from_env() -> int:
    raw = os.environ.get(ENV_GUARD_NS, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise AftercloseError(
            f"{ENV_GUARD_NS}={raw!r} is not a whole number of nanoseconds",
            hint="unset it, or give e.g. 1000",
        ) from None
    if value < 0:
        raise AftercloseError(f"{ENV_GUARD_NS}={raw!r} must not be negative")
    return value


# -- which targets need it -------------------------------------------------------------------

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


# -- the tracer session ----------------------------------------------------------------------

WATCHDOG_GRACE_S = 60.0


class EbpfTracer(TracerSession):
    """``--tracer=ebpf``: bpftrace attached to the target's host PIDs after start."""

    name = "ebpf"

    def __init__(self, trace_dir: Path, env: Mapping[str, str] | None = None) -> None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        self.trace_dir = trace_dir
        self._folder = trace_dir
        self._env = dict(env or {})
        self.guard_ns = guard_ns_from_env()
        self._run: BpftraceRun | None = None
        self._snapshots: list[ProcSnapshot] = []
        self._done = threading.Event()
        self.attach_s = 0.0

    def started(self, target: RunningTarget) -> None:
        pids = target.host_pids()
        if not pids:
            raise AftercloseError(
                f"target {target.name!r} has no running process to trace",
                hint="it exited right after becoming ready; see its log",
            )
        t = time.monotonic()
        self._run = BpftraceRun(self._folder, pids, self._env)
        self.attach_s = time.monotonic() - t
        try:
            for pid in pids:
                snap = scan_process(pid)
                if snap is not None:
                    self._snapshots.append(snap)
        except BaseException:
            self._run.stop()
            raise
        run = self._run
        threading.Thread(
            target=self._watchdog, args=(target, run), name="afterclose-ebpf-watchdog", daemon=True
        ).start()

    def _watchdog(self, target: RunningTarget, run: BpftraceRun) -> None:
        # A run abandoned without analyse() (an error between start and finish): stop
        # bpftrace some time after the target is gone instead of tracing nothing forever.
        while not self._done.wait(1.0):
            if target.exit_status() is not None:
                if not self._done.wait(WATCHDOG_GRACE_S):
                    run.stop()
                return

    def cutoff(self) -> int | None:
        return time.monotonic_ns()

    def analyse(self, cutoff: int | None) -> TraceOutcome:
        from afterclose.harness.oracle import judge
        from afterclose.harness.trace import reader

        self._done.set()
        assert self.trace_dir is not None
        run = self._run
        if run is None:
            return TraceOutcome(
                warnings=["the eBPF tracer never attached: nothing was traced"],
                trace_dir=self.trace_dir,
            )
        status = run.stop()
        warnings: list[str] = []
        if status not in (0, None, -signal.SIGINT):
            warnings.append(
                f"bpftrace exited with status {status}; the trace may be incomplete "
                f"(log: {run.log})"
            )
        parsed = parse_output(run.output)
        built = build_trace_files(parsed, self._snapshots, self.trace_dir, self.guard_ns)
        if built.lost:
            warnings.append(
                f"eBPF tracer LOST {built.lost} EVENTS: bpftrace's perf buffer "
                f"({ENV_RING_PAGES}={run.ring_pages} pages per CPU) overflowed, so the trace "
                f"is incomplete and this verdict may be wrong; raise {ENV_RING_PAGES} or "
                "lower the load"
            )
        warnings.extend(built.warnings)
        trace = reader.read_trace_dir(self.trace_dir)
        # The reader's lost-records advice is the shim's (AFTERCLOSE_TRACE_MB): ours is above.
        kept = tuple(w for w in trace.warnings if "records lost (buffer full)" not in w)
        trace = dataclasses.replace(trace, warnings=(*warnings, *kept))
        if not trace.records:
            return TraceOutcome(
                warnings=[*trace.warnings, "the eBPF tracer saw no fd-lifecycle syscall"],
                trace_dir=self.trace_dir,
            )
        result = judge.judge_trace(trace, cutoff_seq=cutoff, trace_path=str(self.trace_dir))
        violations = list(result.violations)
        out_warnings = list(dict.fromkeys([*trace.warnings, *result.warnings]))
        if violations:
            from afterclose.harness.trace import svg

            try:
                written = svg.write_report(result, self.trace_dir.parent)
            except Exception as exc:  # the verdict matters more than its picture
                out_warnings.append(
                    f"could not draw the timelines in {self.trace_dir.parent}: {exc}"
                )
            else:
                by_name = {p.name: str(p) for p in written}
                for n, v in enumerate(violations):
                    picture = by_name.get(svg.report_name(v.rule))
                    if picture is not None:
                        violations[n] = dataclasses.replace(v, artifacts=(*v.artifacts, picture))
        stats = dataclasses.asdict(result.stats)
        stats.update(ebpf_lost=built.lost, ebpf_seeded=built.seeded)
        # The raw text is large and fully in the trace files now.
        with contextlib.suppress(OSError):
            run.output.unlink()
        return TraceOutcome(
            violations=violations, warnings=out_warnings, stats=stats, trace_dir=self.trace_dir
        )
