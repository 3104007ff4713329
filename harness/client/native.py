"""The storm's compiled engine: the hot path of :func:`engine.run_storm` in C.

The plan is drawn in Python as always (the schedule is the plan); this module encodes it (one
8-byte record per connection), and each forked worker hands its share to ``ac_run()`` in a
small library built at first use from ``csrc/`` (like the tracer shim): non-blocking sockets on
one edge-triggered epoll instance, the rate and the concurrency cap of the asyncio engine, the
live counts in the same shared mapping, the stop flag obeyed.  The C side performs every
behaviour of the storm's mix step for step as :mod:`.behaviours` does, and counts what
:class:`~afterclose.harness.client.conn.Conn` counts; the evidence (unasked-for bytes,
cross-talk, dropped requests) comes back as raw events, which become the very observations
``Conn`` makes (the same functions build them).

It covers HTTP/1.1 (the built-in :class:`~afterclose.harness.protocols.http.Http`, with the
manifest's request headers) without TLS, and the actions of :mod:`.behaviours` that the storm
draws.  Anything else (another protocol, TLS, an action it does not know) runs on the asyncio
engine: :func:`prepare` says why, and ``connection_storm``'s ``engine`` parameter makes the
choice explicit (``auto``: native when it can; ``native``: an error when it cannot).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from afterclose.faults.base import FaultReport
from afterclose.harness import compile as cbuild
from afterclose.harness.client import behaviours as b
from afterclose.harness.client import conn as c
from afterclose.harness.client import observations as obs
from afterclose.harness.client.plan import Action
from afterclose.harness.errors import AftercloseError
from afterclose.harness.oracle.evidence import Observation
from afterclose.harness.protocols.http import Http

CSRC = Path(__file__).resolve().parent / "csrc"
LIB_NAME = "afterclose_storm"
CFLAGS = ("-O2", "-fPIC", "-Wall", "-Wextra")
ABI = 1  # AC_ABI in csrc/storm.h
ENGINES = ("auto", "native", "asyncio")

# csrc/storm.h, in enum order: counts as FaultReport names them; then the engine's own.
COUNT_NAMES = (
    "connections",
    "requests",
    "responses",
    "reset_by_peer",
    "closed_by_peer",
    "closed_without_answer",
    "dropped_requests",
    "truncated_responses",
    "rst_sent",
    "fin_sent",
    "partial_requests",
    "malformed_sent",
    "malformed_answered",
    "malformed_closed",
    "malformed_unanswered",
    "slow_requests",
    "cut_by_deadline",
    "waited_for_slot",
    "not_started",
    "errors:garbage",
    "errors:timeout_connect",
    "errors:timeout_send",
    "errors:timeout_response",
    "errors:timeout_close",
)
_STARTED, _DONE, _EVENTS_OVER = range(len(COUNT_NAMES), len(COUNT_NAMES) + 3)
N_COUNTS = len(COUNT_NAMES) + 3
N_ERRNOS = 160
N_STATUSES = 1000
N_EVENTS = 128
EVENT_BYTES = 1024
N_TEMPLATES = 3 + 8
KINDS = ("keepalive", "close", "idle_drop", "malformed", "slow", "half_close", "race", "reset")
PHASES = (*b.RESET_PHASES, b.MID_HANDSHAKE)
RACE_RST, RACE_VALID_FIRST = 1, 2
E_UNSOLICITED, E_FOREIGN, E_GARBAGE_TAGGED, E_DROPPED = range(4)
U_BEFORE_ANY, U_AFTER_ANSWER, U_NOT_DUE, U_WAITING_CLOSE = range(4)
# Stands for the tag in a request made once per run; the C side writes the real one.
_MARK = "/ac/0tagmark0/0/0"
_ACTION = struct.Struct("<BBHHH")
_U16 = 0xFFFF
AWAIT_MAX = 16
MAX_RUN_ID = 40  # the tags the C side writes fit its 96-byte buffer


class _Action(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("a", ctypes.c_uint16),
        ("b", ctypes.c_uint16),
        ("c", ctypes.c_uint16),
    ]


class _Template(ctypes.Structure):
    _fields_ = [
        ("pre", ctypes.c_void_p),
        ("post", ctypes.c_void_p),
        ("pre_len", ctypes.c_uint32),
        ("post_len", ctypes.c_uint32),
        ("has_tag", ctypes.c_int32),
    ]


class _Config(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 128),
        ("addrlen", ctypes.c_uint32),
        ("family", ctypes.c_int32),
        ("start", ctypes.c_double),
        ("stop", ctypes.c_double),
        ("deadline", ctypes.c_double),
        ("rate", ctypes.c_double),
        ("io_timeout", ctypes.c_double),
        ("worker", ctypes.c_uint32),
        ("processes", ctypes.c_uint32),
        ("cap", ctypes.c_uint32),
        ("planned", ctypes.c_uint32),
        ("echoes", ctypes.c_int32),
        ("has_large", ctypes.c_int32),
        ("run_id", ctypes.c_char_p),
        ("actions", ctypes.c_void_p),
        ("tpl", _Template * N_TEMPLATES),
        ("counters", ctypes.c_void_p),
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("context", ctypes.c_int32),
        ("conn", ctypes.c_int32),
        ("req", ctypes.c_int32),
        ("last", ctypes.c_int32),
        ("status", ctypes.c_int32),
        ("count", ctypes.c_int32),
        ("reset", ctypes.c_int32),
        ("total_len", ctypes.c_uint32),
        ("shown_len", ctypes.c_uint32),
        ("idle_s", ctypes.c_double),
        ("data", ctypes.c_uint8 * EVENT_BYTES),
    ]


class _Result(ctypes.Structure):
    _fields_ = [
        ("counts", ctypes.c_int64 * N_COUNTS),
        ("status", ctypes.c_int64 * N_STATUSES),
        ("connect_errno", ctypes.c_int64 * N_ERRNOS),
        ("send_errno", ctypes.c_int64 * N_ERRNOS),
        ("shutdown_errno", ctypes.c_int64 * N_ERRNOS),
        ("fatal_errno", ctypes.c_int32),
        ("events", ctypes.c_int32),
        ("event", _Event * N_EVENTS),
    ]


def library_path() -> Path:
    """Build (once, cached) and return the engine's shared library."""
    headers = tuple(sorted(CSRC.glob("*.h")))
    return cbuild.build(
        cbuild.CBuild(
            name=LIB_NAME,
            sources=tuple(sorted(CSRC.glob("*.c"))),
            cflags=CFLAGS,
            kind="shared",
        ),
        extra_deps=headers,
    )


@cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.ac_abi.restype = ctypes.c_int
    lib.ac_run.restype = ctypes.c_int
    lib.ac_run.argtypes = (ctypes.POINTER(_Config), ctypes.POINTER(_Result))
    if lib.ac_abi() != ABI:
        raise AftercloseError(
            f"the storm engine library speaks ABI {lib.ac_abi()}, this module {ABI}",
            where=str(library_path()),
            hint="a stale build: remove it and run again",
        )
    return lib


def encode(action: Action) -> bytes | None:
    """One action as the C side reads it (kind, flags, a, b, c), or None if it has none."""
    match action:
        case b.KeepAlive(requests=n):
            fields = (0, 0, n, 0, 0)
        case b.CloseAfterOne():
            fields = (1, 0, 0, 0, 0)
        case b.IdleDrop(idle_ms=ms):
            fields = (2, 0, ms, 0, 0)
        case b.Malformed(variant=v) if v in b.MALFORMED_VARIANTS:
            fields = (3, 0, b.MALFORMED_VARIANTS.index(v), 0, 0)
        case b.SlowSender(pieces=pieces, gap_ms=gap):
            fields = (4, 0, pieces, gap, 0)
        case b.HalfCloseAction(requests=n, one_write=one):
            fields = (5, int(one), n, 0, 0)
        case b.RaceAction(variant=v, close=close, delay_us=us, valid_first=first) if (
            v in b.MALFORMED_VARIANTS and close in ("rst", "fin")
        ):
            flags = (RACE_RST if close == "rst" else 0) | (RACE_VALID_FIRST if first else 0)
            fields = (6, flags, b.MALFORMED_VARIANTS.index(v), us, 0)
        case b.ResetAction(phase=phase, pipeline=pipeline, read_bytes=read) if phase in PHASES:
            fields = (7, 0, PHASES.index(phase), pipeline, read)
        case _:
            return None
    # Requests written at once are awaited in a ring of AWAIT_MAX (csrc/engine.h).
    at_once = fields[2] if fields[0] == 5 else fields[3] if fields[0] == 7 else 0
    if not all(0 <= f <= _U16 for f in fields[2:]) or at_once > AWAIT_MAX:
        return None
    return _ACTION.pack(*fields)


@dataclass(frozen=True)
class Templates:
    """The run's requests, each split around its tag: ``(prefix, suffix, has_tag)``."""

    parts: tuple[tuple[bytes, bytes, bool], ...]

    @classmethod
    def of(cls, remote: c.Remote) -> Templates | str:
        """The templates for ``remote``, or why its requests cannot be templated."""
        protocol, endpoint = remote.protocol, remote.endpoint
        host, port = endpoint.host, endpoint.port
        made = [
            protocol.request(_MARK, host, port),
            protocol.request(_MARK, host, port, close=True),
            protocol.path_request(endpoint.large_path, _MARK, host, port)
            if endpoint.large_path
            else protocol.request(_MARK, host, port),
            *(protocol.malformed(v, _MARK, host, port) for v in b.MALFORMED_VARIANTS),
        ]
        parts = []
        for data in made:
            pieces = data.split(_MARK.encode())
            if len(pieces) > 2:
                return "a request carries its tag more than once"
            parts.append((pieces[0], pieces[-1] if len(pieces) == 2 else b"", len(pieces) == 2))
        if len(parts) > N_TEMPLATES:
            return "more malformed variants than the engine holds"
        return cls(tuple(parts))


@dataclass(frozen=True)
class NativePlan:
    """A plan the compiled engine can perform: its records and the run's templates."""

    records: bytes
    templates: Templates


def prepare(remote: c.Remote, actions: Sequence[Action]) -> NativePlan | str:
    """The plan in the engine's terms, or why the asyncio engine must perform it."""
    if type(remote.protocol) is not Http:
        return f"protocol {remote.protocol.name} (the compiled engine speaks HTTP/1.1)"
    if remote.endpoint.tls:
        return "TLS (the compiled engine speaks plain TCP)"
    run_id = remote.tags.run_id
    if not (run_id.isascii() and run_id.isalnum() and len(run_id) <= MAX_RUN_ID):
        return (
            f"run id {run_id!r} (the compiled engine takes up to {MAX_RUN_ID} letters and digits)"
        )
    templates = Templates.of(remote)
    if isinstance(templates, str):
        return templates
    seen: dict[Action, bytes | None] = {}
    records = []
    for action in actions:
        record = seen.get(action, b"")
        if record == b"":
            record = seen[action] = encode(action)
        if record is None:
            return f"action {action.describe()!r} (the compiled engine has no such behaviour)"
        records.append(record)
    return NativePlan(b"".join(records), templates)


def available() -> str | None:
    """None if the engine's library builds and loads, else why not."""
    try:
        _library()
    except (AftercloseError, OSError) as exc:
        return f"the compiled engine is unavailable: {exc}"
    return None


def perform(
    plan: NativePlan,
    remote: c.Remote,
    *,
    index: int,
    processes: int,
    cap: int,
    planned: int,
    start: float,
    stop: float,
    deadline: float,
    rate_per_s: float | None,
    counters: memoryview,
) -> FaultReport:
    """Worker ``index``'s share of the plan, performed by ``ac_run()`` in this process."""
    lib = _library()
    config = _Config()
    addr = _sockaddr(remote)
    ctypes.memmove(config.addr, addr, len(addr))
    config.addrlen = len(addr)
    config.family = int(remote.family)
    config.start, config.stop, config.deadline = start, stop, deadline
    config.rate = rate_per_s or 0.0
    config.io_timeout = remote.endpoint.io_timeout_s
    config.worker, config.processes, config.cap, config.planned = index, processes, cap, planned
    config.echoes = int(remote.endpoint.echo_path)
    config.has_large = int(remote.endpoint.large_path is not None)
    run_id = remote.tags.run_id.encode()
    config.run_id = run_id
    records = ctypes.create_string_buffer(plan.records, len(plan.records))
    config.actions = ctypes.addressof(records)
    keep: list[ctypes.Array[ctypes.c_char]] = [records]
    for k, (pre, post, has_tag) in enumerate(plan.templates.parts):
        pre_buf = ctypes.create_string_buffer(pre, len(pre) or 1)
        post_buf = ctypes.create_string_buffer(post, len(post) or 1)
        keep += [pre_buf, post_buf]
        config.tpl[k] = _Template(
            ctypes.addressof(pre_buf), ctypes.addressof(post_buf), len(pre), len(post), has_tag
        )
    shared = ctypes.c_int64.from_buffer(counters)
    config.counters = ctypes.addressof(shared)
    result = _Result()
    lib.ac_run(ctypes.byref(config), ctypes.byref(result))
    del shared
    if result.fatal_errno:
        exc = OSError(result.fatal_errno, os.strerror(result.fatal_errno))
        error = c.harness_error(exc, "opening a client socket")
        raise error if error is not None else exc
    return _report(result, remote)


def _sockaddr(remote: c.Remote) -> bytes:
    host, port = remote.sockaddr[0], remote.sockaddr[1]
    if remote.family == socket.AF_INET6:
        flow, scope = (
            (remote.sockaddr[2], remote.sockaddr[3]) if len(remote.sockaddr) > 3 else (0, 0)
        )
        packed = socket.inet_pton(socket.AF_INET6, host)
        return struct.pack("=HHI16sI", socket.AF_INET6, socket.htons(port), flow, packed, scope)
    packed = socket.inet_pton(socket.AF_INET, host)
    return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port), packed)


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, "oserror").lower()


def _report(result: _Result, remote: c.Remote) -> FaultReport:
    fault = remote.fault
    report = FaultReport(fault)
    for k, name in enumerate(COUNT_NAMES):
        report.count(name, result.counts[k])
    for code in range(N_STATUSES):
        report.count(f"status:{code}", result.status[code])
    for prefix, table in (
        ("connect", result.connect_errno),
        ("send", result.send_errno),
        ("shutdown", result.shutdown_errno),
    ):
        for number in range(N_ERRNOS):
            report.count(f"errors:{prefix}_{_errno_name(number)}", table[number])
    for k in range(result.events):
        seen = _observation(result.event[k], remote)
        if seen is not None:
            report.observe(seen)
    report.count("observations_dropped", result.counts[_EVENTS_OVER])
    return report


def _observation(event: _Event, remote: c.Remote) -> Observation | None:
    fault, index = remote.fault, event.conn
    data = bytes(event.data[: event.shown_len])

    def tag(req: int) -> str:
        return remote.tags.tag(index, req)

    if event.kind == E_DROPPED:
        return obs.dropped_observation(
            fault, index, tag(event.req), event.count, bool(event.reset), event.idle_s
        )
    if event.kind == E_FOREIGN:
        return obs.foreign_observation(fault, index, event.status, tag(event.req), data)
    if event.kind == E_GARBAGE_TAGGED:
        expected = None if event.req < 0 else tag(event.req)
        return obs.garbage_observation(fault, index, expected, data)
    when = obs.WAITING_CLOSE if event.context == U_WAITING_CLOSE else obs.NOT_DUE
    last = None if event.last < 0 else tag(event.last)
    context = obs.unsolicited_context(
        event.context != U_BEFORE_ANY, last, event.context != U_AFTER_ANSWER, when
    )
    return obs.unsolicited_observation(fault, index, data, context, received=event.total_len)
