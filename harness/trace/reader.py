"""Read the trace files the LD_PRELOAD shim wrote (layout: :mod:`.format`).

A trace folder holds one ``trace.<pid>.<n>.bin`` per traced process image.  Each file is read
with ``pread`` chunk by chunk rather than mapped: a file is gigabytes of mostly holes, only the
chunks below ``next_chunk`` hold anything, and a mapping would turn a file shrunk under our feet
into a SIGBUS of the harness instead of an error.
"""

from __future__ import annotations

import gc
import os
import re
import stat
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path

from afterclose.harness.errors import TraceError
from afterclose.harness.trace.format import (
    CHUNK_HEADER_SIZE,
    CHUNK_HEADER_STRUCT,
    HEADER_SIZE,
    MAGIC,
    RECORD_FIELDS,
    RECORD_SIZE,
    RECORD_STRUCT,
    TRACE_GLOB,
    VERSION,
    Header,
    HeaderFlag,
    Op,
    Record,
    header_of,
    header_values,
)

__all__ = [
    "ProcessTrace",
    "Trace",
    "TraceError",
    "read_trace_dir",
    "read_trace_file",
    "read_trace_files",
]

_OPS: dict[int, Op] = {int(op): op for op in Op}
_NAME_RE = re.compile(r"^trace\.(\d+)\.(\d+)\.bin$")
_BY_SEQ_OUT = attrgetter("seq_out")

# Record is a frozen slots dataclass: its __init__ sets each of 13 fields through
# object.__setattr__, which costs several microseconds a record.  Filling the slots through
# their member descriptors builds the very same object about three times faster.  Used only
# while Record keeps that shape (pid, then the wire fields in RECORD_STRUCT order).
_RECORD_FIELDS = ("pid", *(name for name, _ in RECORD_FIELDS))
_FAST_RECORDS = tuple(f.name for f in fields(Record)) == _RECORD_FIELDS and all(
    isinstance(Record.__dict__.get(name), types.MemberDescriptorType) for name in _RECORD_FIELDS
)


def _make_decoder() -> Callable[[bytes, int, list[Record]], None]:
    """Return ``decode(body, pid, out)`` appending one Record per 64-byte record in body."""
    ops = _OPS
    unpack = RECORD_STRUCT.iter_unpack
    if not _FAST_RECORDS:

        def decode_slow(body: bytes, pid: int, out: list[Record]) -> None:
            append = out.append
            for si, so, t, tid, op, fl, fd, arg, data, ev, err, ret in unpack(body):
                append(Record(pid, si, so, t, tid, ops[op], fl, fd, arg, data, ev, err, ret))

        return decode_slow

    new = object.__new__
    (s_pid, s_si, s_so, s_t, s_tid, s_op, s_fl, s_fd, s_arg, s_data, s_ev, s_err, s_ret) = (
        Record.__dict__[name].__set__ for name in _RECORD_FIELDS
    )

    def decode_fast(body: bytes, pid: int, out: list[Record]) -> None:
        append = out.append
        for si, so, t, tid, op, fl, fd, arg, data, ev, err, ret in unpack(body):
            r = new(Record)
            s_pid(r, pid)
            s_si(r, si)
            s_so(r, so)
            s_t(r, t)
            s_tid(r, tid)
            s_op(r, ops[op])
            s_fl(r, fl)
            s_fd(r, fd)
            s_arg(r, arg)
            s_data(r, data)
            s_ev(r, ev)
            s_err(r, err)
            s_ret(r, ret)
            append(r)

    return decode_fast


_decode = _make_decoder()


@contextmanager
def _gc_paused() -> Iterator[None]:
    # A million new tracked objects would run the cyclic collector over and over, each pass
    # walking the ever-growing list; none of them can be in a cycle.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class ProcessTrace:
    """The records of one process image, sorted by (seq_out, seq_in).

    An EPOLL_WAIT and its EPOLL_EVENT records share both numbers; the sort is stable and the shim
    writes them in order, so the events follow their wait, by index.
    """

    header: Header
    path: Path
    records: tuple[Record, ...]
    lost_records: int

    @property
    def pid(self) -> int:
        return self.header.pid

    @property
    def crashed(self) -> bool:
        return bool(self.header.flags & HeaderFlag.CRASHED)

    @property
    def complete(self) -> bool:
        return self.lost_records == 0


@dataclass(frozen=True)
class Trace:
    """Every process of a run; ``records`` merges them all by seq_out."""

    processes: tuple[ProcessTrace, ...]
    records: tuple[Record, ...]
    lost_records: int
    complete: bool
    warnings: tuple[str, ...]


class _HeaderNeverWritten(TraceError):
    """The file exists but its creator died before writing the magic (a few microseconds)."""


def _parse_header(raw: bytes, path: Path, size: int) -> Header:
    if size == 0:
        # Between the shim's O_EXCL create and its ftruncate: a process that died there, or
        # one still starting while we read.
        raise _HeaderNeverWritten(
            "empty trace file: the process died (or was still starting) while creating it",
            where=path,
        )
    if len(raw) < HEADER_SIZE:
        raise TraceError(
            f"truncated trace: {size} bytes, smaller than the {HEADER_SIZE}-byte header",
            where=path,
        )
    values = header_values(raw)
    magic, version = values["magic"], values["version"]
    header_size, record_size = values["header_size"], values["record_size"]
    chunk_records, n_chunks = values["chunk_records"], values["n_chunks"]
    if magic != MAGIC:
        if magic == b"\0" * len(MAGIC):
            raise _HeaderNeverWritten(
                "trace header never written: the process died while creating its trace",
                where=path,
            )
        raise TraceError(
            f"not an afterclose trace: magic {magic!r}, expected {MAGIC!r}",
            where=path,
            hint="only trace.<pid>.<n>.bin files written by the afterclose shim belong here",
        )
    if version != VERSION:
        raise TraceError(
            f"trace format version {version}, this reader understands version {VERSION}",
            where=path,
            hint="rebuild the shim and rerun: the shim and the reader come from one checkout",
        )
    if header_size != HEADER_SIZE or record_size != RECORD_SIZE:
        raise TraceError(
            f"header says header_size={header_size} record_size={record_size}, "
            f"expected {HEADER_SIZE} and {RECORD_SIZE}",
            where=path,
        )
    if chunk_records == 0 or n_chunks == 0:
        raise TraceError(
            f"corrupt header: chunk_records={chunk_records} n_chunks={n_chunks}", where=path
        )
    return header_of(raw, values)


def read_trace_file(path: Path) -> ProcessTrace:
    """Decode one trace file; a truncated or foreign file raises :class:`TraceError`."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TraceError(f"cannot open trace file: {exc.strerror}", where=path) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TraceError(
                f"not a regular file ({_file_kind(info.st_mode)}): a trace is a file the "
                "tracer wrote",
                where=path,
            )
        size = info.st_size
        header = _parse_header(os.pread(fd, HEADER_SIZE, 0), path, size)
        chunk_bytes = CHUNK_HEADER_SIZE + header.chunk_records * RECORD_SIZE
        expected = HEADER_SIZE + header.n_chunks * chunk_bytes
        if size < expected:
            raise TraceError(
                f"truncated trace: {size} bytes, its header promises {expected} "
                f"({header.n_chunks} chunks of {header.chunk_records} records)",
                where=path,
            )
        # Threads that raced for the last chunk push next_chunk past n_chunks.
        used_chunks = min(header.next_chunk, header.n_chunks)
        with _gc_paused():
            records = _read_chunks(fd, path, header, used_chunks, chunk_bytes)
            records.sort(key=_BY_SEQ_OUT)
    except OSError as exc:
        raise TraceError(f"cannot read trace file: {exc.strerror}", where=path) from exc
    finally:
        os.close(fd)
    return ProcessTrace(
        header=header, path=path, records=tuple(records), lost_records=header.lost_records
    )


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "not a file"


def _read_chunks(
    fd: int, path: Path, header: Header, used_chunks: int, chunk_bytes: int
) -> list[Record]:
    pid = header.pid
    records: list[Record] = []
    for index in range(used_chunks):
        offset = HEADER_SIZE + index * chunk_bytes
        chunk_head = os.pread(fd, CHUNK_HEADER_STRUCT.size, offset)
        if len(chunk_head) < CHUNK_HEADER_STRUCT.size:
            raise TraceError(f"truncated trace: chunk {index} is cut short", where=path)
        _tid, chunk_pid, count = CHUNK_HEADER_STRUCT.unpack(chunk_head)
        if count == 0:
            continue  # taken by a thread that was lost before it committed anything
        if count > header.chunk_records:
            raise TraceError(
                f"corrupt trace: chunk {index} claims {count} records, "
                f"more than chunk_records={header.chunk_records}",
                where=path,
            )
        if chunk_pid != pid:
            raise TraceError(
                f"corrupt trace: chunk {index} belongs to pid {chunk_pid}, the file to pid {pid}",
                where=path,
            )
        want = count * RECORD_SIZE
        body = os.pread(fd, want, offset + CHUNK_HEADER_SIZE)
        if len(body) < want:
            raise TraceError(f"truncated trace: chunk {index} is cut short", where=path)
        try:
            _decode(body, pid, records)
        except KeyError as exc:
            raise TraceError(
                f"corrupt trace: chunk {index} holds a record with unknown op {exc.args[0]}",
                where=path,
            ) from None
    return records


def _sort_key(path: Path) -> tuple[int, int, str]:
    m = _NAME_RE.match(path.name)
    if m is None:
        return (1 << 62, 0, path.name)
    return (int(m.group(1)), int(m.group(2)), path.name)


def read_trace_dir(path: Path) -> Trace:
    """Read every ``trace.*.bin`` of a folder and merge them into one :class:`Trace`."""
    path = Path(path)
    if not path.is_dir():
        raise TraceError(
            "trace folder not found",
            where=path,
            hint="the tracer writes here only when the target ran with the shim preloaded",
        )
    return read_trace_files(path.glob(TRACE_GLOB))


def read_trace_files(paths: Iterable[Path], *, skip_bad: bool = False) -> Trace:
    """Read the given trace files (one, or a folder's worth) and merge them into one
    :class:`Trace`, with the same warnings :func:`read_trace_dir` gives.

    ``skip_bad``: a file that is not a readable trace is left out, named in a warning (the
    trace is then incomplete), instead of failing the whole read."""
    processes: list[ProcessTrace] = []
    warnings: list[str] = []
    unreadable = 0
    for file in sorted((Path(p) for p in paths), key=_sort_key):
        try:
            proc = read_trace_file(file)
        except _HeaderNeverWritten:
            unreadable += 1
            warnings.append(
                f"{file.name}: header never written (the process died while creating its "
                "trace); the trace is incomplete"
            )
            continue
        except TraceError as exc:
            if not skip_bad:
                raise
            unreadable += 1
            warnings.append(f"{file.name}: left out, {exc.message}; the trace is incomplete")
            continue
        processes.append(proc)
        name = file.name
        flags = proc.header.flags
        if proc.lost_records:
            warnings.append(
                f"{name}: {proc.lost_records} records lost (buffer full); the trace is "
                "incomplete (raise AFTERCLOSE_TRACE_MB)"
            )
        if flags & HeaderFlag.FREE_TABLE_FULL:
            warnings.append(
                f"{name}: free() tracking table full: frees of some epoll data pointers "
                "were not recorded"
            )
        if flags & HeaderFlag.CRASHED:
            warnings.append(
                f"{name}: process {proc.pid} died of a fatal signal; its records up to the "
                "crash are kept"
            )
    merged: list[Record] = []
    for proc in processes:
        merged.extend(proc.records)
    # Timsort merges the per-process runs; stable, so events stay behind their wait.
    with _gc_paused():
        merged.sort(key=_BY_SEQ_OUT)
    lost = sum(p.lost_records for p in processes)
    return Trace(
        processes=tuple(processes),
        records=tuple(merged),
        lost_records=lost,
        complete=lost == 0 and unreadable == 0,
        warnings=tuple(warnings),
    )
