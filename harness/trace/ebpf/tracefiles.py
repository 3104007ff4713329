"""The trace files of an eBPF run: one standard ``trace.<pid>.0.bin`` per traced process, the
seed records first, then what the eBPF loader printed, in the layout of
:mod:`afterclose.harness.trace.format`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from afterclose.harness import procfs
from afterclose.harness.trace.ebpf.output import ParsedOutput, RawRecord
from afterclose.harness.trace.ebpf.procscan import ProcSnapshot, seed_records
from afterclose.harness.trace.format import (
    CHUNK_HEADER_SIZE,
    CHUNK_HEADER_STRUCT,
    RECORD_SIZE,
    RECORD_STRUCT,
    VERSION,
    Header,
    HeaderFlag,
    Op,
    header_bytes,
)

__all__ = ["BuiltTrace", "build_trace_files"]

EINTR = 4
# Kernel-internal "restart the call" results a tracepoint can see (ERESTARTSYS, ERESTARTNOINTR,
# ERESTARTNOHAND, ERESTART_RESTARTBLOCK): the caller sees EINTR or the call runs again.
_RESTART = {512, 513, 514, 516}

# Packed record fields, RECORD_STRUCT order:
#   seq_in, seq_out, t_ns, tid, op, flags, fd, arg, data, events, err, ret
Packed = tuple[int, int, int, int, int, int, int, int, int, int, int, int]


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
    exit_seq: int = 0,
) -> None:
    n = len(packed)
    chunk_records = max(n, 1)
    head = header_bytes(
        Header(
            version=VERSION,
            record_size=RECORD_SIZE,
            chunk_records=chunk_records,
            n_chunks=1,
            pid=pid,
            ppid=ppid,
            flags=HeaderFlag.EXITED if exit_seq else HeaderFlag(0),  # no free() tracking
            next_chunk=1,
            lost_records=lost,
            start_ns=start_ns,
            fork_seq=fork_seq,
            free_table_slots=0,
            free_table_used=0,
            exe=exe,
            exit_seq=exit_seq,
        )
    )
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
    the loader printed, in seq_out order (a wait's events right behind it)."""
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
            parsed.exits.get(pid, 0),
        )
        files.append(path)
    # What the loader's output could not show, and how often.
    caveats = (
        (
            parsed.truncated_waits,
            "epoll_wait calls returned more than 256 events; only the first 256 of each were "
            "traced",
        ),
        (parsed.malformed, "unreadable lines in the loader's output"),
        (
            parsed.unmatched_repeats,
            "repeated epoll_wait calls whose first, printed, call is not in the output; they "
            "are not in the trace",
        ),
        (
            len(parsed.execs),
            "traced process(es) called execve; the fds it closed (close-on-exec) are not traced",
        ),
    )
    warnings = [f"eBPF tracer: {count} {text}" for count, text in caveats if count]
    return BuiltTrace(files, total, n_seeds, parsed.lost, warnings)


def _key(r: RawRecord, i: int) -> tuple[int, int, int, int]:
    return (r[4], r[3], r[2], i)
