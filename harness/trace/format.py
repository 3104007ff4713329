"""The binary layout of a trace file: the one source of the trace format.

The reader (:mod:`.reader`) uses it directly; the C shim's ``harness/shim/format.h`` and the
eBPF program's constants are generated from it (:mod:`.codegen`).

One traced process writes one file, ``trace.<pid>.<n>.bin`` in the trace folder (``n`` counts
execs of the same pid).  The file is a file-backed ``MAP_SHARED`` mapping, so whatever a thread
wrote survives a SIGSEGV or an abort of the target: the kernel keeps the dirty pages.

Layout (little-endian, sizes in bytes)::

    header            HEADER_SIZE
    chunk 0           CHUNK_HEADER_SIZE + chunk_records * RECORD_SIZE
    chunk 1 ...

A thread takes a whole chunk for itself (``next_chunk`` is an atomic counter in the header), so
the hot path takes no lock.  After filling a record it publishes it by storing the chunk's
``count`` with release order; the reader trusts only ``count`` records of each chunk.  A thread
that exits gives its chunks back (the shim keeps them on a spare stack) and the next thread to
need one appends after its last published record, so the file fills with records, not with
one chunk per thread ever started; ``tid`` in a chunk header names its latest owner.  When no
chunk is left, records are counted in ``lost_records`` instead of written: a trace with lost
records is incomplete and every report says so.

Sequence numbers come from one 64-bit atomic counter shared by every traced process of a run
(the 8-byte file ``seq.bin`` in the trace folder, mapped shared).  Each call takes one number at
entry and one at exit, so "A's exit < B's entry" proves A's syscall returned before B's began,
across threads and processes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MAGIC = b"ACTRACE1"
VERSION = 1
HEADER_SIZE = 4096
RECORD_SIZE = 64
CHUNK_HEADER_SIZE = RECORD_SIZE
SEQ_FILE = "seq.bin"
TRACE_GLOB = "trace.*.bin"
# What the shim sizes each process's file to (AFTERCLOSE_TRACE_MB, AFTERCLOSE_TRACE_CHUNK).
# The file is sparse: disk is used only for records written, so the size is a ceiling that a
# server answering tens of thousands of requests a second (several records each) should not
# reach within minutes: 2 GiB holds 33 million records.
DEFAULT_TRACE_MB = 2048
DEFAULT_CHUNK_RECORDS = 4096

# Field name and struct code of each layout, in order.  The C header of the shim
# (``harness/shim/format.h``) and the eBPF program's constants are generated from this module by
# :mod:`.codegen`; nothing else spells the layout out.
Fields = tuple[tuple[str, str], ...]

HEADER_FIELDS: Fields = (
    ("magic", "8s"),
    ("version", "I"),
    ("header_size", "I"),
    ("record_size", "I"),
    ("chunk_records", "I"),
    ("n_chunks", "I"),
    ("pid", "I"),
    ("ppid", "I"),
    ("flags", "I"),  # HeaderFlag
    ("next_chunk", "Q"),
    ("lost_records", "Q"),
    ("start_ns", "Q"),
    ("fork_seq", "Q"),  # seq_in of the parent's fork, 0 if none
    ("free_table_slots", "Q"),
    ("free_table_used", "Q"),
    ("exit_seq", "Q"),  # a sequence number taken as the process exited (HeaderFlag.EXITED), or 0
)
# ... then, at EXE_OFFSET, char exe[EXE_SIZE] (NUL-terminated), zeros up to HEADER_SIZE.
HEADER_STRUCT = struct.Struct("<" + "".join(code for _, code in HEADER_FIELDS))
EXE_OFFSET = 256
EXE_SIZE = 256

# Chunk header, then padding to CHUNK_HEADER_SIZE; ``count`` is the records committed.
CHUNK_HEADER_FIELDS: Fields = (("tid", "I"), ("pid", "I"), ("count", "Q"))
CHUNK_HEADER_STRUCT = struct.Struct("<" + "".join(code for _, code in CHUNK_HEADER_FIELDS))

RECORD_FIELDS: Fields = (
    ("seq_in", "Q"),
    ("seq_out", "Q"),
    ("t_ns", "Q"),
    ("tid", "I"),
    ("op", "H"),  # Op
    ("flags", "H"),  # kind | RecordFlag
    ("fd", "i"),
    ("arg", "i"),
    ("data", "Q"),
    ("events", "I"),
    ("err", "i"),
    ("ret", "q"),
)
RECORD_STRUCT = struct.Struct("<" + "".join(code for _, code in RECORD_FIELDS))
assert RECORD_STRUCT.size == RECORD_SIZE


def field_offset(fields: Fields, name: str) -> int:
    """Byte offset of ``name`` in a layout (little-endian, no padding: the C structs match)."""
    offset = 0
    for field_name, code in fields:
        if field_name == name:
            return offset
        offset += struct.calcsize("<" + code)
    raise KeyError(name)


class HeaderFlag(enum.IntFlag):
    FREE_TRACKING = 1  # free() of registered data values is recorded
    FREE_TABLE_FULL = 2  # the registered-data table filled up: some frees were not recognised
    CRASHED = 4  # the shim saw a fatal signal (set from its handler, best effort)
    # The process exited (exit(), _exit(), the eBPF tracer's sched_process_exit of its last
    # thread) at ``exit_seq``: the kernel closed every fd it still held then.
    EXITED = 8


class RecordFlag(enum.IntFlag):
    """Bits of a record's ``flags`` above its kind (AcceptKind, DupKind, WaitKind, IoKind, ...)."""

    # The shim injected this result (harness/syscall_faults.py): ret/err are what the target
    # saw, so the rules judge it like a real one; on SHUTDOWN, the shim's own call, never judged
    # as the server's.  See the Op table for the ops it marks.
    INJECTED = 0x8000


_KIND_MASK = 0xFFFF & ~RecordFlag.INJECTED.value


class Op(enum.IntEnum):
    """What a record describes.  Field use per op (unused fields are 0):

    ============  ======================================================================
    SOCKET        ret = new fd
    ACCEPT        fd = listening fd, ret = new fd; flags = AcceptKind
    CLOSE         fd
    SHUTDOWN      fd, arg = how
    DUP           fd = old fd, arg = requested new fd (-1 for dup), ret = new fd;
                  flags = DupKind.  dup2/dup3 silently close ``arg`` first when it was open.
    EPOLL_CREATE  ret = epoll fd
    EPOLL_CTL     fd = target fd, arg = epoll fd, flags = EPOLL_CTL_ADD/DEL/MOD (1/2/3),
                  events = requested mask, data = requested data
    EPOLL_WAIT    fd = epoll fd, arg = maxevents, ret = number of events; flags = WaitKind.
                  Followed by ``ret`` EPOLL_EVENT records with the same seq_in/seq_out.
    EPOLL_EVENT   fd = epoll fd, arg = index in the returned array, events, data
    READ          fd, ret (bytes or -1), err; flags = IoKind
    WRITE         fd, ret, err; flags = IoKind (sendfile: fd = out fd)
    FORK          ret = child pid (in the parent's file)
    FREE          data = pointer; only for pointers that were ever epoll data
    FDNEW         ret = new fd from a creator the model does not otherwise know
                  (open, pipe, socketpair, eventfd, timerfd, signalfd, memfd, inotify)
    CLOSE_RANGE   fd = first, data = last (u64, may be ~0), arg = flags
    ============  ======================================================================

    ``flags`` | :attr:`RecordFlag.INJECTED` (0x8000) marks a result the shim injected
    (syscall faults): ACCEPT (err EMFILE/ECONNABORTED, nothing accepted), EPOLL_WAIT (err
    EINTR, no wait, no events), READ (err EAGAIN, nothing read), WRITE (err ECONNRESET with
    nothing written, err EPIPE from the kernel after the shim shut the socket down, or a short
    write: ret = what the kernel moved of a shortened request, data = the byte count the caller
    asked for).  Use :attr:`Record.kind` for the flags without it.  The shim never injects EBADF.
    On those records the call is the server's and the result the harness's choice.

    SHUTDOWN | INJECTED (arg = SHUT_RDWR) is the harness's own call: the shutdown the shim makes
    before an injected ECONNRESET/EPIPE, recorded on the server thread inside that write's
    seq_in..seq_out.  Timelines mark it and the model never judges it as the server's.
    """

    SOCKET = 1
    ACCEPT = 2
    CLOSE = 3
    SHUTDOWN = 4
    DUP = 5
    EPOLL_CREATE = 6
    EPOLL_CTL = 7
    EPOLL_WAIT = 8
    EPOLL_EVENT = 9
    READ = 10
    WRITE = 11
    FORK = 12
    FREE = 13
    FDNEW = 14
    CLOSE_RANGE = 15


class AcceptKind(enum.IntEnum):
    ACCEPT = 0
    ACCEPT4 = 4


class DupKind(enum.IntEnum):
    DUP = 0
    DUP2 = 1
    DUP3 = 2
    FCNTL_DUPFD = 3
    FCNTL_DUPFD_CLOEXEC = 4


class WaitKind(enum.IntEnum):
    EPOLL_WAIT = 0
    EPOLL_PWAIT = 1
    EPOLL_PWAIT2 = 2


class IoKind(enum.IntEnum):
    READ = 0
    READV = 1
    RECV = 2
    RECVFROM = 3
    RECVMSG = 4
    WRITE = 0x10
    WRITEV = 0x11
    SEND = 0x12
    SENDTO = 0x13
    SENDMSG = 0x14
    SENDFILE = 0x15


EPOLL_CTL_ADD = 1
EPOLL_CTL_DEL = 2
EPOLL_CTL_MOD = 3

EPOLLIN = 0x001
EPOLLPRI = 0x002
EPOLLOUT = 0x004
EPOLLERR = 0x008
EPOLLHUP = 0x010
EPOLLRDHUP = 0x2000
EPOLLEXCLUSIVE = 1 << 28
EPOLLWAKEUP = 1 << 29
EPOLLONESHOT = 1 << 30
EPOLLET = 1 << 31

EPOLL_EVENT_NAMES = {
    EPOLLIN: "IN",
    EPOLLPRI: "PRI",
    EPOLLOUT: "OUT",
    EPOLLERR: "ERR",
    EPOLLHUP: "HUP",
    EPOLLRDHUP: "RDHUP",
    EPOLLEXCLUSIVE: "EXCLUSIVE",
    EPOLLWAKEUP: "WAKEUP",
    EPOLLONESHOT: "ONESHOT",
    EPOLLET: "ET",
}


def epoll_events_str(mask: int) -> str:
    names = [name for bit, name in EPOLL_EVENT_NAMES.items() if mask & bit]
    rest = mask & ~sum(EPOLL_EVENT_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


@dataclass(frozen=True, slots=True)
class Record:
    """One decoded record; ``pid`` comes from the file it was read from."""

    pid: int
    seq_in: int
    seq_out: int
    t_ns: int
    tid: int
    op: Op
    flags: int
    fd: int
    arg: int
    data: int
    events: int
    err: int
    ret: int

    @property
    def ok(self) -> bool:
        return self.ret >= 0

    @property
    def injected(self) -> bool:
        """The harness injected this: a syscall fault's result, or (SHUTDOWN) its own call."""
        return bool(self.flags & RecordFlag.INJECTED)

    @property
    def kind(self) -> int:
        """``flags`` without :class:`RecordFlag` bits: the Accept/Dup/Wait/IoKind or ctl op."""
        return self.flags & _KIND_MASK


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    record_size: int
    chunk_records: int
    n_chunks: int
    pid: int
    ppid: int
    flags: HeaderFlag
    next_chunk: int
    lost_records: int
    start_ns: int
    fork_seq: int
    free_table_slots: int
    free_table_used: int
    exe: str
    exit_seq: int = 0


_HEADER_NAMES = tuple(name for name, _ in HEADER_FIELDS)
# The fields of Header that the struct holds as they are (flags is a number there, exe is not
# in the struct).
_HEADER_KEPT = tuple(f.name for f in fields(Header) if f.name not in ("flags", "exe"))


def header_values(raw: bytes) -> dict[str, Any]:
    """The header fields at the start of ``raw``, by name (unchecked)."""
    return dict(zip(_HEADER_NAMES, HEADER_STRUCT.unpack_from(raw, 0), strict=True))


def header_of(raw: bytes, values: Mapping[str, Any]) -> Header:
    """The :class:`Header` at the start of ``raw``, whose :func:`header_values` were checked."""
    exe = raw[EXE_OFFSET : EXE_OFFSET + EXE_SIZE].split(b"\0", 1)[0]
    return Header(
        **{name: values[name] for name in _HEADER_KEPT},
        flags=HeaderFlag(values["flags"]),
        exe=exe.decode("utf-8", errors="replace"),
    )


def header_bytes(header: Header) -> bytes:
    """The HEADER_SIZE bytes that hold ``header``: this format's magic and header size, the
    fields, then ``exe`` (cut to EXE_SIZE - 1 bytes) at EXE_OFFSET."""
    values = {name: getattr(header, name) for name in _HEADER_KEPT}
    values.update(magic=MAGIC, header_size=HEADER_SIZE, flags=int(header.flags))
    out = bytearray(HEADER_SIZE)
    HEADER_STRUCT.pack_into(out, 0, *(values[name] for name in _HEADER_NAMES))
    exe = header.exe.encode("utf-8", errors="replace")[: EXE_SIZE - 1]
    out[EXE_OFFSET : EXE_OFFSET + len(exe)] = exe
    return bytes(out)
